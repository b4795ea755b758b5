"""The bad-input table: every command, fed what users and hostile testers feed it.

Each case runs a command (in-process through its `main(argv)`, or as a process where stdin
or signals matter) and asserts that it fails with a non-zero status and exactly one
`error:` line naming what was wrong, without a traceback, and that nothing was written or
changed: every file under the inputs hashes the same afterwards, and the case's output
directory holds nothing (no output, no temporaries). Malicious pickles planted where a
command reads .pth/.bin files would create a marker file if they ever ran.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import random_model
from tests.helpers import REPO, SHARED_DATA, require_shared

TOK = SHARED_DATA / "models" / "stories260K" / "tok512.model"  # 512 pieces, the tiny models' vocabulary
ZH_SP = SHARED_DATA / "tokenizers" / "chinese_sp.model"
LUNYU = SHARED_DATA / "corpus" / "lunyu.txt"
ALPACA = SHARED_DATA / "sft" / "alpaca_zh_demo.json"
STORIES = SHARED_DATA / "models" / "stories260K" / "stories260K.bin"
CMRC = SHARED_DATA / "corpus" / "cmrc2018_contexts.txt"


class _Exploit:
    """Unpickling this runs a shell command: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(path: Path, marker: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    torch.save({**(tensors or {"tok_embeddings.weight": torch.zeros(2, 2)}), "x": _Exploit(marker)},
               path, pickle_module=pickle)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, Path]:
    """Every input the table uses, good and bad, built once."""
    from model.adapters import write_peft_adapter
    from model.formats import read_checkpoint, write_hf, write_meta, write_model_dir
    from model.llama import named_args
    from model.lora import LoRAConfig, adapter_state_dict, apply_lora, save_adapter
    from model.source import from_state_dict

    require_shared(TOK, ZH_SP, LUNYU, ALPACA, STORIES, CMRC)
    root = tmp_path_factory.mktemp("inputs")
    p: dict[str, Path] = {"root": root, "marker": root / "PWNED", "tok": TOK, "zh_sp": ZH_SP,
                          "lunyu": LUNYU, "alpaca": ALPACA, "stories": STORIES}
    args = named_args("tiny")  # vocab 512, like tok512.model
    model = random_model(args)
    p["canon"] = write_model_dir(from_state_dict(model.state_dict(), args, TOK), root / "canon",
                                 progress=False)
    p["canon_notok"] = write_model_dir(from_state_dict(model.state_dict(), args), root / "canon_notok",
                                       progress=False)
    canon = read_checkpoint(p["canon"])
    p["hf"] = write_hf(canon, root / "hf", progress=False)
    p["meta"] = write_meta(canon, root / "meta", n_shards=2, progress=False)
    # Hugging Face directories whose model.safetensors is truncated, lies about its header
    # length, or has garbage for a header.
    st = (p["hf"] / "model.safetensors").read_bytes()
    n = int.from_bytes(st[:8], "little")
    for name, data in (("hf_truncated", st[: len(st) // 2]),
                       ("hf_lying", (10 * len(st)).to_bytes(8, "little") + st[8:]),
                       ("hf_garbage", st[:8] + b"{garbage" + b" " * (n - 8) + st[8 + n:])):
        d = _copy_dir(p["hf"], root / name)
        (d / "model.safetensors").write_bytes(data)
        p[name] = d
    d = _copy_dir(p["hf"], root / "hf_badconfig")
    (d / "config.json").write_text("{not json")
    p["hf_badconfig"] = d
    d = _copy_dir(p["hf"], root / "hf_noweights")
    (d / "model.safetensors").unlink()
    p["hf_noweights"] = d
    d = _copy_dir(p["hf"], root / "hf_evil")
    (d / "model.safetensors").unlink()
    _evil_pickle(d / "pytorch_model.bin", p["marker"])
    p["hf_evil"] = d
    # Meta directories: a planted pickle, a missing last shard, a corrupt and a truncated one
    d = _copy_dir(p["meta"], root / "meta_evil")
    (d / "checklist.chk").unlink()
    _evil_pickle(d / "consolidated.00.pth", p["marker"])
    p["meta_evil"] = d
    d = _copy_dir(p["meta"], root / "meta_missing")
    (d / "consolidated.01.pth").unlink()
    p["meta_missing"] = d
    d = _copy_dir(p["meta"], root / "meta_corrupt")
    data = bytearray((d / "consolidated.01.pth").read_bytes())
    data[-300] ^= 0xFF
    (d / "consolidated.01.pth").write_bytes(bytes(data))
    p["meta_corrupt"] = d
    d = _copy_dir(p["meta"], root / "meta_truncated")
    _truncate(d / "consolidated.01.pth")
    p["meta_truncated"] = d
    d = _copy_dir(p["meta"], root / "meta_noparams")
    (d / "params.json").unlink()
    p["meta_noparams"] = d
    d = _copy_dir(p["canon"], root / "canon_truncated")
    _truncate(d / "model.safetensors", 0.9)
    p["canon_truncated"] = d
    p["unknown"] = root / "unknown"
    p["unknown"].mkdir()
    (p["unknown"] / "notes.txt").write_text("hi")
    # adapters: ours, PEFT's (made from ours), and broken or hostile variants
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("wq", "wv"))
    lora_model = random_model(args)
    apply_lora(lora_model, cfg)
    with torch.no_grad():
        for name, t in lora_model.named_parameters():
            if name.endswith("lora_b"):
                t.normal_(0, 0.1)
    p["adapter"] = save_adapter(adapter_state_dict(lora_model, cfg), cfg, root / "adapter",
                                base_vocab_size=512, vocab_size=512, base_params=args.to_params())
    p["peft"] = write_peft_adapter(p["adapter"], root / "peft")
    d = _copy_dir(p["peft"], root / "peft_evil")
    (d / "adapter_model.safetensors").unlink()
    _evil_pickle(d / "adapter_model.bin", p["marker"],
                 {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)})
    p["peft_evil"] = d
    d = _copy_dir(p["adapter"], root / "adapter_evil")
    (d / "adapter_model.safetensors").unlink()
    _evil_pickle(d / "adapter_model.bin", p["marker"], {"layers.0.attention.wq.lora_a": torch.zeros(4, 64)})
    p["adapter_evil"] = d
    d = _copy_dir(p["adapter"], root / "adapter_badjson")
    (d / "adapter_config.json").write_text('{"r": 4,')
    p["adapter_badjson"] = d
    d = _copy_dir(p["adapter"], root / "adapter_truncated")
    _truncate(d / "adapter_model.safetensors")
    p["adapter_truncated"] = d
    # text inputs
    p["small_txt"] = root / "small.txt"
    p["small_txt"].write_bytes(LUNYU.read_bytes()[:3000].rsplit(b"\n", 1)[0] + b"\n")
    p["empty_txt"] = root / "empty.txt"
    p["empty_txt"].write_text("")
    p["latin1_txt"] = root / "latin1.txt"
    p["latin1_txt"].write_bytes("第一行\n".encode() + "caf\xe9 au lait\n".encode("latin-1"))
    p["csv"] = root / "table.csv"
    p["csv"].write_text("a,b\n")
    p["a_file"] = root / "a_file"  # outputs "under" it cannot be created
    p["a_file"].write_text("not a directory")
    p["garbage_model"] = root / "garbage.model"
    p["garbage_model"].write_bytes(b"\x00\x01garbage" * 50)
    p["truncated_model"] = root / "truncated.model"
    p["truncated_model"].write_bytes(TOK.read_bytes()[:5000])
    p["no_text_key"] = root / "docs.jsonl"
    p["no_text_key"].write_text('{"content": "子曰：学而时习之"}\n')
    p["bad_json"] = root / "bad.json"
    p["bad_json"].write_text('[{"instruction": "x", "output": "y"},')
    p["no_output"] = root / "no_output.json"
    p["no_output"].write_text(json.dumps([{"instruction": "说点什么", "input": ""}], ensure_ascii=False))
    p["existing"] = root / "existing"  # an output that exists already
    p["existing"].mkdir()
    (p["existing"] / "keep.txt").write_text("mine")
    p["existing_sp"] = root / "existing_sp"
    p["existing_sp"].mkdir()
    (p["existing_sp"] / "zh.model").write_text("mine")
    # token shards, and a copy whose second file lost its tail
    from data.prepare import main as prepare_main

    prepare_main(["--tokenizer", str(TOK), "--input", str(LUNYU), "--output_dir",
                  str(root / "tokens"), "--num_workers", "1", "--chunk_mb", "0.02"])
    p["tokens"] = root / "tokens"
    p["tokens_truncated"] = _copy_dir(p["tokens"], root / "tokens_truncated")
    shard = p["tokens_truncated"] / "tokens-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-1234])
    assert not p["marker"].exists()
    return p


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (symlinks not followed)."""
    out = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                f = Path(dirpath) / name
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _main(module: str) -> Callable[[list[str]], None]:
    import importlib

    return importlib.import_module(module).main


def check_failure(rc: int | str | None, stderr: str, words: tuple[str, ...]) -> None:
    """Non-zero exit, one `error:` line holding every key word, no traceback."""
    assert rc not in (0, None), f"accepted: {stderr}"
    assert "Traceback" not in stderr, stderr
    errors = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, stderr
    for w in words:
        assert w in errors[0], (w, errors[0])


def run_case(module: str, argv: list[str], words: tuple[str, ...], fx: dict[str, Path],
             out_root: Path, capfd) -> None:
    """Run `module.main(argv)` in this process; assert it failed cleanly and changed nothing."""
    before = tree_hashes(fx["root"], out_root)
    capfd.readouterr()
    rc: int | str | None = 0
    try:
        _main(module)(argv)
    except SystemExit as e:
        rc = e.code
    err = capfd.readouterr().err
    check_failure(rc, err, words)
    assert tree_hashes(fx["root"], out_root) == before, "an input or the output place changed"
    assert not fx["marker"].exists(), "planted code ran"


def fill(template: tuple[str, ...], fx: dict[str, Path], out: Path) -> list[str]:
    """Arguments with {name} replaced by fixture paths and {out} by the case's output."""
    names = {k: str(v) for k, v in fx.items()} | {"out": str(out)}
    return [a.format(**names) for a in template]


def case(name: str, *argv: str, words: tuple[str, ...] | str) -> pytest.param:
    return pytest.param(argv, (words,) if isinstance(words, str) else words, id=name)


def _table_test(module: str, cases: list, extra: tuple[str, ...] = ()):
    """One parametrised test running every case of a command's table."""

    @pytest.mark.parametrize("argv, words", cases)
    def test(argv, words, fx, tmp_path, capfd):
        out_root = tmp_path / "place"  # where the case's output would go: must stay empty
        out_root.mkdir()
        words = tuple(fill(words, fx, out_root / "out"))
        run_case(module, fill(argv + extra, fx, out_root / "out"), words, fx, out_root, capfd)
        assert not list(out_root.iterdir()), "output or temporaries left behind"

    return test


# ---------------------------------------------------------------------------------------
# tokenizer.train

TRAIN_TOKENIZER = [
    case("missing-input", "--input", "{root}/nope.txt", "--model_prefix", "{out}", words="nope.txt: no such input file"),
    case("glob-matches-nothing", "--input", "{root}/*.nothing", "--model_prefix", "{out}", words="*.nothing"),
    case("input-is-directory", "--input", "{root}", "--model_prefix", "{out}", words="no such input file"),
    case("empty-corpus", "--input", "{empty_txt}", "--model_prefix", "{out}", words="the corpus is empty"),
    case("vocab-size-zero", "--input", "{small_txt}", "--model_prefix", "{out}", "--vocab_size", "0",
         words=("--vocab_size", "positive integer")),
    case("vocab-size-text", "--input", "{small_txt}", "--model_prefix", "{out}", "--vocab_size", "lots",
         words=("--vocab_size", "'lots'")),
    case("vocab-size-too-large", "--input", "{small_txt}", "--model_prefix", "{out}", "--vocab_size", "5000",
         "--num_threads", "1", words=("--vocab_size 5000 is too large", "at most")),
    case("vocab-size-below-characters", "--input", "{small_txt}", "--model_prefix", "{out}",
         "--vocab_size", "20", "--num_threads", "1", words=("--vocab_size 20 is smaller", "--character_coverage")),
    case("coverage-above-one", "--input", "{small_txt}", "--model_prefix", "{out}",
         "--character_coverage", "1.5", words="--character_coverage"),
    case("coverage-too-low-for-sentencepiece", "--input", "{small_txt}", "--model_prefix", "{out}",
         "--character_coverage", "0.5", "--num_threads", "1", words=("--character_coverage 0.5", "requires")),
    case("max-sentence-length-tiny", "--input", "{small_txt}", "--model_prefix", "{out}",
         "--max_sentence_length", "5", "--num_threads", "1", words=("--max_sentence_length 5", "requires")),
    case("threads-zero", "--input", "{small_txt}", "--model_prefix", "{out}", "--num_threads", "0",
         words="--num_threads"),
    case("sentence-size-negative", "--input", "{small_txt}", "--model_prefix", "{out}",
         "--input_sentence_size", "-1", words="--input_sentence_size"),
    case("model-type-unknown", "--input", "{small_txt}", "--model_prefix", "{out}", "--model_type", "wordpiece",
         words="--model_type"),
    case("output-exists", "--input", "{small_txt}", "--model_prefix", "{existing_sp}/zh", words="already exists"),
    case("output-under-a-file", "--input", "{small_txt}", "--model_prefix", "{a_file}/zh", words=("a_file", "Errno")),
]
test_tokenizer_train = _table_test("tokenizer.train", TRAIN_TOKENIZER)

# ---------------------------------------------------------------------------------------
# tokenizer.merge

MERGE_TOKENIZER = [
    case("llama-missing", "--llama_tokenizer_dir", "{root}/none", "--chinese_sp_model_file", "{zh_sp}",
         "--output_dir", "{out}", words="none: no such sentencepiece model file"),
    case("llama-dir-without-model", "--llama_tokenizer_dir", "{unknown}", "--chinese_sp_model_file", "{zh_sp}",
         "--output_dir", "{out}", words="unknown/tokenizer.model"),
    case("chinese-garbage", "--llama_tokenizer_dir", "{tok}", "--chinese_sp_model_file", "{garbage_model}",
         "--output_dir", "{out}", words=("garbage.model", "not a sentencepiece model")),
    case("chinese-truncated", "--llama_tokenizer_dir", "{tok}", "--chinese_sp_model_file", "{truncated_model}",
         "--output_dir", "{out}", words=("truncated.model", "not a sentencepiece model")),
    case("chinese-empty-file", "--llama_tokenizer_dir", "{tok}", "--chinese_sp_model_file", "{empty_txt}",
         "--output_dir", "{out}", words=("empty.txt", "not a sentencepiece model")),
    case("llama-is-text", "--llama_tokenizer_dir", "{small_txt}", "--chinese_sp_model_file", "{zh_sp}",
         "--output_dir", "{out}", words=("small.txt", "not a sentencepiece model")),
    case("output-exists", "--llama_tokenizer_dir", "{tok}", "--chinese_sp_model_file", "{zh_sp}",
         "--output_dir", "{existing}", words="already exists"),
    case("output-under-a-file", "--llama_tokenizer_dir", "{tok}", "--chinese_sp_model_file", "{zh_sp}",
         "--output_dir", "{a_file}/merged", words=("a_file", "Errno")),
    case("unknown-scores", "--llama_tokenizer_dir", "{tok}", "--chinese_sp_model_file", "{zh_sp}",
         "--output_dir", "{out}", "--new_piece_scores", "best", words="--new_piece_scores"),
]
test_tokenizer_merge = _table_test("tokenizer.merge", MERGE_TOKENIZER)

# ---------------------------------------------------------------------------------------
# tokenizer.report (writes nothing)

REPORT = [
    case("tokenizer-missing", "--tokenizer", "{root}/none.model", "--input", "{small_txt}", words="none.model"),
    case("tokenizer-garbage", "--tokenizer", "{garbage_model}", "--input", "{small_txt}",
         words=("garbage.model", "not a sentencepiece model")),
    case("input-missing", "--tokenizer", "{tok}", "--input", "{root}/none.txt", words="none.txt: no such input file"),
    case("input-not-utf8", "--tokenizer", "{tok}", "--input", "{latin1_txt}", words=("latin1.txt", "not UTF-8")),
    case("input-empty", "--tokenizer", "{tok}", "--input", "{empty_txt}", words=("no text", "empty.txt")),
    case("repeats-zero", "--tokenizer", "{tok}", "--input", "{small_txt}", "--repeats", "0", words="--repeats"),
    case("no-tokenizer", "--input", "{small_txt}", words="--tokenizer"),
]
test_tokenizer_report = _table_test("tokenizer.report", REPORT)

# ---------------------------------------------------------------------------------------
# model.convert

CONVERT = [
    case("src-missing", "{root}/none", "{out}", "--to", "hf", words="none: no such file or directory"),
    case("unknown-format", "{unknown}", "{out}", "--to", "hf", words="unknown format"),
    case("hf-truncated-safetensors", "{hf_truncated}", "{out}", "--to", "zhllama",
         words=("hf_truncated/model.safetensors", "bytes short of what its header describes")),
    case("hf-header-length-lies", "{hf_lying}", "{out}", "--to", "zhllama",
         words=("hf_lying/model.safetensors", "header length field says")),
    case("hf-header-garbage", "{hf_garbage}", "{out}", "--to", "zhllama",
         words=("hf_garbage/model.safetensors", "header is not valid JSON")),
    case("hf-config-not-json", "{hf_badconfig}", "{out}", "--to", "zhllama", words=("config.json", "invalid JSON")),
    case("hf-no-weights", "{hf_noweights}", "{out}", "--to", "zhllama", words=("hf_noweights", "no weights found")),
    case("hf-evil-pytorch-model-bin", "{hf_evil}", "{out}", "--to", "zhllama",
         words=("pytorch_model.bin", "posix.system")),
    case("meta-evil-consolidated", "{meta_evil}", "{out}", "--to", "zhllama",
         words=("consolidated.00.pth", "posix.system")),
    case("meta-missing-shard", "{meta_missing}", "{out}", "--to", "zhllama", "--skip_checksum",
         words="consolidated.01.pth is missing"),
    case("meta-missing-shard-with-checklist", "{meta_missing}", "{out}", "--to", "zhllama",
         words=("consolidated.01.pth", "missing")),
    case("meta-corrupt-shard", "{meta_corrupt}", "{out}", "--to", "zhllama",
         words=("consolidated.01.pth", "md5 does not match")),
    case("meta-truncated-shard", "{meta_truncated}", "{out}", "--to", "zhllama", "--skip_checksum",
         words="consolidated.01.pth"),
    case("meta-params-missing", "{meta_noparams}", "{out}", "--to", "zhllama", words="params.json is missing"),
    case("canon-truncated", "{canon_truncated}", "{out}", "--to", "hf",
         words=("canon_truncated/model.safetensors", "bytes short")),
    case("llama2c-garbage", "{garbage_model}", "{out}", "--to", "zhllama", words="unknown format"),
    case("shards-zero", "{canon}", "{out}", "--to", "meta", "--shards", "0", words=("--shards", "positive integer")),
    case("shards-negative", "{canon}", "{out}", "--to", "meta", "--shards", "-1", words="--shards"),
    case("shards-uneven", "{canon}", "{out}", "--to", "meta", "--shards", "3",
         words=("3 equal shards", "--pad_vocab_to_multiple_of")),
    case("shards-for-hf", "{canon}", "{out}", "--to", "hf", "--shards", "2", words="--shards applies to --to meta"),
    case("pad-multiple-zero", "{canon}", "{out}", "--to", "meta", "--pad_vocab_to_multiple_of", "0",
         words="--pad_vocab_to_multiple_of"),
    case("max-shard-size-words", "{canon}", "{out}", "--to", "hf", "--max_shard_size", "lots",
         words=("--max_shard_size", "lots")),
    case("max-shard-size-zero", "{canon}", "{out}", "--to", "hf", "--max_shard_size", "0", words="--max_shard_size"),
    case("target-unknown", "{canon}", "{out}", "--to", "onnx", words="--to"),
    case("q8-not-gguf", "{canon}", "{out}", "--to", "zhllama", "--dtype", "q8_0", words="q8_0 is only for --to gguf"),
    case("tokenizer-missing", "{canon}", "{out}", "--to", "hf", "--tokenizer", "{root}/none.model",
         words="none.model"),
    case("dst-exists", "{canon}", "{existing}", "--to", "hf", words="already exists"),
    case("dst-under-a-file", "{canon}", "{a_file}/out", "--to", "hf", words=("a_file", "Errno 20")),
]
test_model_convert = _table_test("model.convert", CONVERT, ("--no_progress",))

# ---------------------------------------------------------------------------------------
# model.resize

RESIZE = [
    case("pad-multiple-zero", "{canon}", "--tokenizer", "{zh_sp}", "--output", "{out}", "--pad_to_multiple_of", "0",
         words=("--pad_to_multiple_of", "positive integer")),
    case("pad-multiple-negative", "{canon}", "--tokenizer", "{zh_sp}", "--output", "{out}",
         "--pad_to_multiple_of", "-64", words="--pad_to_multiple_of"),
    case("tokenizer-missing", "{canon}", "--tokenizer", "{root}/none.model", "--output", "{out}", words="none.model"),
    case("tokenizer-garbage", "{canon}", "--tokenizer", "{garbage_model}", "--output", "{out}",
         words="garbage.model"),
    case("tokenizer-does-not-extend", "{canon}", "--tokenizer", "{zh_sp}", "--output", "{out}",
         words="does not extend"),
    case("model-without-tokenizer", "{canon_notok}", "--tokenizer", "{zh_sp}", "--output", "{out}",
         words=("canon_notok", "tokenizer.model")),
    case("model-missing", "{root}/none", "--tokenizer", "{zh_sp}", "--output", "{out}", words="none"),
    case("model-evil", "{meta_evil}", "--tokenizer", "{zh_sp}", "--output", "{out}",
         words=("consolidated.00.pth", "posix.system")),
    case("model-truncated", "{canon_truncated}", "--tokenizer", "{zh_sp}", "--output", "{out}", words="bytes short"),
    case("init-unknown", "{canon}", "--tokenizer", "{zh_sp}", "--output", "{out}", "--init", "zeros", words="--init"),
    case("output-exists", "{canon}", "--tokenizer", "{zh_sp}", "--output", "{existing}", words="already exists"),
]
test_model_resize = _table_test("model.resize", RESIZE, ("--no_progress",))

# ---------------------------------------------------------------------------------------
# model.merge_lora

MERGE_LORA = [
    case("adapter-missing", "--base_model", "{canon}", "--lora_model", "{root}/none", "--output_type", "zhllama",
         "--output_dir", "{out}", words="none"),
    case("adapter-names-nothing", "--base_model", "{canon}", "--lora_model", ",", "--output_type", "zhllama",
         "--output_dir", "{out}", words="--lora_model"),
    case("peft-evil-bin", "--base_model", "{canon}", "--lora_model", "{peft_evil}", "--output_type", "zhllama",
         "--output_dir", "{out}", words=("adapter_model.bin", "posix.system")),
    case("base-evil-bin", "--base_model", "{hf_evil}", "--lora_model", "{adapter}", "--output_type", "zhllama",
         "--output_dir", "{out}", words=("pytorch_model.bin", "posix.system")),
    case("adapter-config-not-json", "--base_model", "{canon}", "--lora_model", "{adapter_badjson}",
         "--output_type", "zhllama", "--output_dir", "{out}", words=("adapter_config.json", "JSON")),
    case("adapter-truncated", "--base_model", "{canon}", "--lora_model", "{adapter_truncated}",
         "--output_type", "zhllama", "--output_dir", "{out}", words="adapter_model.safetensors"),
    case("base-truncated-safetensors", "--base_model", "{hf_truncated}", "--lora_model", "{adapter}",
         "--output_type", "zhllama", "--output_dir", "{out}", words="bytes short of what its header describes"),
    case("shards-zero", "--base_model", "{canon}", "--lora_model", "{adapter}", "--output_type", "pth",
         "--output_dir", "{out}", "--shards", "0", words="--shards"),
    case("pad-multiple-zero", "--base_model", "{canon}", "--lora_model", "{adapter}", "--output_type", "pth",
         "--output_dir", "{out}", "--pad_vocab_to_multiple_of", "0", words="--pad_vocab_to_multiple_of"),
    case("output-type-unknown", "--base_model", "{canon}", "--lora_model", "{adapter}", "--output_type", "onnx",
         "--output_dir", "{out}", words="--output_type"),
    case("max-shard-size-words", "--base_model", "{canon}", "--lora_model", "{adapter}", "--output_type",
         "zhllama", "--output_dir", "{out}", "--max_shard_size", "big", words="--max_shard_size"),
    case("output-exists", "--base_model", "{canon}", "--lora_model", "{adapter}", "--output_type", "zhllama",
         "--output_dir", "{existing}", words="already exists"),
    case("base-missing", "--base_model", "{root}/none", "--lora_model", "{adapter}", "--output_type", "zhllama",
         "--output_dir", "{out}", words="none"),
    case("base-missing-shard", "--base_model", "{meta_missing}", "--lora_model", "{adapter}", "--output_type",
         "zhllama", "--output_dir", "{out}", words="consolidated.01.pth"),
]
test_model_merge_lora = _table_test("model.merge_lora", MERGE_LORA, ("--no_progress",))

# ---------------------------------------------------------------------------------------
# model.adapters

ADAPTERS = [
    case("adapter-missing", "{root}/none", "{out}", words="none"),
    case("not-ours", "{peft}", "{out}", words=("peft", "not a zhllama adapter")),
    case("config-not-json", "{adapter_badjson}", "{out}", words=("adapter_config.json", "JSON")),
    case("weights-truncated", "{adapter_truncated}", "{out}", words=("adapter_model.safetensors", "bytes short")),
    case("evil-bin", "{adapter_evil}", "{out}", words=("adapter_model.bin", "posix.system")),
    case("output-exists", "{adapter}", "{existing}", words="already exists"),
    case("format-unknown", "{adapter}", "{out}", "--format", "lycoris", words="--format"),
    case("output-under-a-file", "{adapter}", "{a_file}/peft", words=("a_file", "Errno")),
]
test_model_adapters = _table_test("model.adapters", ADAPTERS)

# ---------------------------------------------------------------------------------------
# model.generate (writes nothing)

GENERATE = [
    case("model-missing", "{root}/none", "--prompt", "hi", words="none"),
    case("device-unknown", "{canon}", "--prompt", "hi", "--device", "tpu", words=("--device tpu", "not a device")),
    case("device-index-bad", "{canon}", "--prompt", "hi", "--device", "cuda:x", words="--device cuda:x"),
    case("max-new-tokens-zero", "{canon}", "--max_new_tokens", "0", words="--max_new_tokens"),
    case("temperature-negative", "{canon}", "--temperature", "-1", words="--temperature"),
    case("temperature-nan", "{canon}", "--temperature", "nan", words="--temperature"),
    case("top-p-zero", "{canon}", "--top_p", "0", words="--top_p"),
    case("top-p-above-one", "{canon}", "--top_p", "1.5", words="--top_p"),
    case("top-k-zero", "{canon}", "--top_k", "0", words="--top_k"),
    case("repetition-penalty-zero", "{canon}", "--repetition_penalty", "0", words="--repetition_penalty"),
    case("template-unknown", "{canon}", "--template", "vicuna", words="--template"),
    case("dtype-unknown", "{canon}", "--dtype", "int4", words="--dtype"),
    case("no-tokenizer", "{canon_notok}", "--prompt", "hi", words=("canon_notok", "--tokenizer")),
    case("tokenizer-garbage", "{canon_notok}", "--tokenizer", "{garbage_model}", words="garbage.model"),
    case("prompt-too-long", "{canon}", "--prompt", "hello " * 300, words="max_seq_len"),
    case("model-evil", "{meta_evil}", "--prompt", "hi", words=("consolidated.00.pth", "posix.system")),
    case("model-truncated", "{hf_truncated}", "--prompt", "hi", words="bytes short"),
    case("llama2c-without-tokenizer", "{stories}", "--prompt", "hi", words="--tokenizer"),
    # adapters applied live are read and checked as model.merge_lora reads them
    case("adapter-missing", "{canon}", "--lora_model", "{root}/none", "--prompt", "hi", words="none"),
    case("adapter-names-nothing", "{canon}", "--lora_model", ",", "--prompt", "hi", words="--lora_model"),
    case("adapter-evil-bin", "{canon}", "--lora_model", "{peft_evil}", "--prompt", "hi",
         words=("adapter_model.bin", "posix.system")),
    case("adapter-truncated", "{canon}", "--lora_model", "{adapter_truncated}", "--prompt", "hi",
         words="adapter_model.safetensors"),
]
if not torch.cuda.is_available():
    GENERATE.append(case("device-cuda-without-cuda", "{canon}", "--prompt", "hi", "--device", "cuda",
                         words=("--device cuda", "CUDA is not available")))
test_model_generate = _table_test("model.generate", GENERATE)

# ---------------------------------------------------------------------------------------
# data.prepare

_P = ("--tokenizer", "{tok}", "--num_workers", "1")
PREPARE = [
    case("tokenizer-missing", "--tokenizer", "{root}/none.model", "--input", "{small_txt}", "--output_dir", "{out}",
         words="none.model"),
    case("tokenizer-garbage", "--tokenizer", "{garbage_model}", "--input", "{small_txt}", "--output_dir", "{out}",
         words=("garbage.model", "not a sentencepiece model")),
    case("input-missing", *_P, "--input", "{root}/none.txt", "--output_dir", "{out}", words="none.txt: no such input"),
    case("glob-matches-nothing", *_P, "--input", "{root}/*.nothing", "--output_dir", "{out}",
         words="matches no file"),
    case("input-is-directory", *_P, "--input", "{unknown}", "--output_dir", "{out}", words="is a directory"),
    case("input-type-unknown", *_P, "--input", "{csv}", "--output_dir", "{out}", words=("table.csv", "unsupported")),
    case("input-not-utf8", *_P, "--input", "{latin1_txt}", "--output_dir", "{out}",
         words=("latin1.txt:2", "not valid UTF-8")),
    case("input-empty", *_P, "--input", "{empty_txt}", "--output_dir", "{out}", words="empty"),
    case("jsonl-without-text-key", *_P, "--input", "{no_text_key}", "--output_dir", "{out}",
         words=("docs.jsonl", "text")),
    case("workers-zero", "--tokenizer", "{tok}", "--input", "{small_txt}", "--output_dir", "{out}",
         "--num_workers", "0", words="--num_workers"),
    case("chunk-zero", *_P, "--input", "{small_txt}", "--output_dir", "{out}", "--chunk_mb", "0",
         words="--chunk_mb"),
    case("chunk-inf", *_P, "--input", "{small_txt}", "--output_dir", "{out}", "--chunk_mb", "inf",
         words="--chunk_mb"),
    case("sft-max-seq-length-zero", *_P, "--sft", "--input", "{alpaca}", "--output_dir", "{out}",
         "--max_seq_length", "0", words="--max_seq_length"),
    case("sft-bad-json", *_P, "--sft", "--input", "{bad_json}", "--output_dir", "{out}", words="bad.json"),
    case("sft-missing-field", *_P, "--sft", "--input", "{no_output}", "--output_dir", "{out}",
         words=("no_output.json", "output")),
    case("sft-field-map-malformed", *_P, "--sft", "--input", "{alpaca}", "--output_dir", "{out}",
         "--field_map", "instruction", words="--field_map"),
    case("sft-template-unknown", *_P, "--sft", "--input", "{alpaca}", "--output_dir", "{out}",
         "--template", "vicuna", words="--template"),
    case("errors-unknown", *_P, "--input", "{small_txt}", "--output_dir", "{out}", "--errors", "ignore",
         words="--errors"),
    case("output-exists", *_P, "--input", "{small_txt}", "--output_dir", "{existing}", words="already exists"),
    case("output-under-a-file", *_P, "--input", "{small_txt}", "--output_dir", "{a_file}/tokens",
         words=("a_file", "Errno")),
]
test_data_prepare = _table_test("data.prepare", PREPARE)


# ---------------------------------------------------------------------------------------
# what needs a process of its own: stdin, signals, the training scripts

def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def run_process(args: list[str], stdin: bytes = b"", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, cwd=REPO,
                          env=_env(), timeout=timeout)


def test_generate_interactive_stdin_not_utf8(fx):
    before = tree_hashes(fx["root"])
    r = run_process(["-m", "model.generate", str(fx["canon"]), "--interactive", "--max_new_tokens", "2"],
                    stdin="子曰\n".encode() + b"caf\xe9\n")
    check_failure(r.returncode, r.stderr.decode(), ("stdin line 2", "not UTF-8", "0xe9"))
    assert tree_hashes(fx["root"]) == before


def test_ctrl_c_in_interactive_generate(fx):
    """SIGINT while waiting for a prompt: one line, status 130, no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "model.generate", str(fx["canon"]), "--interactive"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=REPO, env=_env())
    try:
        # the prompt line on stderr says the model is loaded and stdin is being read
        line = p.stderr.readline()
        assert b"Enter a prompt" in line, line
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)  # stdin stays open: the interrupt, not an end of input, must stop it
        err = p.stderr.read().decode()
    finally:
        if p.poll() is None:
            p.kill()
        p.stdin.close()
        p.stdout.close()
        p.stderr.close()
    assert p.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted"], err


def test_ctrl_c_in_parallel_data_prepare(fx, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, workers included) in the middle of a
    parallel prepare: one line, status 130, no output and no temporaries left."""
    corpus = CMRC
    out = tmp_path / "tokens"
    p = subprocess.Popen([sys.executable, "-m", "data.prepare", "--tokenizer", str(TOK), "--input",
                          *[str(corpus)] * 4, "--output_dir", str(out), "--num_workers", "2",
                          "--chunk_mb", "0.05"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=_env(),
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".tokens.tmp-*")) and p.poll() is None:  # the work has begun
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        assert p.poll() is None, "finished before it could be interrupted"
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    err = err.decode()
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    assert not list(tmp_path.iterdir()), "output or temporaries left behind"


def _train_config(fx, tmp_path: Path, **changes) -> Path:
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "tiny" / "stage1.yaml").read_text())
    cfg["stage"] = "full"
    cfg["model"]["path"] = str(fx["canon"])
    cfg["data"]["path"] = str(fx["tokens"])
    cfg["output_dir"] = str(tmp_path / "run")
    cfg["optim"]["max_steps"] = 2
    cfg["checkpoint"]["every"] = 0
    cfg["log"]["eval_every"] = 0
    for key, value in changes.items():
        section, _, name = key.partition(".")
        cfg[section][name] = value
    out = tmp_path / "cfg.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.parametrize("how, words", [
    ("unknown-key", ("optim.learning_rate",)),
    ("wrong-type", ("optim.max_steps",)),
    ("missing-config", ("none.yaml",)),
    ("truncated-token-shard", ("tokens-00001.bin", "1,234 bytes short of its index")),
])
def test_pretrain_bad_config(how, words, fx, tmp_path):
    cfg = _train_config(fx, tmp_path, **({"data.path": str(fx["tokens_truncated"])}
                                          if how == "truncated-token-shard" else {}))
    extra = {"unknown-key": ["--optim.learning_rate=1e-3"], "wrong-type": ["--optim.max_steps=many"]}.get(how, [])
    config = str(tmp_path / "none.yaml") if how == "missing-config" else str(cfg)
    before = tree_hashes(fx["root"])
    r = run_process([str(REPO / "train" / "pretrain.py"), config, *extra], timeout=180)
    check_failure(r.returncode, r.stderr.decode(), words)
    assert tree_hashes(fx["root"]) == before
    assert not (tmp_path / "run" / "model").exists()


# ---------------------------------------------------------------------------------------
# faults of the output filesystem, and the wrapper itself

def test_full_disk_names_the_output(fx, tmp_path, capfd, monkeypatch):
    """A write() that fails with ENOSPC (the OS names no file): the output is named."""
    import model.tensor_io as tensor_io

    real_open = open

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(tensor_io, "open", lambda path, mode="r", *a, **k:
                        FullFile(real_open(path, mode, *a, **k)) if "w" in mode else real_open(path, mode, *a, **k),
                        raising=False)
    out = tmp_path / "place"
    out.mkdir()
    run_case("model.convert", [str(fx["canon"]), str(out / "hf"), "--to", "hf", "--no_progress"],
             (f"writing {out / 'hf'}", "[Errno 28] No space left on device"), fx, out, capfd)
    assert not list(out.iterdir())


def test_read_only_output_names_path_and_errno(fx, tmp_path, capfd, monkeypatch):
    """EROFS from creating the temporary directory (a read-only mount, simulated)."""
    import tempfile

    def refuse(*a, dir=None, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    out = tmp_path / "place"
    out.mkdir()
    run_case("data.prepare", ["--tokenizer", str(TOK), "--input", str(fx["small_txt"]), "--output_dir",
                              str(out / "tokens"), "--num_workers", "1"],
             (str(out), "[Errno 30] Read-only file system"), fx, out, capfd)
    assert not list(out.iterdir())


def test_wrapper_messages(monkeypatch, capsys):
    from tokenizer.cli import command_errors, run_command

    def fail(e: BaseException):
        raise e

    cases = [
        (ValueError("bad value"), 1, "error: bad value"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "in/x"), 1,
         "error: in/x: [Errno 2] No such file or directory"),
        (OSError(errno.EROFS, "Read-only file system", "runs/out"), 1,
         "error: runs/out: [Errno 30] Read-only file system"),
        (PermissionError(errno.EACCES, "Permission denied", "a", None, "b"), 1, "error: a -> b: [Errno 13] Permission denied"),
        (pickle.UnpicklingError("Weights only load failed.\n\nUnsupported global: GLOBAL posix.system was not "
                                "an allowed global"), 1, "error: refused to unpickle: it tries to load posix.system"),
        (UnicodeDecodeError("utf-8", b"a\xff", 1, 2, "invalid start byte"), 1,
         "error: cannot decode input as utf-8: byte 0xff at offset 1"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (KeyboardInterrupt("interrupted at step 37; the run resumes from step-30"), 130,
         "interrupted at step 37; the run resumes from step-30"),
        (RuntimeError("boom\nsecond line"), 1, "error: unexpected RuntimeError: boom second line"),
    ]
    monkeypatch.delenv("ZHLLAMA_TRACEBACK", raising=False)
    for exc, status, line in cases:
        with pytest.raises(SystemExit) as e:
            run_command(fail, exc, output="runs/out")
        assert e.value.code == status, exc
        err = capsys.readouterr().err
        assert err.splitlines()[0].startswith(line), (err, line)
        assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        run_command(fail, RuntimeError("boom"))
    assert "ZHLLAMA_TRACEBACK=1" in capsys.readouterr().err
    monkeypatch.setenv("ZHLLAMA_TRACEBACK", "1")  # for debugging: every failure raised as is
    with pytest.raises(RuntimeError, match="boom"), command_errors():
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="known"), command_errors():
        raise ValueError("known")
    with pytest.raises(SystemExit) as e, command_errors():  # exits stay exits
        raise SystemExit(3)
    assert e.value.code == 3
    assert run_command(lambda x: x + 1, 1) == 2


def test_truncated_token_shard_is_named(fx):
    from data.datasets import PackedBlocks
    from data.shards import DataError

    with pytest.raises(DataError, match=r"tokens-00001\.bin: 1,234 bytes short of its index"):
        PackedBlocks(fx["tokens_truncated"], block_size=16)
    PackedBlocks(fx["tokens"], block_size=16)  # the intact copy opens


def test_table_size():
    """The issue asks for at least 80 bad inputs across the commands."""
    tables = [TRAIN_TOKENIZER, MERGE_TOKENIZER, REPORT, CONVERT, RESIZE, MERGE_LORA, ADAPTERS, GENERATE, PREPARE]
    assert sum(map(len, tables)) >= 80
