"""The hand-written LLaMA against transformers' LlamaForCausalLM, and its KV cache."""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import from_state_dict
from model.formats import write_hf
from model.llama import (
    KVCache, ModelArgs, build_model, ffn_hidden_dim, ffn_params_for, named_args, num_params,
)
from tests.conftest import random_model

transformers = pytest.importorskip("transformers")


def hf_twin(model, tmp_path):
    """The same weights in transformers, through our HF export."""
    ckpt = from_state_dict(model.state_dict(), model.args)
    write_hf(ckpt, tmp_path / "hf", progress=False)
    return transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()


@pytest.mark.parametrize("size, kv_heads", [("tiny", None), ("tiny-gqa", 4), ("tiny-gqa", 1)])
def test_logits_equal_transformers(size, kv_heads, tmp_path):
    # tiny: MHA, LLaMA-1 shaped (eps 1e-6); tiny-gqa: 8 query heads over 4 (or 1) kv heads,
    # rope_theta 5e5, ffn_dim_multiplier (Llama-2 70B shaped).
    args = named_args(size) if kv_heads is None else named_args(size, n_kv_heads=kv_heads)
    model = random_model(args)
    hf = hf_twin(model, tmp_path)
    tokens = torch.randint(0, model.args.vocab_size, (3, 61), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.abs().max() > 1.0  # logits big enough for the comparison to mean something
    assert (ours - theirs).abs().max() <= 1e-4
    assert hf.config.rope_parameters["rope_theta"] == model.args.rope_theta


def test_wrong_rotary_layout_would_be_caught(tmp_path):
    # Guard the guard: swapping q's rotary layout must break the comparison above.
    model = random_model(named_args("tiny"))
    hf = hf_twin(model, tmp_path)
    with torch.no_grad():
        wq = model.layers[0].attention.wq.weight
        wq.copy_(wq.view(4, 8, 2, 64).transpose(1, 2).reshape(64, 64))
    tokens = torch.randint(0, 512, (1, 32))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() > 1e-2


@pytest.mark.parametrize("size", ["tiny", "tiny-gqa"])
def test_kv_cache_decoding_equals_full_forward(size):
    model = random_model(named_args(size))
    tokens = torch.randint(0, model.args.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.args, 2, 64)
        # a prompt, then single tokens, then a chunk of several tokens (needs the explicit mask)
        parts = [model(tokens[:, :17], cache=cache)]
        parts += [model(tokens[:, i : i + 1], cache=cache) for i in range(17, 30)]
        parts.append(model(tokens[:, 30:], cache=cache))
    assert cache.pos == 40
    assert (torch.cat(parts, dim=1) - full).abs().max() <= 1e-5


def test_kv_cache_full_is_an_error():
    model = random_model(named_args("tiny"))
    cache = KVCache(model.args, 1, 8)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)


def test_return_hidden_feeds_output():
    model = random_model(named_args("tiny"))
    tokens = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.output(model(tokens, return_hidden=True)), model(tokens))


def test_meta_device_build_then_init():
    model = build_model(named_args("tiny-gqa"), init=False)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    logits = model(torch.randint(0, 512, (1, 5)))
    assert torch.isfinite(logits).all()
    assert torch.equal(model.layers[1].ffn_norm.weight, torch.ones(64))


@pytest.mark.parametrize(
    "size, params",
    [  # published parameter counts of Meta's releases
        ("llama-7b", 6_738_415_616),
        ("llama-13b", 13_015_864_320),
        ("llama2-70b", 68_976_648_192),
    ],
)
def test_named_sizes_match_published_parameter_counts(size, params):
    assert num_params(build_model(named_args(size), init=False)) == params


def test_named_hidden_sizes():
    assert named_args("llama-7b").hidden_dim == 11008
    assert named_args("llama-33b").hidden_dim == 17920
    assert named_args("llama2-70b").hidden_dim == 28672


@pytest.mark.parametrize("dim, hidden", [(4096, 11008), (8192, 28672), (64, 172), (288, 768),
                                         (64, 100), (5120, 13824), (2048, 5632)])
def test_ffn_params_for_reproduces_any_hidden_size(dim, hidden):
    multiple_of, multiplier = ffn_params_for(dim, hidden)
    assert ffn_hidden_dim(dim, multiple_of, multiplier) == hidden


def test_params_json_round_trip_and_errors():
    args = named_args("llama2-70b")
    assert ModelArgs.from_params(args.to_params()) == args
    meta_style = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32,
                  "norm_eps": 1e-06, "vocab_size": -1}
    assert ModelArgs.from_params(meta_style, vocab_size=32000).vocab_size == 32000
    with pytest.raises(ValueError, match="vocab_size is -1"):
        ModelArgs.from_params(meta_style)
    with pytest.raises(ValueError, match="unknown key.*use_scaled_rope"):
        ModelArgs.from_params({**meta_style, "use_scaled_rope": True}, vocab_size=32000)
    with pytest.raises(ValueError, match="not a multiple of n_kv_heads"):
        ModelArgs(dim=64, n_heads=8, n_kv_heads=3)


def test_packed_segments_equal_separate_samples():
    model = random_model(named_args("tiny-gqa"))
    a, b = torch.randint(0, 512, (1, 11)), torch.randint(0, 512, (1, 7))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 11 + [1] * 7])
    with torch.no_grad():
        together = model(packed, segment_ids=segments)
        assert (together[:, :11] - model(a)).abs().max() <= 1e-5
        assert (together[:, 11:] - model(b)).abs().max() <= 1e-5


def test_labels_give_summed_token_loss_plain_and_chunked():
    model = random_model(named_args("tiny"))
    tokens = torch.randint(0, 512, (2, 16))
    labels = torch.randint(0, 512, (2, 16))
    labels[:, :5] = -100
    logits = model(tokens)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                 ignore_index=-100, reduction="sum")
    plain = model(tokens, labels=labels)
    chunked = model(tokens, labels=labels, loss_chunk_size=5)
    assert torch.allclose(plain, expected, rtol=1e-6) and torch.allclose(chunked, expected, rtol=1e-5)
    g_plain = torch.autograd.grad(plain, model.layers[0].attention.wq.weight)[0]
    g_chunk = torch.autograd.grad(chunked, model.layers[0].attention.wq.weight)[0]
    assert torch.allclose(g_plain, g_chunk, atol=1e-5)
