"""params.json as Meta writes it: Meta's own ModelArgs must accept ours, and we read every
variant Meta's releases use (LLaMA-1, Llama 2, Llama 2 70B with GQA, Code Llama)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from model.formats import read_checkpoint, write_meta
from model.llama import named_args
from model.source import from_state_dict
from tests.conftest import random_model


# The fields of Meta's ModelArgs, written out from meta-llama/llama's llama/model.py
# (Llama 2) and meta-llama/codellama's llama/model.py (Code Llama adds rope_theta).
@dataclass
class Llama2ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    max_batch_size: int = 32
    max_seq_len: int = 2048


@dataclass
class CodeLlamaModelArgs(Llama2ModelArgs):
    rope_theta: float = 10000


# Meta's published params.json files (values as released; vocab_size -1 in all of them).
PUBLISHED = {
    "llama-1-7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06,
                   "vocab_size": -1},
    "llama-2-70b": {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
                    "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1},
    "codellama-7b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256,
                     "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 1000000},
}


@pytest.mark.parametrize("size,changes,meta_args", [
    ("tiny", {}, Llama2ModelArgs),
    ("tiny-gqa", {"rope_theta": 10000.0}, Llama2ModelArgs),  # n_kv_heads, ffn_dim_multiplier
    ("tiny", {"rope_theta": 1e6, "max_seq_len": 4096}, CodeLlamaModelArgs),
])
def test_meta_s_model_args_accept_our_params(size, changes, meta_args, tmp_path):
    args = named_args(size, **changes)
    model = random_model(args)
    write_meta(from_state_dict(model.state_dict(), args), tmp_path / "meta", progress=False)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    built = meta_args(max_seq_len=2048, max_batch_size=1, **params)  # as Llama.build does
    assert "max_seq_len" not in params
    assert ("rope_theta" in params) == (args.rope_theta != 10000.0)
    assert ("n_kv_heads" in params) == (args.kv_heads != args.n_heads)
    assert ("ffn_dim_multiplier" in params) == (args.ffn_dim_multiplier is not None)
    for field in dataclasses.fields(built):
        if field.name in params:
            assert getattr(built, field.name) == getattr(args, field.name), field.name
    assert set(params) <= {f.name for f in dataclasses.fields(meta_args)}
    # and it reads back as the same model (max_seq_len is not Meta's to say)
    back = read_checkpoint(tmp_path / "meta")
    assert back.args.replace(max_seq_len=args.max_seq_len) == args
    assert torch.equal(back.get("layers.1.attention.wk.weight"), model.state_dict()["layers.1.attention.wk.weight"])


@pytest.mark.parametrize("release", sorted(PUBLISHED))
def test_every_published_params_variant_is_read(release, tmp_path):
    """Meta's own keys, shrunk to a tiny model (sizes only), with the published optional keys."""
    published = PUBLISHED[release]
    args = named_args("tiny-gqa" if "n_kv_heads" in published else "tiny",
                      ffn_dim_multiplier=published.get("ffn_dim_multiplier"),
                      rope_theta=float(published.get("rope_theta", 10000.0)),
                      norm_eps=published["norm_eps"])
    model = random_model(args)
    write_meta(from_state_dict(model.state_dict(), args), tmp_path / "meta", progress=False)
    tiny = {"dim": args.dim, "n_heads": args.n_heads, "n_layers": args.n_layers,
            "multiple_of": args.multiple_of, **({"n_kv_heads": args.n_kv_heads} if "n_kv_heads" in published else {})}
    params = {**published, **tiny}
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    back = read_checkpoint(tmp_path / "meta", verify_checksum=False)
    assert back.args.vocab_size == args.vocab_size  # -1 or absent: the embedding's rows
    assert back.args.rope_theta == args.rope_theta and back.args.norm_eps == args.norm_eps
    assert back.args.ffn_dim_multiplier == args.ffn_dim_multiplier
