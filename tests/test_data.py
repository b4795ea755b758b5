"""Token shards, instruction data and the datasets that read them, on the real corpus."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from data.datasets import PackedBlocks, SFTDataset, TokenStream, collate, collate_packed
from data.templates import TEMPLATES, format_prompt


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The real Chinese-LLaMA merge, with the pad token (49,954 pieces)."""
    from tests.conftest import SHARED_DATA
    from tokenizer.merge import merge

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test material not found at {SHARED_DATA}")
    out = tmp_path_factory.mktemp("tok") / "merged"
    merge(SimpleNamespace(
        llama_tokenizer_dir=str(SHARED_DATA / "tokenizers" / "llama_tokenizer.model"),
        chinese_sp_model_file=str(SHARED_DATA / "tokenizers" / "chinese_sp.model"),
        output_dir=str(out), add_pad_token=True, drop_digit_pieces=False, drop_ascii_pieces=False,
        drop_unreachable_pieces=False, new_piece_scores="zero", overwrite=False))
    return out / "tokenizer.model"


def prepare(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "data.prepare", *map(str, args)], capture_output=True,
                       text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_stream_is_sentencepiece_with_bos_eos_in_order(tok, shared_data, tmp_path):
    corpus = [shared_data / "corpus" / "cmrc2018_contexts.txt", shared_data / "corpus" / "lunyu.txt"]
    prepare("--tokenizer", tok, "--input", *corpus, "--output_dir", tmp_path / "d",
            "--num_workers", "2", "--chunk_mb", "0.2")
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    expected = []
    for f in corpus:
        for line in f.read_text(encoding="utf-8").splitlines():
            expected += [1] + sp.encode(line) + [2]
    stream = TokenStream(tmp_path / "d")
    meta = stream.meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 49954 and len(meta["files"]) > 4
    assert np.array_equal(stream.read(0, len(stream)), np.array(expected, dtype=np.uint16))
    assert meta["num_documents"] == 1104 + 512 and meta["num_tokens"] == len(expected)
    starts = stream.document_starts()
    assert len(starts) == 1616 and all(stream.read(int(s), 1)[0] == 1 for s in starts[:50])


def test_workers_give_byte_identical_output(tok, shared_data, tmp_path):
    src = shared_data / "corpus" / "cmrc2018_contexts.txt"
    for n in (1, 2):
        prepare("--tokenizer", tok, "--input", src, "--output_dir", tmp_path / f"w{n}",
                "--num_workers", n, "--chunk_mb", "0.25")
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir()) and len(names) > 5
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "w1", tmp_path / "w2", names, shallow=False)
    assert not mismatch and not errors


def test_uint32_above_65536_and_one_bos(tmp_path, tok):
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(tok.read_bytes())
    for i in range(70000 - len(proto.pieces)):
        proto.pieces.append(sp_pb2.ModelProto.SentencePiece(  # matched whole in text
            piece=f"<extra{i}>", score=0, type=sp_pb2.ModelProto.SentencePiece.USER_DEFINED))
    big = tmp_path / "big.model"
    big.write_bytes(proto.SerializeToString())
    (tmp_path / "a.txt").write_text("有 <s> 在文中 </s> 的文档\n<extra20000> here\n", encoding="utf-8")
    prepare("--tokenizer", big, "--input", tmp_path / "a.txt", "--output_dir", tmp_path / "d")
    stream = TokenStream(tmp_path / "d")
    assert stream.meta["dtype"] == "uint32" and stream.dtype == np.dtype("<u4")
    ids = stream.read(0, len(stream)).tolist()
    assert ids.count(1) == 2 and ids.count(2) == 2  # one BOS and EOS per document, no more
    assert max(ids) >= 65536


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_sft_prompt_mask_and_eos(tok, shared_data, tmp_path, template):
    src = shared_data / "sft" / "alpaca_zh_demo.json"
    prepare("--sft", "--template", template, "--tokenizer", tok, "--input", src,
            "--output_dir", tmp_path / "s", "--max_seq_length", "160")
    records = json.loads(src.read_text(encoding="utf-8"))
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    data = SFTDataset(tmp_path / "s")
    assert len(data.starts) == 1000 and data.stream.meta["truncated"] > 100
    checked = 0
    for i, r in enumerate(records):
        tokens, plen = data.sample(i)
        assert tokens[0] == 1 and tokens[-1] == 2 and len(tokens) <= 160  # EOS kept, even truncated
        prompt = format_prompt(template, r["instruction"], r["input"])
        if len(sp.encode(prompt)) + len(sp.encode(r["output"])) + 2 <= 160:
            assert sp.decode(tokens[1:plen].tolist()) == prompt
            assert sp.decode(tokens[plen:].tolist()) == r["output"]
            checked += 1
    assert checked > 500


def test_templates_exact():
    assert format_prompt("cla_v1", "翻译", "hello") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n翻译\nhello\n\n### Response: ")
    assert format_prompt("alpaca", "Add", "1, 2").endswith("### Input:\n1, 2\n\n### Response:\n")
    assert format_prompt("llama2_cla_v2", "你好") == (
        "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n你好 [/INST]")


def test_belle_through_field_map(tok, shared_data, tmp_path):
    prepare("--sft", "--tokenizer", tok, "--input", shared_data / "sft" / "belle_eval_set.jsonl",
            "--output_dir", tmp_path / "eval", "--field_map", "instruction=question,output=std_answer")
    meta = json.loads((tmp_path / "eval" / "meta.json").read_text())
    assert meta["num_documents"] == 631 and meta["skipped"] == {"no_response": 369}
    prepare("--sft", "--tokenizer", tok, "--input", shared_data / "sft" / "belle_zh_seed_tasks.jsonl",
            "--output_dir", tmp_path / "seed",
            "--field_map", "input=instances.0.input,output=instances.0.output")
    assert json.loads((tmp_path / "seed" / "meta.json").read_text())["num_documents"] == 175


def test_packed_blocks_ranks_epochs_and_resume(tok, shared_data, tmp_path):
    prepare("--tokenizer", tok, "--input", shared_data / "corpus" / "lunyu.txt", "--output_dir",
            tmp_path / "d")
    kw = dict(block_size=64, val_fraction=0.1, seed=3, world_size=2)
    ranks = [PackedBlocks(tmp_path / "d", rank=r, **kw) for r in (0, 1)]
    n = ranks[0].n_blocks
    seen = []
    for d in ranks:
        first = [b["tokens"] for _, b in zip(range(len(d) // 4), d.batches(4))]
        seen += [tuple(row.tolist()) for t in first for row in t]
    everything = {tuple(ranks[0].block(i).tolist()) for i in range(n)}
    assert len(seen) == len(set(seen)) == (n // 2 // 4) * 4 * 2  # disjoint, no repeats
    if n % 8 == 0:
        assert set(seen) == everything
    # resume mid-epoch from a state dict: the same batches follow
    a = PackedBlocks(tmp_path / "d", rank=0, **kw)
    it = a.batches(3)
    for _ in range(5):
        next(it)
    state = a.state_dict()
    expected = [next(it)["tokens"] for _ in range(10)]  # runs into the next epoch
    b = PackedBlocks(tmp_path / "d", rank=0, **kw)
    b.load_state_dict(state)
    got = [bb["tokens"] for _, bb in zip(range(10), b.batches(3))]
    assert all(np.array_equal(x, y) for x, y in zip(expected, got))
    with pytest.raises(ValueError, match="world_size"):
        PackedBlocks(tmp_path / "d", rank=0, **{**kw, "world_size": 1}).load_state_dict(state)
    # validation holds out whole documents
    val = PackedBlocks(tmp_path / "d", split="val", **{**kw, "world_size": 1})
    starts = set(ranks[0].stream.document_starts().tolist())
    assert val.region[0] in starts and ranks[0].region == (0, val.region[0])
    assert sum(len(bt["tokens"]) for bt in val.batches(4)) == val.n_blocks


def test_collate_labels_by_hand():
    a, b = np.array([1, 10, 11, 20, 21, 2]), np.array([1, 12, 22, 2])
    batch = collate([(a, 3), (b, 2)], pad_id=99)
    assert batch["tokens"].tolist() == [[1, 10, 11, 20, 21, 2], [1, 12, 22, 2, 99, 99]]
    assert batch["labels"].tolist() == [[-100, -100, 20, 21, 2, -100], [-100, 22, 2, -100, -100, -100]]
    packed = collate_packed([[(a, 3), (b, 2)], [(b, 2)]], pad_id=99)
    assert packed["segment_ids"].tolist() == [[0] * 6 + [1] * 4, [0] * 4 + [2] * 6]
    assert packed["labels"][0].tolist() == [-100, -100, 20, 21, 2, -100, -100, 22, 2, -100]


def test_bad_input(tok, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("第一行\n第二行\n".encode() + b"\xff\xfe broken\n" + "第四行\n".encode())
    r = prepare("--tokenizer", tok, "--input", bad, "--output_dir", tmp_path / "o", check=False)
    assert r.returncode != 0 and "bad.txt:3: not valid UTF-8" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
    for mode, docs in (("replace", 4), ("skip", 3)):
        prepare("--tokenizer", tok, "--input", bad, "--output_dir", tmp_path / mode, "--errors", mode)
        meta = json.loads((tmp_path / mode / "meta.json").read_text())
        assert meta["num_documents"] == docs and meta["skipped"]["undecodable_lines"] == 1
    j = tmp_path / "bad.jsonl"
    j.write_text('{"text": "好"}\n{"text": 不是JSON}\n', encoding="utf-8")
    r = prepare("--tokenizer", tok, "--input", j, "--output_dir", tmp_path / "o", check=False)
    assert r.returncode != 0 and "bad.jsonl:2: invalid JSON" in r.stderr
    j.write_text('{"text": "好"}\n{"content": "没有text"}\n', encoding="utf-8")
    r = prepare("--tokenizer", tok, "--input", j, "--output_dir", tmp_path / "o", check=False)
    assert r.returncode != 0 and "bad.jsonl:2: no 'text' field" in r.stderr
    s = tmp_path / "sft.json"
    s.write_text('[{"instruction": "a", "output": "b"}, {"question": "c", "output": "d"}]')
    r = prepare("--sft", "--tokenizer", tok, "--input", s, "--output_dir", tmp_path / "o", check=False)
    assert r.returncode != 0 and "sft.json record 1: no 'instruction' field" in r.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = prepare("--tokenizer", tok, "--input", empty, "--output_dir", tmp_path / "o", check=False)
    assert r.returncode != 0 and "empty" in r.stderr
    # an existing output made with another tokenizer
    (tmp_path / "a.txt").write_text("文本\n", encoding="utf-8")
    prepare("--tokenizer", tok, "--input", tmp_path / "a.txt", "--output_dir", tmp_path / "done")
    other = tmp_path / "other.model"
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(tok.read_bytes())
    proto.pieces.append(sp_pb2.ModelProto.SentencePiece(piece="▁一个新的词", score=0))
    other.write_bytes(proto.SerializeToString())
    r = prepare("--tokenizer", other, "--input", tmp_path / "a.txt", "--output_dir", tmp_path / "done",
                check=False)
    assert r.returncode != 0 and "made with another tokenizer" in r.stderr
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
