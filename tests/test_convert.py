"""Converters: Meta shards, Hugging Face, the canonical directory, and their failures."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.convert import convert, parse_size
from model.formats import read_checkpoint, write_model_dir
from model.llama import named_args
from model.source import from_state_dict, load_model
from tests.conftest import random_model
from tests.helpers import CHINESE_LLAMA_VOCAB, LLAMA_VOCAB

# How Meta's fairscale layers split each weight over model-parallel ranks, written out
# from the LLaMA reference code (ParallelEmbedding splits the embedding's columns;
# ColumnParallelLinear splits output rows; RowParallelLinear splits input columns).
META_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1,
              "w1": 0, "w3": 0, "w2": 1}


def meta_split_dim(name: str) -> int | None:
    return META_SPLIT.get(name.split(".")[-2])


def write_meta_by_hand(state: dict[str, torch.Tensor], params: dict, n: int, out: Path) -> None:
    """A Meta checkpoint exactly as Meta's download has it, made without our writer."""
    out.mkdir(parents=True)
    for rank in range(n):
        shard = {}
        for name, t in state.items():
            dim = meta_split_dim(name)
            shard[name] = t.clone() if dim is None else t.chunk(n, dim=dim)[rank].clone()
        shard["rope.freqs"] = torch.zeros(params["dim"] // params["n_heads"] // 2)  # as LLaMA-1 had
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")
    (out / "params.json").write_text(json.dumps(params))


def load_meta_by_hand(path: Path) -> dict[str, torch.Tensor]:
    shards = [torch.load(f, weights_only=True) for f in sorted(path.glob("consolidated.*.pth"))]
    out = {}
    for name in shards[0]:
        dim = meta_split_dim(name)
        out[name] = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.convert", *map(str, args), "--no_progress"],
                          capture_output=True, text=True)


@pytest.fixture
def gqa_state():
    model = random_model(named_args("tiny-gqa"))
    return model.args, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("n_shards, size", [(1, "tiny"), (2, "tiny-gqa"), (4, "tiny-gqa"),
                                            (8, "tiny-gqa-8")])
def test_meta_round_trip_through_every_format(n_shards, size, tmp_path):
    # 8 shards need 8 kv heads (as Llama-2 70B has); 4 shards split 4 kv heads one per rank
    args = named_args("tiny-gqa", n_heads=16, n_kv_heads=8) if size == "tiny-gqa-8" else named_args(size)
    model = random_model(args)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    params = {**args.to_params(), "vocab_size": -1}  # LLaMA-1's params.json says -1
    write_meta_by_hand(state, params, n_shards, tmp_path / "meta")

    convert(tmp_path / "meta", tmp_path / "canon", "zhllama", progress=False)
    canon = load_file(tmp_path / "canon" / "model.safetensors")
    assert_same(canon, state)  # rope.freqs dropped, vocab resolved, shards merged
    # the rows of the embedding, since params.json said -1
    assert json.loads((tmp_path / "canon" / "params.json").read_text())["vocab_size"] == \
        state["tok_embeddings.weight"].shape[0] == args.vocab_size

    convert(tmp_path / "canon", tmp_path / "hf", "hf", progress=False)
    convert(tmp_path / "hf", tmp_path / "canon2", "zhllama", progress=False)
    assert_same(load_file(tmp_path / "canon2" / "model.safetensors"), state)

    convert(tmp_path / "canon2", tmp_path / "meta2", "meta", shards=n_shards, progress=False)
    original = [torch.load(f, weights_only=True) for f in sorted((tmp_path / "meta").glob("*.pth"))]
    written = [torch.load(f, weights_only=True) for f in sorted((tmp_path / "meta2").glob("*.pth"))]
    assert len(written) == n_shards
    for o, w in zip(original, written):
        o.pop("rope.freqs")
        assert_same(w, o)  # every shard identical to Meta's split
    assert_same(load_meta_by_hand(tmp_path / "meta2"), state)


def test_hf_directory_saved_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, rope_theta=20000.0, rms_norm_eps=1e-5,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    # sharded safetensors with an index, as transformers writes big models
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = load_model(read_checkpoint(tmp_path / "hf")).eval()
    assert ours.args.hidden_dim == 176 and ours.args.rope_theta == 20000.0
    tokens = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max() <= 1e-4


def test_hf_pytorch_model_bin_and_tied_embeddings(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "hf").mkdir()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    cfg.save_pretrained(tmp_path / "hf")
    ours = load_model(read_checkpoint(tmp_path / "hf")).eval()
    assert torch.equal(ours.output.weight, hf.model.embed_tokens.weight)
    tokens = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max() <= 1e-4


def test_hf_export_loads_in_transformers_with_tokenizer(shared_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = shared_data / "tokenizers" / "llama_tokenizer.model"
    args = named_args("tiny", vocab_size=LLAMA_VOCAB)  # the tokenizer's pieces
    model = random_model(args)
    write_model_dir(from_state_dict(model.state_dict(), args, tokenizer=tok), tmp_path / "canon",
                    progress=False)
    convert(tmp_path / "canon", tmp_path / "hf", "hf", dtype="bfloat16", max_shard_bytes=2 << 20,
            progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["num_key_value_heads"] == 4
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    # (No runs of spaces here: transformers 5's tokenizers backend splits "  x" as "▁▁" "x"
    # where sentencepiece gives "▁" "▁x"; that is the tokenizer's concern, see its tests.)
    text = "Hello world, 2023 was a good year. Code: x = f(y) 你好"
    assert hf_tok(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (1, 2)


def test_checklist_md5_verified(gqa_state, tmp_path):
    args, state = gqa_state
    convert_src = tmp_path / "meta"
    write_meta_by_hand(state, args.to_params(), 2, convert_src)
    convert(convert_src, tmp_path / "m2", "meta", shards=2, progress=False)  # writes checklist.chk
    convert(tmp_path / "m2", tmp_path / "ok", "zhllama", progress=False)
    shard = tmp_path / "m2" / "consolidated.01.pth"
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run_cli(tmp_path / "m2", tmp_path / "bad", "--to", "zhllama")
    assert r.returncode != 0 and "md5 does not match" in r.stderr
    assert not (tmp_path / "bad").exists()


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil"
    src.mkdir()
    (src / "params.json").write_text(json.dumps(named_args("tiny").to_params()))
    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": _Exploit(marker)},
               src / "consolidated.00.pth", pickle_module=pickle)
    r = run_cli(src, tmp_path / "out", "--to", "hf")
    assert r.returncode != 0
    assert "consolidated.00.pth: refused" in r.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def _canon(tmp_path: Path) -> Path:
    args = named_args("tiny")
    model = random_model(args)
    return write_model_dir(from_state_dict(model.state_dict(), args), tmp_path / "canon",
                           progress=False)


def test_bad_inputs_give_one_clear_message(tmp_path):
    canon = _canon(tmp_path)
    cases = []
    # missing params.json
    broken = tmp_path / "no_params"
    broken.mkdir()
    torch.save({}, broken / "consolidated.00.pth")
    cases.append((broken, "params.json is missing"))
    # wrong shapes: params.json says dim 128
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "model.safetensors").write_bytes((canon / "model.safetensors").read_bytes())
    (wrong / "params.json").write_text(json.dumps({**named_args("tiny").to_params(), "dim": 128}))
    cases.append((wrong, "tensor tok_embeddings.weight has shape [512, 64] but the model's parameters say [512, 128]"))
    # unknown format
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "notes.txt").write_text("hi")
    cases.append((unknown, "unknown format"))
    # truncated safetensors
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "params.json").write_text((canon / "params.json").read_text())
    (trunc / "model.safetensors").write_bytes((canon / "model.safetensors").read_bytes()[:5000])
    cases.append((trunc, "bytes short of what its header describes"))
    for src, message in cases:
        r = run_cli(src, tmp_path / "dst", "--to", "hf")
        assert r.returncode != 0, src
        assert message in r.stderr, (src, r.stderr)
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "dst").exists()
    # DST exists without --overwrite: refused and left untouched
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep").write_text("mine")
    r = run_cli(canon, tmp_path / "dst", "--to", "hf")
    assert r.returncode != 0 and "already exists" in r.stderr
    assert (tmp_path / "dst" / "keep").read_text() == "mine"
    assert run_cli(canon, tmp_path / "dst", "--to", "hf", "--overwrite").returncode == 0
    assert not (tmp_path / "dst" / "keep").exists()
    # and no temporary directories were left behind by the failures
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_truncated_meta_shard(gqa_state, tmp_path):
    args, state = gqa_state
    write_meta_by_hand(state, args.to_params(), 2, tmp_path / "meta")
    f = tmp_path / "meta" / "consolidated.01.pth"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = run_cli(tmp_path / "meta", tmp_path / "out", "--to", "zhllama")
    assert r.returncode != 0 and "consolidated.01.pth" in r.stderr
    assert not (tmp_path / "out").exists()


def test_uneven_vocab_refused_then_padded(tmp_path):
    # Chinese-LLaMA's odd vocabulary, which Meta's 2-shard layout cannot split evenly
    vocab = CHINESE_LLAMA_VOCAB
    args = named_args("tiny", vocab_size=vocab)
    model = random_model(args)
    canon = write_model_dir(from_state_dict(model.state_dict(), args), tmp_path / "canon",
                            progress=False)
    r = run_cli(canon, tmp_path / "meta", "--to", "meta", "--shards", "2")
    assert r.returncode != 0 and "--pad_vocab_to_multiple_of" in r.stderr
    assert not (tmp_path / "meta").exists()
    r = run_cli(canon, tmp_path / "meta", "--to", "meta", "--shards", "2",
                "--pad_vocab_to_multiple_of", "64")
    assert r.returncode == 0, r.stderr
    padded = -(-vocab // 64) * 64  # 49,984
    assert json.loads((tmp_path / "meta" / "params.json").read_text())["vocab_size"] == padded
    back = load_meta_by_hand(tmp_path / "meta")
    for name in ("tok_embeddings.weight", "output.weight"):
        assert back[name].shape[0] == padded
        assert torch.equal(back[name][:vocab], model.state_dict()[name])
        assert not back[name][vocab:].any()
    for name, t in model.state_dict().items():
        if "tok_embeddings" not in name and "output" not in name:
            assert torch.equal(back[name], t)


def test_llama2c_reader_rejects_garbage(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\x00" * 100)
    r = run_cli(f, tmp_path / "out", "--to", "zhllama")
    assert r.returncode != 0 and "unknown format" in r.stderr


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("100") == 100
    with pytest.raises(ValueError):
        parse_size("lots")


def test_help_works():
    r = subprocess.run([sys.executable, "-m", "model.convert", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--pad_vocab_to_multiple_of" in r.stdout
