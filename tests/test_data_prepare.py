"""data.prepare for pretraining text: the token stream, the shard format, bad input."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from data.datasets import TokenStream
from data.prepare import parse_options, prepare
from data.shards import DataError
from tests.helpers import CHINESE_LLAMA2_VOCAB, CHINESE_LLAMA_VOCAB
from tokenizer.files import sha256_file

REPO = Path(__file__).resolve().parents[1]

# SWITCH — which real extended tokenizer the stream test uses:
#   "merged": Chinese-LLaMA's merge of Meta's tokenizer and chinese_sp.model, built here
#             with `python -m tokenizer.merge` (49,953 pieces; the tokenizer);
#   "chinese_llama2_hf": Chinese-LLaMA-2's published tokenizer (55,296 pieces), for use
#             while tokenizer/merge.py is unavailable.
REAL_TOKENIZER = "merged"
VOCAB = {"merged": CHINESE_LLAMA_VOCAB, "chinese_llama2_hf": CHINESE_LLAMA2_VOCAB}  # as published


@pytest.fixture
def tok(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real extended tokenizer chosen above (built once per test session)."""
    tokenizers = shared_data / "tokenizers"
    if REAL_TOKENIZER == "chinese_llama2_hf":
        return tokenizers / "chinese_llama2_hf" / "tokenizer.model"
    out = tmp_path_factory.getbasetemp() / "merged-tokenizer"
    if not (out / "tokenizer.model").exists():
        r = subprocess.run(
            [sys.executable, "-m", "tokenizer.merge", "--llama_tokenizer_dir",
             str(tokenizers / "llama_tokenizer.model"), "--chinese_sp_model_file",
             str(tokenizers / "chinese_sp.model"), "--output_dir", str(out)],
            capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr
    return out / "tokenizer.model"


def run(*args) -> dict:
    """data.prepare in this process (one worker unless told otherwise); meta.json's content."""
    return prepare(parse_options([str(a) for a in args]))


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.prepare", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


def all_ids(path: Path) -> list[int]:
    stream = TokenStream(path)
    return stream.read(0, len(stream)).tolist()


def reference(sp: spm.SentencePieceProcessor, files: list[Path]) -> list[int]:
    """BOS + sentencepiece's encode + EOS of every non-blank line, in order."""
    ids = []
    for f in files:
        for line in f.read_text(encoding="utf-8").split("\n"):
            if line.strip():
                ids += [sp.bos_id()] + sp.encode(line) + [sp.eos_id()]
    return ids


def test_stream_is_sentencepiece_with_bos_eos_in_order(tok, shared_data, tmp_path):
    corpus = [shared_data / "corpus" / "cmrc2018_contexts.txt", shared_data / "corpus" / "lunyu.txt"]
    meta = run("--tokenizer", tok, "--input", *corpus, "--output_dir", tmp_path / "d",
               "--num_workers", 1, "--chunk_mb", 0.2)
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    expected = reference(sp, corpus)
    stream = TokenStream(tmp_path / "d")
    assert np.array_equal(stream.read(0, len(stream)), np.array(expected, dtype=np.uint16))
    assert stream.meta == meta == json.loads((tmp_path / "d" / "meta.json").read_text(encoding="utf-8"))
    assert meta["kind"] == "pretrain" and meta["format"] == "zhllama-tokens"
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == VOCAB[REAL_TOKENIZER]
    assert meta["tokenizer"] == {"file": "tokenizer.model", "sha256": sha256_file(tok)}
    assert meta["special_ids"] == {"bos": 1, "eos": 2, "pad": sp.pad_id(), "unk": 0}
    documents = sum(1 for f in corpus for line in f.read_text(encoding="utf-8").split("\n") if line.strip())
    assert documents == 1104 + 512  # the files' lines, as SOURCES.md counts them
    assert meta["num_documents"] == documents and meta["num_tokens"] == len(expected)
    assert meta["skipped"] == {} and len(meta["files"]) > 3
    assert meta["sources"] == [{"path": str(p), "bytes": p.stat().st_size} for p in corpus]
    assert sum(f["num_tokens"] for f in meta["files"]) == meta["num_tokens"]
    assert sum(f["num_documents"] for f in meta["files"]) == meta["num_documents"]
    # the document index: every document starts with BOS, ends with EOS, lengths as encoded
    starts = stream.document_starts()
    ends = np.append(starts[1:], len(stream))
    assert len(starts) == meta["num_documents"]
    tokens = stream.read(0, len(stream))
    assert (tokens[starts] == 1).all() and (tokens[ends - 1] == 2).all()
    assert (tokens == 1).sum() == len(starts)  # no BOS anywhere else
    for f in meta["files"]:
        assert (tmp_path / "d" / f["tokens"]).stat().st_size == 2 * f["num_tokens"]


def test_workers_give_byte_identical_output(tok, shared_data, tmp_path):
    corpus = [shared_data / "corpus" / "cmrc2018_contexts.txt", shared_data / "corpus" / "lunyu.txt"]
    for n in (1, 2):
        r = cli("--tokenizer", tok, "--input", *corpus, "--output_dir", tmp_path / f"w{n}",
                "--num_workers", n, "--chunk_mb", 0.1)
        assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    assert len(names) > 2 * 10 and "meta.json" in names
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "w1", tmp_path / "w2", names, shallow=False)
    assert not mismatch and not errors


def with_pieces(base: Path, out: Path, n_total: int) -> Path:
    """`base` with user-defined pieces appended up to n_total (ids above 65,535)."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(base.read_bytes())
    for i in range(n_total - len(proto.pieces)):
        proto.pieces.append(sp_pb2.ModelProto.SentencePiece(
            piece=f"<extra{i}>", score=0, type=sp_pb2.ModelProto.SentencePiece.USER_DEFINED))
    out.write_bytes(proto.SerializeToString())
    return out


def test_uint32_above_65536_and_never_a_second_bos(tok, tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("<s>有 <s> 在文中 </s> 的文档</s>\n<extra20000> here <s>\n", encoding="utf-8")
    # the real tokenizer: the literal text "<s>" is not the control piece
    run("--tokenizer", tok, "--input", text, "--output_dir", tmp_path / "small")
    ids = all_ids(tmp_path / "small")
    assert ids.count(1) == 2 and ids.count(2) == 2 and ids[0] == 1 and ids[-1] == 2
    big = with_pieces(tok, tmp_path / "big.model", 70000)
    meta = run("--tokenizer", big, "--input", text, "--output_dir", tmp_path / "big")
    stream = TokenStream(tmp_path / "big")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70000 and stream.dtype == np.dtype("<u4")
    assert (tmp_path / "big" / "tokens-00000.bin").stat().st_size == 4 * meta["num_tokens"]
    ids = stream.read(0, len(stream)).tolist()
    assert ids.count(1) == 2 and ids.count(2) == 2  # one BOS and one EOS per document
    sp = spm.SentencePieceProcessor(model_file=str(big))
    assert sp.piece_to_id("<extra20000>") in ids and max(ids) >= 65536


def test_lines_kept_exactly(tok, tmp_path):
    raw = ("\ufeff第一行\r\n  缩进和\u2028分隔符都是正文 \r\n\r\n   \n\t\nlast line without newline\r")
    (tmp_path / "a.txt").write_bytes(raw.encode("utf-8"))
    meta = run("--tokenizer", tok, "--input", tmp_path / "a.txt", "--output_dir", tmp_path / "d",
               "--no_bos")
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    docs = ["第一行", "  缩进和\u2028分隔符都是正文 ", "last line without newline"]
    expected = [i for d in docs for i in sp.encode(d) + [2]]
    assert TokenStream(tmp_path / "d").read(0, meta["num_tokens"]).tolist() == expected
    assert meta["num_documents"] == 3 and meta["skipped"] == {"empty": 3}
    assert meta["options"]["bos"] is False and meta["options"]["eos"] is True


def test_jsonl_text_key_and_globs(tok, tmp_path):
    (tmp_path / "b.jsonl").write_text('{"content": "乙"}\n\n{"content": "丙", "id": 3}\n', encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"content": "甲"}\n{"content": ""}\n', encoding="utf-8")
    meta = run("--tokenizer", tok, "--input", str(tmp_path / "*.jsonl"), "--output_dir", tmp_path / "d",
               "--text_key", "content", "--no_eos")
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    expected = [i for d in ("甲", "乙", "丙") for i in [1] + sp.encode(d)]  # glob sorted: a, then b
    assert TokenStream(tmp_path / "d").read(0, meta["num_tokens"]).tolist() == expected
    assert meta["skipped"] == {"empty": 2}
    assert [s["path"] for s in meta["sources"]] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]


def test_undecodable_lines_replace_and_skip(tok, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("第一行\n第二行\n".encode() + b"\xff\xfe broken\n" + "第四行\n".encode())
    with pytest.raises(DataError, match=r"bad\.txt:3: not valid UTF-8"):
        run("--tokenizer", tok, "--input", bad, "--output_dir", tmp_path / "strict")
    for mode, docs in (("replace", 4), ("skip", 3)):
        meta = run("--tokenizer", tok, "--input", bad, "--output_dir", tmp_path / mode, "--errors", mode)
        assert meta["num_documents"] == docs and meta["skipped"]["undecodable_lines"] == 1
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    docs = ["第一行", "第二行", "\ufffd\ufffd broken", "第四行"]
    assert all_ids(tmp_path / "replace") == [
        i for d in docs for i in [1] + sp.encode(d) + [2]]


def assert_clean_failure(r: subprocess.CompletedProcess, tmp_path: Path, message: str) -> None:
    """Non-zero exit, one line naming the problem, no traceback, nothing left behind."""
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dirs


@pytest.mark.parametrize("name, content, message", [
    ("bad.txt", "好\n".encode() * 3000 + b"\xc3\x28 broken\n", "bad.txt:3001: not valid UTF-8"),
    ("bad.jsonl", '{"text": "好"}\n{"text": 不是JSON}\n'.encode(), "bad.jsonl:2: invalid JSON"),
    ("bad.jsonl", '{"text": "好"}\n{"content": "没有"}\n'.encode(), "bad.jsonl:2: no 'text' field"),
    ("bad.jsonl", '{"text": ["列表"]}\n'.encode(), "bad.jsonl:1: field 'text' is list, not text"),
    ("empty.txt", b"", "the input is empty"),
    ("blank.txt", b"\n  \n\n", "no documents in"),
    ("data.csv", b"a,b\n", "unsupported input type"),
])
def test_bad_input_cli(tok, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    # a small --chunk_mb puts the bad line of bad.txt in a later unit, run by a second worker
    r = cli("--tokenizer", tok, "--input", tmp_path / name, "--output_dir", tmp_path / "out",
            "--num_workers", 2, "--chunk_mb", 0.004)
    assert_clean_failure(r, tmp_path, message)


def test_missing_inputs_and_options(tok, tmp_path):
    with pytest.raises(DataError, match=r"nothing\*\.txt: matches no file"):
        run("--tokenizer", tok, "--input", str(tmp_path / "nothing*.txt"), "--output_dir", tmp_path / "o")
    with pytest.raises(DataError, match="no such input file"):
        run("--tokenizer", tok, "--input", tmp_path / "absent.txt", "--output_dir", tmp_path / "o")
    with pytest.raises(DataError, match="is a directory"):
        run("--tokenizer", tok, "--input", tmp_path, "--output_dir", tmp_path / "o")
    (tmp_path / "a.txt").write_text("文\n", encoding="utf-8")
    with pytest.raises(SystemExit):  # refused by the parser, naming --num_workers
        run("--tokenizer", tok, "--input", tmp_path / "a.txt", "--output_dir", tmp_path / "o",
            "--num_workers", 0)
    assert not (tmp_path / "o").exists()


def test_existing_output(tok, tmp_path):
    (tmp_path / "a.txt").write_text("文本\n", encoding="utf-8")
    run("--tokenizer", tok, "--input", tmp_path / "a.txt", "--output_dir", tmp_path / "done")
    before = (tmp_path / "done" / "meta.json").read_bytes()
    r = cli("--tokenizer", tok, "--input", tmp_path / "a.txt", "--output_dir", tmp_path / "done")
    assert r.returncode != 0 and "already exists (use --overwrite" in r.stderr
    other = with_pieces(tok, tmp_path / "other.model", 60000)
    r = cli("--tokenizer", other, "--input", tmp_path / "a.txt", "--output_dir", tmp_path / "done")
    assert r.returncode != 0 and "made with another tokenizer" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "done" / "meta.json").read_bytes() == before  # left as it was
    r = cli("--tokenizer", other, "--input", tmp_path / "a.txt", "--output_dir", tmp_path / "done",
            "--overwrite")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "done" / "meta.json").read_text())["vocab_size"] == 60000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "done", "other.model"]


def test_help():
    r = cli("--help")
    assert r.returncode == 0 and "--sft" in r.stdout and "--field_map" in r.stdout
