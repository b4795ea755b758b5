"""The LLaMA transformer (LLaMA-1 and Llama-2), written out in full.

Parameter names are Meta's (`tok_embeddings`, `layers.{i}.attention.wq`, ...), so a Meta
checkpoint loads with no renaming, and q/k use Meta's rotary layout: each head rotates the
adjacent pairs (2i, 2i+1). Hugging Face checkpoints store q/k permuted for a "rotate half"
layout; `model/formats/hf.py` converts between the two.

The file holds only the model: no training, no parallelism, no device placement. Build it
on the meta device and call `init_weights()` (or assign loaded tensors) to materialise it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cross_entropy import (
    linear_cross_entropy, linear_cross_entropy_reference, linear_cross_entropy_stats,
)
from tokenizer.schema import Field, check_fields

# The standard deviation of freshly initialised embeddings and projections (GPT-2's).
INIT_STD = 0.02

# How packed segments may attend (`Transformer.packed_attention`, `model.packed_attention`).
PACKED_ATTENTION = ("auto", "flex", "varlen", "sdpa")

# Keys of Meta's params.json that describe how Meta's own code ran the model, not the model.
_RUNTIME_KEYS = frozenset({"max_batch_size"})

# What each key of params.json may hold, checked before anything is built from it.
PARAMS_FIELDS = MappingProxyType({
    "dim": Field("integer", min=1),
    "n_layers": Field("integer", min=1),
    "n_heads": Field("integer", min=1),
    "n_kv_heads": Field("integer", min=1, required=False, nullable=True),
    # Meta's LLaMA-1/2 files say -1: the real size is the embedding's row count
    "vocab_size": Field("integer", min=1, also=(-1,), required=False, nullable=True),
    "multiple_of": Field("integer", min=1, required=False),
    "ffn_dim_multiplier": Field("number", above=0, required=False, nullable=True),
    "norm_eps": Field("number", above=0, max=1, required=False),
    "rope_theta": Field("number", above=0, required=False),
    "max_seq_len": Field("integer", min=1, required=False),
    "max_batch_size": Field("integer", required=False),
})


@dataclass(frozen=True)
class ModelArgs:
    """Model hyper-parameters; the field names are the keys of Meta's `params.json`."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads == n_heads)
    vocab_size: int = 32000
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        # types and ranges first (a string or a bool would fail the arithmetic below obscurely)
        check_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, PARAMS_FIELDS)
        problems = []
        if self.dim <= 0 or self.n_layers <= 0 or self.n_heads <= 0 or self.vocab_size <= 0:
            problems.append("dim, n_layers, n_heads and vocab_size must be positive")
        elif self.dim % self.n_heads:
            problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        elif self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_heads > 0 and self.n_kv_heads is not None and (
            self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads
        ):
            problems.append(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.multiple_of <= 0:
            problems.append(f"multiple_of must be positive, got {self.multiple_of}")
        if problems:
            raise ValueError("invalid model arguments: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads, resolved (`n_kv_heads` or `n_heads`)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU hidden size, computed exactly as Meta's `FeedForward` does."""
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @classmethod
    def from_params(cls, params: dict[str, Any], vocab_size: int | None = None) -> ModelArgs:
        """Build from a params.json dictionary, refusing keys this model does not know.

        Every key is checked for its type and range first (`PARAMS_FIELDS`); a ValueError
        names the first key that does not fit.

        Args:
            params: the parsed params.json.
            vocab_size: used when params.json says -1 (Meta's LLaMA-1 files do; the real
                size is the embedding's row count).
        """
        check_fields(params, PARAMS_FIELDS)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known - _RUNTIME_KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; known keys are {sorted(known)}")
        kwargs = {k: v for k, v in params.items() if k in known}
        if kwargs.get("vocab_size", -1) in (-1, None):
            if vocab_size is None:
                raise ValueError("vocab_size is -1 and no embedding was given to resolve it")
            kwargs["vocab_size"] = vocab_size
        return cls(**kwargs)

    def to_params(self) -> dict[str, Any]:
        """The params.json dictionary (always with the real vocab size)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelArgs:
        return dataclasses.replace(self, **changes)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden size: 2/3 of 4·dim, optionally scaled, rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params_for(dim: int, hidden_dim: int) -> tuple[int, float | None]:
    """Find (`multiple_of`, `ffn_dim_multiplier`) that give `hidden_dim` for `dim`.

    Hugging Face configs and llama2.c headers state the hidden size outright; params.json
    only has the two knobs of Meta's formula. Prefer the plain round-up (what LLaMA-1 and
    Llama-2 7B/13B use); otherwise scale by exactly hidden/base and round to the size itself.
    """
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if ffn_hidden_dim(dim, multiple_of, None) == hidden_dim:
            return multiple_of, None
    if hidden_dim >= int(8 * dim / 3):
        return hidden_dim, None
    multiplier = hidden_dim / int(8 * dim / 3)
    assert ffn_hidden_dim(dim, hidden_dim, multiplier) == hidden_dim
    return hidden_dim, multiplier


def _sizes() -> dict[str, dict[str, Any]]:
    llama1 = dict(multiple_of=256, norm_eps=1e-6, vocab_size=32000, max_seq_len=2048)
    llama2 = dict(multiple_of=256, norm_eps=1e-5, vocab_size=32000, max_seq_len=4096)
    return {
        "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, **llama1),
        "llama-13b": dict(dim=5120, n_layers=40, n_heads=40, **llama1),
        "llama-33b": dict(dim=6656, n_layers=60, n_heads=52, **llama1),
        "llama-65b": dict(dim=8192, n_layers=80, n_heads=64, **llama1),
        "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, **llama2),
        "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, **llama2),
        "llama2-70b": dict(
            dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
            **{**llama2, "multiple_of": 4096},
        ),
        # Tiny sizes for tests and the toy recipe: an MHA LLaMA-1 shape and a GQA Llama-2 shape.
        "tiny": dict(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32,
                     norm_eps=1e-6, max_seq_len=256),
        "tiny-gqa": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512,
                         multiple_of=32, ffn_dim_multiplier=1.3, norm_eps=1e-5,
                         rope_theta=500000.0, max_seq_len=256),
    }


MODEL_SIZES = MappingProxyType(_sizes())


def named_args(name: str, **overrides: Any) -> ModelArgs:
    """`ModelArgs` of a named size (see `MODEL_SIZES`), with optional overrides."""
    if name not in MODEL_SIZES:
        raise KeyError(f"unknown model size {name!r}; known sizes: {', '.join(MODEL_SIZES)}")
    return ModelArgs(**{**MODEL_SIZES[name], **overrides})


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 as Meta and Hugging Face both do."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_cos_sin(
    head_dim: int, positions: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (*positions.shape, head_dim // 2), in float32."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by its angle.

    This is Meta's complex multiplication (x[2i] + i·x[2i+1]) · e^{iθ} written with real
    numbers, so it also works where complex tensors do not (bf16, some compilers).
    x: (bs, seqlen, n_heads, head_dim); cos, sin: (seqlen, head_dim // 2), or
    (bs, seqlen, head_dim // 2) when positions differ per sequence (packed samples).
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (bs, seqlen, n_heads, head_dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    # (seqlen, hd/2) → (1, seqlen, 1, hd/2); per-sequence (bs, seqlen, hd/2) → (bs, seqlen, 1, hd/2)
    cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if cos.dim() == 2 else (
        cos[:, :, None, :], sin[:, :, None, :])
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache:
    """Keys and values of past positions, for decoding one token at a time.

    Holds (bs, n_kv_heads, max_len, head_dim) buffers per layer and nothing else: the
    caller says where each call's tokens go (`Transformer.forward`'s `start_pos`), so
    running the same positions again (a new prompt, a retried step) needs no reset.
    """

    def __init__(
        self,
        args: ModelArgs,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, args.kv_heads, max_len, args.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.max_len = max_len

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (bs, n_kv_heads, seqlen, head_dim) at `start_pos`; return keys/values
        of positions 0..start_pos+seqlen-1, each (bs, n_kv_heads, start_pos + seqlen, head_dim)."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions > max_len {self.max_len}")
        self.keys[layer][:, :, start_pos:end] = k
        self.values[layer][:, :, start_pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def segment_positions_and_mask(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions restarting at 0 in each segment, and a causal mask kept inside segments.

    For several samples packed into one row: segment_ids (bs, seqlen), equal ids marking one
    sample (contiguous). Returns positions (bs, seqlen) and a mask (bs, 1, seqlen, seqlen)
    where True means "may attend".
    """
    seqlen = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=segment_ids.device).tril()
    return segment_positions(segment_ids), (same & causal)[:, None]


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 where each segment (a run of equal ids) starts, (bs, seqlen)."""
    bs, seqlen = segment_ids.shape
    idx = torch.arange(seqlen, device=segment_ids.device).expand(bs, seqlen)
    return idx - torch.where(segment_starts(segment_ids), idx, 0).cummax(dim=1).values


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """(bs, seqlen) True where a segment starts: where the id changes, and at every row's start."""
    starts_here = torch.ones_like(segment_ids, dtype=torch.bool)
    starts_here[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts_here


def segment_block_mask(segment_ids: torch.Tensor):
    """The causal, inside-each-segment mask as flex attention's BlockMask: it stores which
    128×128 tiles are empty, full or partial, never an L×L matrix, and the kernel skips the
    empty tiles (every tile across two documents)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def inside_segment(b, h, q, k):
        return (segment_ids[b, q] == segment_ids[b, k]) & (k <= q)

    bs, seqlen = segment_ids.shape
    return create_block_mask(inside_segment, bs, None, seqlen, seqlen, device=segment_ids.device)


def resolve_packed_attention(kind: str, device_type: str) -> str:
    """The path packed segments take on a device: `kind`, with "auto" resolved (flex on CUDA,
    the dense mask, "sdpa", elsewhere: flex's CPU path builds the scores whole)."""
    if kind not in PACKED_ATTENTION:
        raise ValueError(f"packed_attention {kind!r} is not one of {', '.join(PACKED_ATTENTION)}")
    if kind == "auto":
        return "flex" if device_type == "cuda" else "sdpa"
    return kind


@dataclass(frozen=True)
class VarlenSegments:
    """Packed segments as varlen (flash) attention takes them: the rows flattened into one
    sequence of tokens, segment s holding tokens cu_seqlens[s]..cu_seqlens[s+1]-1."""

    cu_seqlens: torch.Tensor  # (n_segments + 1,) int32, from 0 to bs * seqlen
    max_len: int  # the longest segment's length


def segment_varlen(segment_ids: torch.Tensor) -> VarlenSegments:
    """The segments of (bs, seqlen) ids as `VarlenSegments`: a segment starts where the id
    changes and at the start of every row (equal ids in two rows are two segments)."""
    bs, seqlen = segment_ids.shape
    starts = segment_starts(segment_ids).flatten().nonzero().flatten()
    total = torch.tensor([bs * seqlen], device=segment_ids.device)
    cu = torch.cat((starts, total)).to(torch.int32)
    return VarlenSegments(cu, int((cu[1:] - cu[:-1]).max()))  # one host sync per forward


def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: VarlenSegments) -> torch.Tensor:
    """Causal attention inside each segment through torch's varlen flash kernel (CUDA, bf16
    or fp16 only). q: (bs, n_heads, seqlen, head_dim); k, v: (bs, n_kv_heads, seqlen,
    head_dim); returns q's shape. Only the segments' own tiles are computed."""
    from torch.nn.attention.varlen import varlen_attn

    bs, n_heads, seqlen, head_dim = q.shape
    if k.shape[1] != n_heads:  # GQA: each key/value head serves n_heads // n_kv_heads queries
        k, v = (t.repeat_interleave(n_heads // t.shape[1], dim=1) for t in (k, v))
    # (bs, heads, seqlen, head_dim) → (bs * seqlen, heads, head_dim); a view when the tensor
    # was made (bs, seqlen, heads, head_dim) and transposed, as Attention makes it
    flat = [t.transpose(1, 2).reshape(bs * seqlen, n_heads, head_dim) for t in (q, k, v)]
    cu, longest = segments.cu_seqlens, segments.max_len
    out = varlen_attn(*flat, cu, cu, longest, longest, window_size=(-1, 0))  # (-1, 0): causal
    return out.reshape(bs, seqlen, n_heads, head_dim).transpose(1, 2)


@functools.cache
def _compiled_flex_attention():
    """flex_attention compiled once per process: uncompiled, it is a reference
    implementation that builds the whole score matrix."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, enable_gqa: bool) -> torch.Tensor:
    """Attention under a BlockMask: the fused kernel on GPUs, the reference elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex_attention() if q.device.type == "cuda" else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def left_padded_positions_and_mask(
    left_pad: torch.Tensor, n_queries: int, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and mask for a batch of prompts of different lengths, left-padded to one.

    left_pad: (bs,) the number of padding slots at the start of each row. Slot s of row b
    holds position s - left_pad[b], so every row's first real token is at position 0, as
    it would be alone; queries at slots start..start+n_queries-1 attend to the real slots
    up to their own. A padding slot attends to itself only, which keeps its (unused)
    output finite: a row with no key at all would give NaN, and NaN times a zero attention
    weight is still NaN in the rows that skip it. Returns positions (bs, n_queries) and a
    mask (bs, 1, n_queries, start + n_queries) where True means "may attend".
    """
    slots = torch.arange(start, start + n_queries, device=left_pad.device)
    positions = (slots[None, :] - left_pad[:, None]).clamp(min=0)
    keys = torch.arange(start + n_queries, device=left_pad.device)
    causal = keys[None, :] <= slots[:, None]  # (n_queries, keys)
    real = keys[None, :] >= left_pad[:, None]  # (bs, keys)
    own = keys[None, :] == slots[:, None]
    return positions, ((causal & real[:, None, :]) | own)[:, None]


def attention_mask(
    n_queries: int, start: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for queries at positions start..start+n_queries-1.

    SDPA's `is_causal=True` aligns the triangle to the top-left corner, which is only
    right when there are as many keys as queries; with a cache (more keys than queries)
    query i may see every key up to position start + i, so an explicit mask is needed.
    """
    if start == 0:
        return None, n_queries > 1
    if n_queries == 1:
        return None, False  # one new token sees every cached position
    keys = torch.arange(start + n_queries, device=device)
    queries = torch.arange(start, start + n_queries, device=device)
    return keys[None, :] <= queries[:, None], False


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (GQA) and rotary positions."""

    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: tuple[torch.Tensor | None, bool],
        cache: KVCache | None,
        start_pos: int,
    ) -> torch.Tensor:
        """x: (bs, seqlen, dim); rope: (cos, sin); mask: (attn_mask, is_causal) for SDPA;
        with a cache, x holds positions start_pos..start_pos+seqlen-1."""
        bs, seqlen, _ = x.shape
        q = self.wq(x).view(bs, seqlen, self.n_heads, self.head_dim)  # (bs, seqlen, n_heads, head_dim)
        k = self.wk(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)  # (bs, seqlen, n_kv_heads, head_dim)
        v = self.wv(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)  # (bs, seqlen, n_kv_heads, head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # heads before positions, the layout SDPA wants
        q = q.transpose(1, 2)  # (bs, n_heads, seqlen, head_dim)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (bs, n_kv_heads, seqlen, head_dim)
        if cache is not None:
            # every position so far: (bs, n_kv_heads, start_pos + seqlen, head_dim)
            k, v = cache.update(self.layer_id, start_pos, k, v)
        attn_mask, is_causal = mask
        gqa = self.n_kv_heads != self.n_heads
        if isinstance(attn_mask, torch.Tensor) or attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                 enable_gqa=gqa)  # (bs, n_heads, seqlen, head_dim)
        elif isinstance(attn_mask, VarlenSegments):  # packed documents, flattened
            out = varlen(q, k, v, attn_mask)
        else:  # a flex attention BlockMask (packed documents)
            out = flex(q, k, v, attn_mask, gqa)
        out = out.transpose(1, 2)  # (bs, seqlen, n_heads, head_dim)
        return self.wo(out.reshape(bs, seqlen, -1))  # wo's input: (bs, seqlen, n_heads * head_dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: attention, then feed-forward."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: tuple[torch.Tensor | None, bool],
        cache: KVCache | None,
        start_pos: int,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The LLaMA decoder: embeddings, `n_layers` blocks, final norm, output projection."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # how packed segments (segment_ids) attend: one of PACKED_ATTENTION (_segment_mask)
        self.packed_attention = "auto"

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter (e.g. after `to_empty()` from the meta device).

        Normal(0, INIT_STD) for embeddings and projections; the two projections that write
        into the residual stream (wo, w2) are scaled by 1/sqrt(2·n_layers) so the residual's
        variance does not grow with depth (GPT-2's choice); norms start at one.
        """
        residual_std = INIT_STD / math.sqrt(2 * self.args.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual = name.endswith((".wo", ".w2"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else INIT_STD)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        start_pos: int = 0,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
        left_pad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (bs, seqlen, vocab_size) for tokens (bs, seqlen).

        Args:
            tokens: token ids.
            start_pos: the position of `tokens[:, 0]` (only with a cache): the cache holds
                positions 0..start_pos-1 and this call writes the next seqlen. The model
                keeps no position of its own; the caller passes start_pos + seqlen next.
            cache: keys and values of earlier positions, for decoding.
            segment_ids: (bs, seqlen) ids of samples packed into one row: attention stays
                inside each sample and positions restart at its start.
            left_pad: (bs,) for prompts of different lengths decoded as one batch: row b's
                first left_pad[b] cache slots are padding, never attended to and not
                counted as positions (`left_padded_positions_and_mask`).
        """
        return self.output(self._hidden(tokens, start_pos, cache, segment_ids, left_pad))

    def loss(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        *,
        segment_ids: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """The float32 *sum* of the token losses, so the caller can divide by the number of
        target tokens across micro-batches and ranks.

        The output layer and loss run inside this method (not on returned logits) so that
        they can go in chunks and a sharded model gathers the output weight for them (FSDP
        is told of this method from outside: `register_fsdp_forward_method`).

        Args:
            tokens: (bs, seqlen) token ids.
            labels: (bs, seqlen) target ids; -100 where no loss is taken.
            segment_ids: packed samples, as in `forward`.
            chunk_size: compute the output layer and loss in chunks of this many tokens,
                never holding all logits (`kernels.cross_entropy`); None: all logits at once.
        """
        h = self._hidden(tokens, segment_ids=segment_ids).flatten(0, 1)  # (bs * seqlen, dim)
        if chunk_size:
            return linear_cross_entropy(h, self.output.weight, labels.flatten(), chunk_size)
        return linear_cross_entropy_reference(h, self.output.weight, labels.flatten())

    def eval_stats(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        *,
        segment_ids: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For evaluation (call it under `torch.no_grad()`): (summed float32 loss, number of
        targets the argmax predicts), in chunks of `chunk_size` tokens (None: one chunk).

        Same arguments as `loss`; labels of -100 count in neither.
        """
        h = self._hidden(tokens, segment_ids=segment_ids).flatten(0, 1)  # (bs * seqlen, dim)
        return linear_cross_entropy_stats(h, self.output.weight, labels.flatten(),
                                          max(chunk_size or h.shape[0], 1))

    def _segment_mask(self, segment_ids: torch.Tensor):
        """The attention mask of packed segments, by `packed_attention`: "flex", a BlockMask
        (no L×L matrix); "varlen", the segments' offsets for the varlen flash kernel (CUDA,
        bf16/fp16); "sdpa", the dense boolean mask, SDPA's exact reference; "auto", as
        `resolve_packed_attention` says."""
        kind = resolve_packed_attention(self.packed_attention, segment_ids.device.type)
        if kind == "flex":
            return segment_block_mask(segment_ids)
        if kind == "varlen":
            return segment_varlen(segment_ids)
        return segment_positions_and_mask(segment_ids)[1]

    def _hidden(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
        left_pad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final normalised hidden states (bs, seqlen, dim): embeddings, blocks, norm."""
        seqlen = tokens.shape[1]
        if start_pos and cache is None:
            raise ValueError(f"start_pos {start_pos} needs the cache that holds the positions before it")
        if segment_ids is not None and left_pad is not None:
            raise ValueError("segment_ids (packed samples) and left_pad (padded prompts) exclude each other")
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed samples) cannot be used with a KV cache")
            positions = segment_positions(segment_ids)
            mask: tuple[Any, bool] = (self._segment_mask(segment_ids), False)
        elif left_pad is not None:
            positions, attn_mask = left_padded_positions_and_mask(left_pad, seqlen, start_pos)
            mask = (attn_mask, False)
        else:
            positions = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)
            mask = attention_mask(seqlen, start_pos, tokens.device)
        rope = rope_cos_sin(self.args.head_dim, positions, self.args.rope_theta)
        h = self.tok_embeddings(tokens)  # (bs, seqlen, dim)
        for layer in self.layers:
            h = layer(h, rope, mask, cache, start_pos)
        return self.norm(h)


def build_model(args: ModelArgs, *, init: bool = True) -> Transformer:
    """Build on the meta device (no memory, no wasted default init), then materialise it
    on the CPU in float32 (callers move and cast it).

    With `init=False` the parameters stay on the meta device, ready for
    `load_state_dict(..., assign=True)`.
    """
    with torch.device("meta"):
        model = Transformer(args)
    if not init:
        return model
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
