"""The vocabulary merge on the real LLaMA and Chinese-LLaMA files, training, report, errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from tests.helpers import CHINESE_ALPACA_VOCAB, CHINESE_LLAMA_VOCAB, LLAMA_VOCAB
from tokenizer.merge import MergeOptions, merge, reachable_pieces

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "It's a truth universally acknowledged, that a single man in possession of a good fortune",
    "def square(x):\n    return x * x\n\n\tprint(square(y))",
    "naïve café, résumé; «quotes» — and ‘more’",
]
WITH_DIGITS = ["In 2023, 1,234 people paid $5.99 each.", "x = [10, 20, 30]; y = 3.14159",
               "Call 555-0100 at 12:30."]
MIXED = ["我爱北京天安门 🦙🚀 emoji, 𠀀𪚥 rare characters, ＡＢＣ full width",
         "李白（701年—762年），字太白，号青莲居士。", "  leading spaces and\ttabs\n新行"]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from tests.helpers import SHARED_DATA, require_shared

    tok = SHARED_DATA / "tokenizers"
    base, zh = tok / "llama_tokenizer.model", tok / "chinese_sp.model"
    require_shared(base, zh, SHARED_DATA / "corpus")
    out = tmp_path_factory.mktemp("merge")
    for name, kw in [("default", {}), ("pad", {"add_pad_token": True}),
                     ("english_safe", {"drop_digit_pieces": True, "drop_ascii_pieces": True}),
                     ("ranked", {"new_piece_scores": "ranked", "drop_digit_pieces": True})]:
        merge(MergeOptions(llama_tokenizer_dir=base, chinese_sp_model_file=zh,
                           output_dir=out / name, **kw))
    return SimpleNamespace(base=base, zh=zh, out=out, corpus=SHARED_DATA / "corpus")


def proto(path):
    p = sp_pb2.ModelProto()
    p.ParseFromString(path.read_bytes())
    return p


def sp(path):
    return spm.SentencePieceProcessor(model_file=str(path))


def test_published_merge_49953_with_base_untouched(real):
    merged, base, zh = proto(real.out / "default" / "tokenizer.model"), proto(real.base), proto(real.zh)
    n_base = len(base.pieces)
    assert n_base == LLAMA_VOCAB and len(merged.pieces) == CHINESE_LLAMA_VOCAB
    for a, b in zip(base.pieces, merged.pieces[:n_base], strict=True):
        assert (a.piece, a.score, a.type) == (b.piece, b.score, b.type)
    assert all(p.score == 0 and p.type == p.NORMAL for p in merged.pieces[n_base:])
    assert merged.trainer_spec == base.trainer_spec
    assert merged.normalizer_spec == base.normalizer_spec
    # the Chinese pieces LLaMA lacks, appended in their order; the others counted as present
    known = {p.piece for p in base.pieces}
    new = [p.piece for p in zh.pieces if p.piece not in known]
    assert [p.piece for p in merged.pieces[n_base:]] == new
    manifest = json.loads((real.out / "default" / "merge_manifest.json").read_text())
    assert manifest["report"]["appended"] == len(new) == CHINESE_LLAMA_VOCAB - n_base
    assert manifest["report"]["already_present"] == len(zh.pieces) - len(new)
    assert manifest["inputs"]["llama_tokenizer"]["sha256"].startswith("9e556afd")


# Chinese-LLaMA-Alpaca's SHA256.md, for the 49,953-piece tokenizer.model
PUBLISHED_MERGE_SHA256 = "e2676d4ca29ca1750f6ff203328d73b189321dc5776ceede037cbd36541d70c0"


def test_default_merge_is_the_published_file_byte_for_byte(real):
    data = (real.out / "default" / "tokenizer.model").read_bytes()
    assert hashlib.sha256(data).hexdigest() == PUBLISHED_MERGE_SHA256
    manifest = json.loads((real.out / "default" / "merge_manifest.json").read_text())
    assert manifest["output"]["sha256"] == PUBLISHED_MERGE_SHA256
    # with <pad>: the same bytes, then one control piece and the trainer's pad_id
    pad = proto(real.out / "pad" / "tokenizer.model")
    assert pad.pieces[-1].piece == "<pad>" and pad.pieces[-1].type == pad.pieces[-1].CONTROL
    del pad.pieces[-1]
    pad.trainer_spec.pad_id = proto(real.base).trainer_spec.pad_id
    assert pad.SerializeToString() == data


def test_english_exactly_as_before_with_the_drop_options(real):
    base, merged, safe = sp(real.base), sp(real.out / "default" / "tokenizer.model"), \
        sp(real.out / "english_safe" / "tokenizer.model")
    # the published merge appends "20", "10", "5." … so numbers no longer split into digits,
    # and ASCII pieces such as "eo" and "ple" (score 0) split "people" differently
    assert merged.encode("2023", out_type=str) != base.encode("2023", out_type=str)
    assert merged.encode("people", out_type=str) == ["▁p", "eo", "ple"]
    report = json.loads((real.out / "default" / "merge_manifest.json").read_text())["report"]
    appended = proto(real.out / "default" / "tokenizer.model").pieces[len(proto(real.base).pieces):]
    with_digits = sum(any("0" <= c <= "9" or "０" <= c <= "９" for c in p.piece) for p in appended)
    assert report["english_words_changed"] > 100 and report["with_digits"] == with_digits > 0
    safe_report = json.loads((real.out / "english_safe" / "merge_manifest.json").read_text())["report"]
    assert safe_report["english_words_changed"] == 0
    for text in ENGLISH + WITH_DIGITS + ["   runs   of\t\tspaces  ", "x" * 40]:
        assert safe.encode(text) == base.encode(text), text
    # and Chinese still gains as much: the dropped pieces are ASCII
    lines = (real.corpus / "cmrc2018_contexts.txt").read_text(encoding="utf-8").splitlines()[:200]
    assert sum(map(len, safe.encode(lines))) < 0.56 * sum(map(len, base.encode(lines)))


def test_chinese_needs_about_half_the_tokens_and_round_trips(real):
    base, merged = sp(real.base), sp(real.out / "default" / "tokenizer.model")
    lines = (real.corpus / "cmrc2018_contexts.txt").read_text(encoding="utf-8").splitlines()
    n_merged, n_base = (sum(len(t.encode(l)) for l in lines) for t in (merged, base))
    assert (n_merged, n_base) == (407_293, 801_975)  # SOURCES.md's token counts of this file
    assert 0.45 < n_merged / n_base < 0.55  # about half: 0.508
    for text in MIXED + ENGLISH + WITH_DIGITS:
        assert merged.decode(merged.encode(text)) == text


def test_pad_token_is_one_id_everywhere(real):
    pad_dir = real.out / "pad"
    s = sp(pad_dir / "tokenizer.model")
    pad = CHINESE_LLAMA_VOCAB  # appended after the published merge's pieces
    assert s.vocab_size() == CHINESE_ALPACA_VOCAB and s.pad_id() == pad and s.is_control(pad)
    assert pad not in s.encode("text with <pad> in it")  # never produced from text
    from tokenizer.hf_files import special_tokens

    assert special_tokens(pad_dir)["pad"] == {"id": pad, "piece": "<pad>"}
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(pad_dir)
    assert hf.pad_token_id == pad and len(hf) == CHINESE_ALPACA_VOCAB


@pytest.mark.parametrize("use_fast", [True, False])
def test_transformers_loads_the_merge_and_agrees(real, use_fast):
    """transformers (5.x has one Llama tokenizer, on its `tokenizers` backend, whatever
    use_fast says) loads every merge; with ranked scores it segments as sentencepiece does."""
    transformers = pytest.importorskip("transformers")
    lines = (real.corpus / "cmrc2018_contexts.txt").read_text(encoding="utf-8").splitlines()[:200]
    agree = {}
    for name in ("default", "ranked"):
        hf = transformers.AutoTokenizer.from_pretrained(real.out / name, use_fast=use_fast)
        s = sp(real.out / name / "tokenizer.model")
        assert len(hf) == s.vocab_size() and hf.bos_token_id == 1 and hf.eos_token_id == 2
        agree[name] = sum(hf(l)["input_ids"] == [1] + s.encode(l) for l in lines) / len(lines)
    hf = transformers.AutoTokenizer.from_pretrained(real.out / "ranked", use_fast=use_fast)
    s = sp(real.out / "ranked" / "tokenizer.model")
    for text in ENGLISH[:2] + WITH_DIGITS + MIXED[:2] + ["文本中的 <b> 不是特殊符号"]:
        assert hf(text)["input_ids"] == [1] + s.encode(text), text
    # score ties: the published merge's pieces all score 0, and the two libraries break
    # ties differently; ranked scores remove the ties
    assert agree["default"] < 0.3 and agree["ranked"] > 0.95


def test_ranked_scores_keep_ids_english_and_compression(real):
    base, pub, ranked = sp(real.base), sp(real.out / "default" / "tokenizer.model"), \
        sp(real.out / "ranked" / "tokenizer.model")
    n_base = base.vocab_size()
    digits_dropped = [pub.id_to_piece(i) for i in range(n_base, pub.vocab_size())
                      if not any(c.isdigit() for c in pub.id_to_piece(i))]
    assert [ranked.id_to_piece(i) for i in range(n_base, ranked.vocab_size())] == digits_dropped
    report = json.loads((real.out / "ranked" / "merge_manifest.json").read_text())["report"]
    assert report["english_words_changed"] == 0
    lines = (real.corpus / "cmrc2018_contexts.txt").read_text(encoding="utf-8").splitlines()
    n_base, n_ranked = (sum(map(len, t.encode(lines))) for t in (base, ranked))
    assert n_ranked / n_base < 0.54  # still about half (digits now split one by one, as in LLaMA)


def test_reachability():
    vocab = ["a", "b", "c", "ab", "abc", "bcd", "d", "xyz"]
    assert reachable_pieces(vocab) == {"a", "b", "c", "d", "ab", "abc"}


def run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True)


def test_train_then_merge_then_report(real, tmp_path):
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join((real.corpus / "lunyu.txt").read_text(encoding="utf-8").splitlines()[:300]),
                      encoding="utf-8")
    r = run("tokenizer.train", "--input", corpus, "--model_prefix", tmp_path / "zh", "--vocab_size",
            "1500", "--model_type", "bpe", "--num_threads", "1")
    assert r.returncode == 0, r.stderr
    zh = proto(tmp_path / "zh.model")
    assert zh.normalizer_spec.name == "identity" and zh.trainer_spec.split_digits
    r = run("tokenizer.merge", "--llama_tokenizer_dir", real.base, "--chinese_sp_model_file",
            tmp_path / "zh.model", "--output_dir", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "merged" / "merge_manifest.json").read_text())["report"]
    assert report["with_digits"] == 0  # split_digits at training: nothing to defeat
    assert report["unreachable"] == 0  # a BPE model's pieces all have merge chains
    r = run("tokenizer.report", "--tokenizer", real.base, "--tokenizer", tmp_path / "merged",
            "--input", corpus)
    assert r.returncode == 0, r.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in r.stdout.splitlines()
            if line.startswith("| ") and "---" not in line]
    head, base_row, merged_row = rows
    assert head[2] == "tokens / 1k chars" and head[8] == "tokens vs first"
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    chars = sum(map(len, lines))
    for row, path in ((base_row, real.base), (merged_row, tmp_path / "merged" / "tokenizer.model")):
        proc = sp(path)
        ids = [i for row_ids in proc.encode(lines) for i in row_ids]
        assert float(row[2]) == pytest.approx(1000 * len(ids) / chars, abs=0.05)
        byte_share = sum(proc.is_byte(i) for i in ids) / len(ids)
        assert float(row[4].rstrip("%")) == pytest.approx(100 * byte_share, abs=0.05)
    assert base_row[8] == "1.000×" and float(merged_row[8].rstrip("×")) < 0.8  # Chinese: fewer tokens


def test_report_counts_by_hand(real, monkeypatch):
    from tokenizer import report
    from tokenizer.report import count, measure

    lines = ["我爱北京", "𠀀 x"]  # 𠀀 is in neither vocabulary: 4 byte-fallback tokens
    base = sp(real.base)
    assert count(base, lines) == (7, len(base.encode(lines[0])) + len(base.encode(lines[1])),
                                  sum(base.is_byte(i) for row in base.encode(lines) for i in row), 0)
    assert sum(base.is_byte(i) for i in base.encode("𠀀")) == 4
    # the speeds: characters over the median of each tokenizer's timings, the tokenizers
    # taking turns (encode, then decode) in every round; the clock is scripted here
    timings = iter([0.5, 4.0, 2.0, 1.0,  # round 1: base encode, decode; merged encode, decode
                    0.25, 2.0, 8.0, 3.0,  # round 2
                    1.0, 1.0, 4.0, 2.0])  # round 3
    monkeypatch.setattr(report, "_seconds", lambda fn: (fn(), next(timings))[1])
    stats = measure([str(real.base), str(real.out / "default")], lines, repeats=3)
    assert [s.vocab for s in stats] == [LLAMA_VOCAB, CHINESE_LLAMA_VOCAB] and stats[1].name == "default"
    assert stats[1].tokens < stats[0].tokens and stats[0].chars == stats[1].chars == 7
    medians = [(0.5, 2.0), (4.0, 2.0)]  # (encode, decode) seconds of base, merged
    assert [(s.encode_cps, s.decode_cps) for s in stats] == [(7 / e, 7 / d) for e, d in medians]
    assert next(timings, None) is None  # 3 rounds × 2 tokenizers × (encode, decode), no more


def test_bad_input(real, tmp_path):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"definitely not a protobuf \x00\xff")
    r = run("tokenizer.merge", "--llama_tokenizer_dir", junk, "--chinese_sp_model_file", real.zh,
            "--output_dir", tmp_path / "out")
    assert r.returncode != 0 and "junk.model: not a sentencepiece model" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = run("tokenizer.train", "--input", empty, "--model_prefix", tmp_path / "zh")
    assert r.returncode != 0 and "the corpus is empty" in r.stderr
    assert not list(tmp_path.glob("zh*")) and not list(tmp_path.glob(".zh*"))
    (tmp_path / "exists").mkdir()
    r = run("tokenizer.merge", "--llama_tokenizer_dir", real.base, "--chinese_sp_model_file", real.zh,
            "--output_dir", tmp_path / "exists")
    assert r.returncode != 0 and "already exists" in r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_train_shows_sentencepiece_log_only_when_asked(real, tmp_path):
    """sentencepiece's C++ trainer logs to the process's stderr: a failure prints our one
    `error:` line and nothing else, a success no log lines (stderr is not a terminal here,
    so no status line either), and --verbose shows the trainer's own log."""
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join((real.corpus / "lunyu.txt").read_text(encoding="utf-8").splitlines()[:300]),
                      encoding="utf-8")
    common = ("--input", corpus, "--num_threads", "1", "--model_type", "bpe")
    failed = run("tokenizer.train", *common, "--model_prefix", tmp_path / "a", "--vocab_size", "100000")
    assert failed.returncode == 1
    assert failed.stderr.splitlines() == [l for l in failed.stderr.splitlines() if l.startswith("error:")]
    assert len(failed.stderr.splitlines()) == 1 and "--vocab_size 100000 is too large" in failed.stderr
    quiet = run("tokenizer.train", *common, "--model_prefix", tmp_path / "b", "--vocab_size", "1500")
    assert quiet.returncode == 0 and quiet.stderr == "" and "wrote" in quiet.stdout
    verbose = run("tokenizer.train", *common, "--model_prefix", tmp_path / "c", "--vocab_size", "1500",
                  "--verbose")
    assert verbose.returncode == 0 and "trainer_interface.cc" in verbose.stderr
    b, c = (spm.SentencePieceProcessor(model_file=str(tmp_path / f"{n}.model")) for n in "bc")
    assert [b.id_to_piece(i) for i in range(b.vocab_size())] == [c.id_to_piece(i) for i in range(c.vocab_size())]
