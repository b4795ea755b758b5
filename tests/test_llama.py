"""The hand-written LLaMA against transformers' LlamaForCausalLM and Meta's rotary formula,
its KV cache, and its loss and evaluation methods."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.formats import write_hf
from model.llama import (
    KVCache, ModelArgs, apply_rope, build_model, ffn_hidden_dim, ffn_params_for, named_args,
    num_params, rope_cos_sin,
)
from model.source import from_state_dict
from tests.conftest import random_model


def hf_twin(model, tmp_path):
    """The same weights in transformers, through our HF export (skips without transformers)."""
    transformers = pytest.importorskip("transformers")
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


def meta_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's llama/model.py rotary embedding (`precompute_freqs_cis` + `apply_rotary_emb`),
    written out: pairs (2i, 2i+1) of the last dimension as complex numbers, multiplied by
    e^{i·pos·freq_i}. x: (bs, seqlen, n_heads, head_dim); positions (seqlen,) or (bs, seqlen)."""
    head_dim = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = positions.float()[..., None] * freqs  # torch.outer(t, freqs) for each row
    freqs_cis = torch.polar(torch.ones_like(angles), angles)  # (…, seqlen, head_dim // 2)
    freqs_cis = freqs_cis[None, :, None] if positions.dim() == 1 else freqs_cis[:, :, None]
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_ * freqs_cis).flatten(3).type_as(x)


def rotate_half(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Hugging Face's convention (pairs (i, i + head_dim/2)): what the test must tell apart."""
    cos, sin = (t.repeat(1, 2)[None, :, None] for t in rope_cos_sin(x.shape[-1], positions, theta))
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rotary_embedding_is_metas_complex_formula(theta):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 13, 3, 16, generator=g)  # (bs, seqlen, n_heads, head_dim)
    for positions in (torch.arange(13), torch.arange(40, 53)):  # a prompt; a later cached chunk
        ours = apply_rope(x, *rope_cos_sin(16, positions, theta))
        assert (ours - meta_rotary(x, positions, theta)).abs().max() <= 1e-5
        # guard the guard: the other convention is far off, so it could not pass for Meta's
        assert (rotate_half(x, positions, theta) - meta_rotary(x, positions, theta)).abs().max() > 0.5
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4], list(range(13))])  # per row
    ours = apply_rope(x, *rope_cos_sin(16, packed, theta))
    assert (ours - meta_rotary(x, packed, theta)).abs().max() <= 1e-5


@pytest.mark.parametrize("size", ["tiny", "tiny-gqa"])
def test_attention_is_metas_with_its_rotary_formula(size):
    # The attention layer against Meta's, written out from the raw weights with Meta's
    # rotary formula and its repeat_kv, independent of any permute or export.
    args = named_args(size)
    model = random_model(args)
    attn = model.layers[1].attention
    bs, seqlen, n_rep = 2, 19, args.n_heads // args.kv_heads
    x = torch.randn(bs, seqlen, args.dim, generator=torch.Generator().manual_seed(4))
    positions = torch.arange(seqlen)
    with torch.no_grad():
        q = meta_rotary(attn.wq(x).view(bs, seqlen, args.n_heads, args.head_dim), positions, args.rope_theta)
        k = meta_rotary(attn.wk(x).view(bs, seqlen, args.kv_heads, args.head_dim), positions, args.rope_theta)
        v = attn.wv(x).view(bs, seqlen, args.kv_heads, args.head_dim)
        # Meta's repeat_kv: kv head j serves query heads j·n_rep … (j+1)·n_rep − 1
        k, v = (t.repeat_interleave(n_rep, dim=2).transpose(1, 2) for t in (k, v))
        scores = q.transpose(1, 2) @ k.transpose(2, 3) / math.sqrt(args.head_dim)
        scores = scores + torch.full((seqlen, seqlen), float("-inf")).triu(1)
        expected = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(bs, seqlen, -1))
        ours = attn(x, rope_cos_sin(args.head_dim, positions, args.rope_theta), (None, True), None, 0)
    assert expected.abs().max() > 0.1
    assert (ours - expected).abs().max() <= 1e-5


def decode_in_parts(model, tokens: torch.Tensor, cache: KVCache, cuts: list[int]) -> torch.Tensor:
    """Logits of `tokens` run through the cache in pieces [0, cuts[0]), [cuts[0], cuts[1]), …;
    the caller, not the model, keeps the position."""
    parts, start = [], 0
    for end in cuts + [tokens.shape[1]]:
        parts.append(model(tokens[:, start:end], start_pos=start, cache=cache))
        start = end
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("size", ["tiny", "tiny-gqa"])
def test_kv_cache_decoding_equals_full_forward(size):
    model = random_model(named_args(size))
    tokens = torch.randint(0, model.args.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.args, 2, 64)
        # a prompt, then single tokens, then a chunk of several tokens (needs the explicit mask)
        decoded = decode_in_parts(model, tokens, cache, [17, *range(18, 31)])
    assert (decoded - full).abs().max() <= 1e-5
    # exactly the 40 positions were written, every layer's keys and values, nothing beyond
    for buffers in (cache.keys, cache.values):
        assert all(b[:, :, :40].abs().sum(-1).min() > 0 and not b[:, :, 40:].any() for b in buffers)


def test_kv_cache_position_is_the_callers():
    # forward keeps no position: the same call twice gives the same logits, and decoding can
    # go back to an earlier position (the cache's later entries are overwritten or ignored).
    model = random_model(named_args("tiny-gqa"))
    tokens = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.args, 1, 32)
        prompt = model(tokens[:, :20], cache=cache)
        assert torch.equal(model(tokens[:, :20], start_pos=0, cache=cache), prompt)
        step = model(tokens[:, 20:21], start_pos=20, cache=cache)
        assert torch.equal(model(tokens[:, 20:21], start_pos=20, cache=cache), step)
        other = torch.randint(0, 512, (1, 4))
        model(other, start_pos=10, cache=cache)  # a different continuation from position 10 …
        again = model(tokens[:, 10:24], start_pos=10, cache=cache)  # … then the original one
    assert (again - full[:, 10:]).abs().max() <= 1e-5
    assert (step - full[:, 20:21]).abs().max() <= 1e-5


def test_kv_cache_full_and_position_without_cache_are_errors():
    model = random_model(named_args("tiny"))
    cache = KVCache(model.args, 1, 8)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache is full: 9 positions > max_len 8"):
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=5, cache=cache)
    with pytest.raises(ValueError, match="start_pos 5 needs the cache"):
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=5)
    with pytest.raises(ValueError, match="segment_ids .* cannot be used with a KV cache"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache, segment_ids=torch.zeros(1, 4))


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


def test_loss_is_the_summed_token_loss_plain_and_chunked():
    model = random_model(named_args("tiny"))
    tokens = torch.randint(0, 512, (2, 16))
    labels = torch.randint(0, 512, (2, 16))
    labels[:, :5] = -100
    logits = model(tokens)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    plain = model.loss(tokens, labels)
    chunked = model.loss(tokens, labels, chunk_size=5)
    assert plain.dtype == chunked.dtype == torch.float32
    assert torch.allclose(plain, expected, rtol=1e-6) and torch.allclose(chunked, expected, rtol=1e-5)
    g_plain = torch.autograd.grad(plain, model.layers[0].attention.wq.weight)[0]
    g_chunk = torch.autograd.grad(chunked, model.layers[0].attention.wq.weight)[0]
    assert torch.allclose(g_plain, g_chunk, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_loss_and_eval_stats_follow_forwards_logits_of_packed_samples(chunk_size):
    model = random_model(named_args("tiny-gqa"))
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 512, (2, 18), generator=g)
    segments = torch.tensor([[0] * 11 + [1] * 7, [0] * 4 + [1] * 14])
    with torch.no_grad():
        logits = model(tokens, segment_ids=segments)
        labels = torch.randint(0, 512, (2, 18), generator=g)
        labels[0, :6] = logits[0, :6].argmax(-1)  # right for sure, but at 0 and 5 …
        labels[:, ::5] = -100  # … which are ignored
        expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   reduction="sum")
        right = int(((logits.argmax(-1) == labels) & (labels != -100)).sum())
        loss, correct = model.eval_stats(tokens, labels, segment_ids=segments, chunk_size=chunk_size)
        summed = model.loss(tokens, labels, segment_ids=segments, chunk_size=chunk_size)
    assert torch.allclose(loss, expected, rtol=1e-5) and torch.allclose(summed, expected, rtol=1e-5)
    assert int(correct) == right >= 4
