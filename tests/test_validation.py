"""Untrusted JSON checked key by key, shapes against headers, and vocabularies that agree.

Every case breaks one thing in a real file (stories260K and its tokenizer, shards of the
real corpus) and asserts the message names the file and the key or tensor, not just that
something failed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from data.prepare import PrepareOptions, prepare
from data.sft import SFTPreparer
from data.shards import DataError, max_token_id, read_meta
from data.text import TextPreparer
from model import llama
from model.adapters import read_adapter_weights, write_peft_adapter
from model.source import (
    BASE_FINGERPRINT_TENSORS, check_tokenizer_rows, from_state_dict, is_padding, load_model,
    tensor_fingerprint,
)
from model.convert import convert
from model.formats import read_checkpoint, write_hf, write_meta, write_model_dir
from model.llama import named_args
from model.lora import LoRAConfig, adapter_state_dict, apply_lora, lora_modules, read_adapter, save_adapter
from model.merge_lora import merge
from model.resize import resize_checkpoint
from model.tensor_io import FormatError
from tests.conftest import random_model
from tests.helpers import SHARED_DATA, require_shared
from tokenizer.files import sha256_file
from tokenizer.schema import Field, check_fields

REPO = Path(__file__).resolve().parents[1]
STORIES = SHARED_DATA / "models" / "stories260K"
TOK512 = STORIES / "tok512.model"
LLAMA_TOK = SHARED_DATA / "tokenizers" / "llama_tokenizer.model"
LUNYU = SHARED_DATA / "corpus" / "lunyu.txt"
ALPACA = SHARED_DATA / "sft" / "alpaca_zh_demo.json"


@pytest.fixture(scope="module")
def real(stories260k, tmp_path_factory) -> SimpleNamespace:
    """stories260K as a model directory (the session's, read only), Hugging Face export, our
    adapter and its PEFT form, and token shards of the real corpus (pretraining and SFT), made once."""
    require_shared(STORIES / "stories260K.bin", TOK512, LLAMA_TOK, LUNYU, ALPACA)
    root = tmp_path_factory.mktemp("real")
    ckpt = read_checkpoint(stories260k, progress=False)
    write_hf(ckpt, root / "hf", max_shard_bytes=300_000, progress=False)  # sharded, with an index
    write_model_dir(ckpt, root / "sharded", max_shard_bytes=300_000, progress=False)
    model = load_model(ckpt)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("wq", "wv"))
    apply_lora(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_b.normal_(0, 0.05)
    save_adapter(adapter_state_dict(model, cfg), cfg, root / "adapter", base_vocab_size=512,
                 vocab_size=512, tokenizer=ckpt.tokenizer, base=ckpt)
    write_peft_adapter(root / "adapter", root / "peft")
    for name, src, preparer in (("tokens", LUNYU, TextPreparer()),
                                ("sft", ALPACA, SFTPreparer(max_seq_length=256))):
        prepare(PrepareOptions(TOK512, (str(src),), root / name, preparer, num_workers=1))
    return SimpleNamespace(root=root, base=stories260k, hf=root / "hf", sharded=root / "sharded",
                           adapter=root / "adapter", peft=root / "peft", tokens=root / "tokens",
                           sft=root / "sft", ckpt=ckpt)


def edit_json(path: Path, change) -> None:
    """Apply `change` (a dict of keys to set, or a function of the parsed object) in place."""
    data = json.loads(path.read_text())
    if callable(change):
        change(data)
    else:
        data.update(change)
    path.write_text(json.dumps(data))  # NaN and Infinity are written as JSON's extensions


def tampered(src: Path, dst: Path, file: str, change) -> Path:
    shutil.copytree(src, dst)
    edit_json(dst / file, change)
    return dst


@pytest.fixture
def no_modules(monkeypatch):
    """Fail the test if anything builds a Transformer (a huge one would allocate)."""
    def refuse(self, args):
        raise AssertionError(f"a model was built for {args}")
    monkeypatch.setattr(llama.Transformer, "__init__", refuse)


# --------------------------------------------------------------------------------------
# the helper itself


def test_check_fields_reports_the_first_bad_key_with_its_path():
    table = {"a": Field("integer", min=1), "b": Field("object", fields={"c": Field("list", items=Field("number"))})}
    assert check_fields({"a": 1, "b": {"c": [1, 2.5]}}, table) == {"a": 1, "b": {"c": [1, 2.5]}}
    for obj, message in [({"a": True, "b": {}}, "f.json: a: expected an integer, got true"),
                         ({"a": 1}, "f.json: b: missing"),
                         ({"a": 1, "b": {"c": [1, "x"]}}, 'f.json: b.c[1]: expected a number, got "x"'),
                         ({"a": 1, "b": {"c": [float("-inf")]}}, "b.c[0]: expected a finite number"),
                         ([1], "f.json: expected a JSON object, got [1]")]:
        with pytest.raises(DataError, match=re.escape(message)):
            check_fields(obj, table, "f.json", DataError)


# --------------------------------------------------------------------------------------
# params.json


@pytest.mark.parametrize("key, value, message", [
    ("norm_eps", "abc", 'norm_eps: expected a number, got "abc"'),
    ("dim", [64], "dim: expected an integer, got [64]"),
    ("dim", None, "dim: expected an integer, got null"),
    ("n_layers", True, "n_layers: expected an integer, got true"),
    ("n_layers", 1e9, "n_layers: expected an integer, got 1000000000.0"),
    ("n_heads", 0, "n_heads: expected at least 1, got 0"),
    ("vocab_size", -5, "vocab_size: expected at least 1, got -5"),
    ("multiple_of", -4, "multiple_of: expected at least 1, got -4"),
    ("rope_theta", float("nan"), "rope_theta: expected a finite number, got NaN"),
    ("norm_eps", float("inf"), "norm_eps: expected a finite number, got Infinity"),
    ("max_seq_len", 0, "max_seq_len: expected at least 1, got 0"),
    ("ffn_dim_multiplier", "1.3", 'ffn_dim_multiplier: expected a number, got "1.3"'),
    ("n_kv_heads", 3, "n_heads 8 is not a multiple of n_kv_heads 3"),
    ("n_heads", 7, "dim 64 is not divisible by n_heads 7"),
    ("layers", 5, "unknown key(s) ['layers']"),
])
def test_params_json_per_key(real, tmp_path, no_modules, key, value, message):
    bad = tampered(real.base, tmp_path / "m", "params.json", {key: value})
    with pytest.raises(FormatError) as e:
        read_checkpoint(bad, progress=False)
    assert "params.json" in str(e.value) and message in str(e.value), e.value


@pytest.mark.parametrize("fmt", ["zhllama", "meta"])
def test_a_billion_layers_is_refused_from_the_headers(real, tmp_path, no_modules, fmt):
    """Refused by the first tensor the file lacks, with no model built (a real one would
    take hundreds of gigabytes)."""
    src = real.base
    if fmt == "meta":
        write_meta(real.ckpt, tmp_path / "meta", progress=False)
        src = tmp_path / "meta"
    bad = tampered(src, tmp_path / "bad", "params.json", {"n_layers": 1_000_000_000})
    with pytest.raises(FormatError) as e:
        read_checkpoint(bad, progress=False)
    assert "tensor layers.5.attention.wq.weight is missing" in str(e.value)
    assert "params.json n_layers 1000000000 implies 9,000,000,003 tensors" in str(e.value)
    # Meta's own files say vocab_size -1: resolved from the embedding's header
    wide = tampered(src, tmp_path / "wide", "params.json",
                    {"dim": 4096, **({"vocab_size": -1} if fmt == "meta" else {})})
    with pytest.raises(FormatError) as e:
        read_checkpoint(wide, progress=False)
    if fmt == "meta":  # the shard count the width implies is checked first
        assert "params.json's dim 4096" in str(e.value)
    else:
        assert ("tensor tok_embeddings.weight has shape [512, 64] but the model's parameters "
                "say [512, 4096]") in str(e.value)


# --------------------------------------------------------------------------------------
# config.json and weight indexes


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", "64", 'hidden_size: expected an integer, got "64"'),
    ("num_hidden_layers", 1_000_000_000, "tensor layers.5.attention.wq.weight is missing "
                                         "(config.json num_hidden_layers 1000000000 implies"),
    ("num_hidden_layers", False, "num_hidden_layers: expected an integer, got false"),
    ("rms_norm_eps", -1e-5, "rms_norm_eps: expected a number above 0"),
    ("num_key_value_heads", 3, "n_heads 8 is not a multiple of n_kv_heads 3"),
    ("num_attention_heads", 6, "head_dim 8 != hidden_size / num_attention_heads (64 / 6)"),
    ("tie_word_embeddings", "yes", 'tie_word_embeddings: expected true or false, got "yes"'),
    ("vocab_size", 0, "vocab_size: expected at least 1, got 0"),
    ("intermediate_size", [172], "intermediate_size: expected an integer, got [172]"),
    ("max_position_embeddings", 2.5, "max_position_embeddings: expected an integer, got 2.5"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": "x"},
     'rope_parameters.rope_theta: expected a number, got "x"'),
    ("head_dim", 16, "head_dim 16 != hidden_size / num_attention_heads"),
])
def test_config_json_per_key(real, tmp_path, no_modules, key, value, message):
    bad = tampered(real.hf, tmp_path / "hf", "config.json", {key: value})
    with pytest.raises(FormatError) as e:
        read_checkpoint(bad, progress=False)
    assert "config.json" in str(e.value) and message in str(e.value), e.value


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors",
                                    ["model-00001-of-00002.safetensors"]])
@pytest.mark.parametrize("fmt", ["hf", "sharded"])
def test_weight_index_paths_stay_inside_the_model_directory(real, tmp_path, fmt, target):
    def point_away(index):
        first = next(iter(index["weight_map"]))
        index["weight_map"][first] = target

    src = real.hf if fmt == "hf" else real.sharded
    bad = tampered(src, tmp_path / "m", "model.safetensors.index.json", point_away)
    with pytest.raises(FormatError) as e:
        read_checkpoint(bad, progress=False)
    assert "model.safetensors.index.json: weight_map." in str(e.value), e.value
    assert ("outside the model directory" if isinstance(target, str) else
            "expected a file name") in str(e.value)


def test_pytorch_bin_index_paths_are_confined_too(real, tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    shutil.copy(real.hf / "config.json", d)
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "../secrets/pytorch_model.bin"}}))
    with pytest.raises(FormatError, match=r"pytorch_model\.bin\.index\.json: weight_map\.model\.embed_tokens"
                                          r"\.weight: '\.\./secrets/pytorch_model\.bin' lies outside"):
        read_checkpoint(d, progress=False)


# --------------------------------------------------------------------------------------
# adapter_config.json


@pytest.mark.parametrize("key, value, message", [
    ("r", "4", 'r: expected an integer, got "4"'),
    ("r", 0, "r: expected at least 1, got 0"),
    ("r", 4.0, "r: expected an integer, got 4.0"),
    ("alpha", True, "alpha: expected a number, got true"),
    ("alpha", float("nan"), "alpha: expected a finite number, got NaN"),
    ("alpha", 0, "alpha: expected a number above 0, got 0"),
    ("targets", "wq", 'targets: expected a list, got "wq"'),
    ("dropout", 2, "dropout: expected at most 1, got 2"),
    ("vocab_size", -1, "vocab_size: expected at least 1, got -1"),
    ("base_params", {"dim": "64", "n_layers": 5, "n_heads": 8}, 'base_params.dim: expected an integer'),
    ("base_tensors_sha256", 5, "base_tensors_sha256: expected a string, got 5"),
    ("format_version", 2, "format_version: expected one of 1, got 2"),
])
def test_our_adapter_config_per_key(real, tmp_path, key, value, message):
    bad = tampered(real.adapter, tmp_path / "a", "adapter_config.json", {key: value})
    for read in (lambda: read_adapter_weights(bad, 8, 4), lambda: read_adapter(bad)):
        with pytest.raises(FormatError) as e:
            read()
        assert "adapter_config.json" in str(e.value) and message in str(e.value), e.value


def test_adapter_rank_checked_against_its_tensors(real, tmp_path):
    bad = tampered(real.adapter, tmp_path / "a", "adapter_config.json", {"r": 8})
    pattern = r"adapter_config\.json: r: 8, but tensor layers\.\d\.attention\.w[qv]\.lora_[ab] has shape"
    with pytest.raises(FormatError, match=pattern):
        read_adapter_weights(bad, 8, 4)
    with pytest.raises(FormatError, match=pattern):
        read_adapter(bad)  # what load_adapter reads, before any module is touched
    with pytest.raises(FormatError, match=pattern):
        write_peft_adapter(bad, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("key, value, message", [
    ("r", 2.5, "r: expected an integer, got 2.5"),
    ("r", 8, r"r: 8, but tensor base_model\.model\.model\.layers\.\d\.self_attn"
             r"\.[qv]_proj\.lora_[AB]\.weight has shape"),
    ("rank_pattern", {"q_proj": 0}, r"rank_pattern\.q_proj: expected at least 1, got 0"),
    ("rank_pattern", {"q_proj": 8}, r"rank_pattern\.q_proj: 8, but tensor .*q_proj\.lora_[AB]"),
    ("lora_alpha", "16", 'lora_alpha: expected a number, got "16"'),
    ("lora_alpha", None, "lora_alpha: expected a number, got null"),
    ("use_dora", "no", 'use_dora: expected true or false, got "no"'),
    ("modules_to_save", "embed_tokens", 'modules_to_save: expected a list, got "embed_tokens"'),
])
def test_peft_adapter_config_per_key(real, tmp_path, key, value, message):
    bad = tampered(real.peft, tmp_path / "p", "adapter_config.json", {key: value})
    with pytest.raises(FormatError, match="adapter_config.json: " + message):
        read_adapter_weights(bad, 8, 4)


# --------------------------------------------------------------------------------------
# meta.json of token shards


def _set(path: str, value):
    def change(meta):
        *keys, last = path.split(".")
        target = meta
        for k in keys:
            target = target[int(k)] if isinstance(target, list) else target[k]
        target[last] = value
    return change


@pytest.mark.parametrize("data, change, message", [
    ("tokens", _set("vocab_size", "512"), 'vocab_size: expected an integer, got "512"'),
    ("tokens", _set("vocab_size", True), "vocab_size: expected an integer, got true"),
    ("tokens", _set("kind", "chat"), 'kind: expected one of "pretrain", "sft", got "chat"'),
    ("tokens", _set("dtype", "float32"), 'dtype: expected one of "uint16", "uint32", got "float32"'),
    ("tokens", _set("num_tokens", -1), "num_tokens: expected at least 0, got -1"),
    ("tokens", _set("num_tokens", 5), "num_tokens: 5, but its files add up to"),
    ("tokens", _set("files", {}), "files: expected a list, got {}"),
    ("tokens", _set("files.0.num_tokens", -3), "files[0].num_tokens: expected at least 0, got -3"),
    ("tokens", _set("files.0.tokens", "../../etc/passwd"),
     'files[0].tokens: "../../etc/passwd" is not a file name inside the token directory'),
    ("tokens", _set("files.0.index", "/etc/passwd"), 'files[0].index: "/etc/passwd" is not a file name'),
    ("tokens", _set("tokenizer.sha256", 5), "tokenizer.sha256: expected a string, got 5"),
    ("tokens", _set("special_ids.unk", 9999), "special_ids.unk: 9999 is not below vocab_size 512"),
    ("tokens", _set("max_token_id", 512), "max_token_id: 512 is not below vocab_size 512"),
    ("tokens", _set("max_token_id", 1.5), "max_token_id: expected an integer, got 1.5"),
    ("tokens", _set("vocab_size", 70000), "dtype: uint16 cannot hold the ids of vocab_size 70000"),
    ("tokens", _set("format_version", 2), "format version 2, this zhllama reads 1"),
    ("sft", _set("options.max_seq_length", "256"), 'options.max_seq_length: expected an integer, got "256"'),
    ("sft", lambda m: m["files"][0].pop("plen"), "files[0].plen: missing"),
])
def test_meta_json_per_key(real, tmp_path, data, change, message):
    bad = tampered(getattr(real, data), tmp_path / "d", "meta.json", change)
    with pytest.raises(DataError) as e:
        read_meta(bad)
    assert "meta.json" in str(e.value) and message in str(e.value), e.value


def test_max_token_id_recorded_at_prepare_and_computed_for_older_data(real, tmp_path):
    meta = read_meta(real.tokens)
    tokens = np.fromfile(real.tokens / meta["files"][0]["tokens"], dtype="<u2")
    assert meta["max_token_id"] == meta["files"][0]["max_token_id"] == int(tokens.max())
    old = {**meta, "max_token_id": None, "files": [{k: v for k, v in f.items() if k != "max_token_id"}
                                                   for f in meta["files"]]}
    assert max_token_id(real.tokens, old) == int(tokens.max())


# --------------------------------------------------------------------------------------
# the tokenizer against the embedding rows


def truncated(n_pieces: int, dst: Path) -> Path:
    """tok512 cut to its first pieces (a BPE model's merges are ordered)."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(TOK512.read_bytes())
    del proto.pieces[n_pieces:]
    dst.write_bytes(proto.SerializeToString())
    return dst


def extended(n_total: int, dst: Path) -> Path:
    """tok512 with user-defined pieces appended up to n_total."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(TOK512.read_bytes())
    for i in range(n_total - len(proto.pieces)):
        proto.pieces.append(sp_pb2.ModelProto.SentencePiece(
            piece=f"<extra{i}>", score=0, type=sp_pb2.ModelProto.SentencePiece.USER_DEFINED))
    dst.write_bytes(proto.SerializeToString())
    return dst


def test_tokenizer_larger_than_the_embedding_is_refused(real, tmp_path):
    with pytest.raises(FormatError) as e:
        convert(STORIES / "stories260K.bin", tmp_path / "out", "zhllama", tokenizer=LLAMA_TOK,
                progress=False)
    for words in ("llama_tokenizer.model", "32000 pieces", "stories260K.bin", "512 embedding rows"):
        assert words in str(e.value), e.value
    assert not (tmp_path / "out").exists()
    # resize: the model's own tokenizer is larger than its rows
    shutil.copytree(real.base, tmp_path / "m")
    shutil.copy(LLAMA_TOK, tmp_path / "m" / "tokenizer.model")
    with pytest.raises(FormatError, match=r"tokenizer\.model: the tokenizer has 32000 pieces, but .*m has "
                                          r"only 512 embedding rows"):
        resize_checkpoint(read_checkpoint(tmp_path / "m", progress=False), extended(600, tmp_path / "x.model"))
    # generate: one error line, no traceback
    r = subprocess.run([sys.executable, "-m", "model.generate", str(real.base), "--tokenizer",
                        str(LLAMA_TOK), "--prompt", "Once", "--max_new_tokens", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "error:" in r.stderr and "32000 pieces" in r.stderr and "512 embedding rows" in r.stderr


def test_smaller_tokenizer_only_over_padding_rows_with_a_note(real, tmp_path):
    assert is_padding(49953, 49984) and is_padding(55296, 56000) and is_padding(49953, 49954)
    assert not is_padding(32000, 49953) and not is_padding(512, 32000) and not is_padding(512, 512)
    small = truncated(500, tmp_path / "t500.model")
    note = check_tokenizer_rows(read_checkpoint(real.base, tokenizer=small, progress=False))
    assert note and note.startswith("note:") and "512 embedding rows" in note and "500 pieces" in note
    r = subprocess.run([sys.executable, "-m", "model.convert", str(real.base), str(tmp_path / "out"),
                        "--to", "zhllama", "--tokenizer", str(small), "--no_progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("note:")] == [note]
    # 31,488 rows more than LLaMA-sized padding could add: another tokenizer
    big = named_args("tiny", vocab_size=32000)
    write_model_dir(from_state_dict(random_model(big).state_dict(), big, tokenizer=TOK512),
                    tmp_path / "big", progress=False)
    with pytest.raises(FormatError, match=r"big/tokenizer\.model: the tokenizer has 512 pieces, but .*big has "
                                          r"32000 embedding rows: 31488 more than padding"):
        check_tokenizer_rows(read_checkpoint(tmp_path / "big", progress=False))


def test_resize_drops_padding_rows_first(real, tmp_path, capsys):
    convert(STORIES / "stories260K.bin", tmp_path / "padded", "zhllama", tokenizer=TOK512,
            pad_vocab_to_multiple_of=576, progress=False)
    padded = read_checkpoint(tmp_path / "padded", progress=False)
    assert padded.args.vocab_size == 576
    grown = resize_checkpoint(padded, extended(532, tmp_path / "t532.model"), "mean")
    assert "the last 64 are padding" in capsys.readouterr().err
    assert grown.args.vocab_size == 532
    emb = grown.get("tok_embeddings.weight")
    assert emb.shape == (532, 64) and torch.equal(emb[:512], real.ckpt.get("tok_embeddings.weight"))


# --------------------------------------------------------------------------------------
# training: the data against the model


def factory_inputs(real, data: Path, base: Path | None = None, **data_options):
    from train.config import DataConfig

    options = dict(path=str(data), block_size=64, val_fraction=0.0, pack=False, max_seq_length=None)
    cfg = SimpleNamespace(seed=0, data=DataConfig(**{**options, **data_options}))
    dist = SimpleNamespace(rank=0, world_size=1, is_main=True)
    return cfg, dist, SimpleNamespace(base=read_checkpoint(base or real.base, progress=False))


def test_each_training_script_refuses_the_other_kind_of_data(real):
    from train.pretrain import packed_blocks
    from train.sft import sft_samples

    with pytest.raises(DataError, match=r"meta\.json: kind: 'sft' data .* cannot train in "
                                        r"train/pretrain\.py; use train/sft\.py"):
        packed_blocks(*factory_inputs(real, real.sft))
    with pytest.raises(DataError, match=r"meta\.json: kind: 'pretrain' data .* cannot train in "
                                        r"train/sft\.py; use train/pretrain\.py"):
        sft_samples(*factory_inputs(real, real.tokens))
    train, _ = packed_blocks(*factory_inputs(real, real.tokens))  # the right kind passes
    assert train.block_size == 64 and len(train) > 0
    data, _ = sft_samples(*factory_inputs(real, real.sft))
    assert len(data) > 0


def test_lengths_above_max_seq_len_are_refused(real):
    from train.config import ConfigError
    from train.pretrain import packed_blocks
    from train.sft import sft_samples

    with pytest.raises(ConfigError, match=r"data\.block_size: 1024 is above the max_seq_len 512 of "):
        packed_blocks(*factory_inputs(real, real.tokens, block_size=1024))
    with pytest.raises(ConfigError, match=r"data\.max_seq_length: 600 is above the max_seq_len 512"):
        sft_samples(*factory_inputs(real, real.sft, max_seq_length=600))


def test_shard_ids_and_vocabulary_against_the_model(real, tmp_path):
    from train.pretrain import packed_blocks

    # an id past the embedding, in data that records no maximum (computed over the files)
    shutil.copytree(real.tokens, tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    tokens = np.memmap(tmp_path / "d" / meta["files"][0]["tokens"], dtype="<u2", mode="r+")
    tokens[100] = 600
    tokens.flush()
    del tokens
    meta["max_token_id"] = None
    for f in meta["files"]:
        del f["max_token_id"]
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"d: holds token id 600, but {re.escape(str(real.base))} has "
                                        r"only 512 embedding rows"):
        packed_blocks(*factory_inputs(real, tmp_path / "d"))
    # a vocabulary larger than the model's rows (the model has no tokenizer to compare hashes)
    bad = tampered(real.tokens, tmp_path / "big", "meta.json", {"vocab_size": 1000})
    cfg, dist, built = factory_inputs(real, bad)
    built.base = built.base.replace(tokenizer=None)
    with pytest.raises(DataError, match=r"prepared with a 1000-piece tokenizer, larger than the 512 "
                                        rf"embedding rows of {re.escape(str(real.base))}"):
        packed_blocks(cfg, dist, built)
    # the model's own tokenizer larger than its rows
    shutil.copytree(real.base, tmp_path / "m")
    shutil.copy(LLAMA_TOK, tmp_path / "m" / "tokenizer.model")
    with pytest.raises(FormatError, match="32000 pieces, but .* has only 512 embedding rows"):
        packed_blocks(*factory_inputs(real, real.tokens, base=tmp_path / "m"))


def test_pretrain_script_names_the_script_for_sft_data(real, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train" / "pretrain.py"),
                        str(REPO / "configs" / "tiny" / "stage1.yaml"), f"--model.path={real.base}",
                        f"--data.path={real.sft}", f"--output_dir={tmp_path / 'run'}",
                        "--parallel.precision=fp32"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "use train/sft.py" in r.stderr.strip().splitlines()[-1], r.stderr


# --------------------------------------------------------------------------------------
# merging: the base an adapter was trained on


def test_adapter_records_its_base(real):
    config = json.loads((real.adapter / "adapter_config.json").read_text())
    assert config["base_tensors_sha256"] == tensor_fingerprint(real.ckpt)
    assert config["base_tensors_hashed"] == list(BASE_FINGERPRINT_TENSORS)
    assert config["tokenizer_sha256"] == sha256_file(TOK512)
    assert config["base_params"] == real.ckpt.args.to_params()
    # the same weights in another format and layout hash the same
    assert tensor_fingerprint(read_checkpoint(real.hf, progress=False)) == config["base_tensors_sha256"]


def other_bases(real, tmp_path) -> dict[str, tuple[Path, str]]:
    """Bases of the same shape as the adapter's, each differing in one recorded way."""
    state = {n: real.ckpt.get(n) for n in real.ckpt.specs}
    state["norm.weight"] = state["norm.weight"] + 0.5
    write_model_dir(from_state_dict(state, real.ckpt.args, tokenizer=TOK512), tmp_path / "weights",
                    progress=False)
    tampered(real.base, tmp_path / "params", "params.json", {"norm_eps": 1e-6})
    shutil.copytree(real.base, tmp_path / "tok")
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(TOK512.read_bytes())
    proto.pieces[300].score += 1.0  # same size, another tokenizer
    (tmp_path / "tok" / "tokenizer.model").write_bytes(proto.SerializeToString())
    return {"weights": (tmp_path / "weights", "weights: sha256 of norm.weight, "
                                              "layers.0.attention.wq.weight"),
            "params": (tmp_path / "params", "norm_eps 1e-05 (this base: 1e-06)"),
            "tokenizer": (tmp_path / "tok", "tokenizer sha256 ")}


def test_merge_refuses_another_base_unless_forced(real, tmp_path, capsys):
    assert merge(real.base, [real.adapter], progress=False).args == real.ckpt.args  # its own base
    for what, (base, message) in other_bases(real, tmp_path).items():
        with pytest.raises(FormatError) as e:
            merge(base, [real.adapter], progress=False)
        text = str(e.value)
        assert "adapter_config.json: trained on another base" in text and message in text, (what, text)
        assert "--force_base" in text
        merged = merge(base, [real.adapter], force_base=True, progress=False)
        assert merged.args.dim == 64 and "warning:" in capsys.readouterr().err


def test_merge_lora_command_and_force_base(real, tmp_path):
    base, message = other_bases(real, tmp_path)["weights"]
    cmd = [sys.executable, "-m", "model.merge_lora", "--base_model", str(base), "--lora_model",
           str(real.adapter), "--output_type", "zhllama", "--output_dir", str(tmp_path / "out"),
           "--no_progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr and "--force_base" in r.stderr and not (tmp_path / "out").exists()
    r = subprocess.run(cmd + ["--force_base"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "warning:" in r.stderr and (tmp_path / "out" / "model.safetensors").exists()
