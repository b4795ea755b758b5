"""A conversion source: a checkpoint read lazily — its arguments, its tensors' specs, and
a way to fetch each.

Every reader in `model/formats/` returns a `Checkpoint` whose tensors carry the canonical
(Meta) names and Meta's rotary layout; every writer consumes one. Tensors are fetched one
at a time by name, so a conversion never holds the whole model in memory. `load_model`
turns any checkpoint into a `Transformer`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tokenizer.spm_io import load_sp

from .llama import ModelArgs, Transformer, build_model
from .tensor_io import FormatError, TensorSpec


@dataclass(frozen=True)
class Checkpoint:
    """A readable model: what it is, and its tensors by canonical name.

    Attributes:
        format: the format it was read from ("meta", "hf", "llama2c", "zhllama", "memory").
        path: where it was read from.
        args: the model's hyper-parameters.
        specs: canonical name → shape and dtype, in canonical order.
        get: fetches one tensor by canonical name (Meta layout), reading it from disk.
        tokenizer: the sentencepiece model that goes with it, if known.
        template: the SFT prompt template it was tuned with (a name in
            `tokenizer.templates.TEMPLATES`), if known: what a Hugging Face export writes
            as the tokenizer's chat_template.
    """

    format: str
    path: Path | None
    args: ModelArgs
    specs: dict[str, TensorSpec]
    get: Callable[[str], torch.Tensor]
    tokenizer: Path | None = None
    template: str | None = None

    def replace(self, **changes) -> Checkpoint:
        return dataclasses.replace(self, **changes)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    def main_dtype(self) -> torch.dtype:
        """The dtype of the embedding, which is the checkpoint's dtype for all practical use."""
        return self.specs["tok_embeddings.weight"].dtype


def iter_expected_shapes(args: ModelArgs) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Canonical tensor names and shapes for `args`, in canonical (module) order, lazily.

    Computed from the arguments alone, not from a model built on the meta device, so a
    params.json claiming a billion layers costs nothing until a tensor is found missing.
    """
    d, hd, h = args.dim, args.head_dim, args.hidden_dim
    layer = (("attention.wq", (args.n_heads * hd, d)), ("attention.wk", (args.kv_heads * hd, d)),
             ("attention.wv", (args.kv_heads * hd, d)), ("attention.wo", (d, args.n_heads * hd)),
             ("feed_forward.w1", (h, d)), ("feed_forward.w2", (d, h)), ("feed_forward.w3", (h, d)),
             ("attention_norm", (d,)), ("ffn_norm", (d,)))
    yield "tok_embeddings.weight", (args.vocab_size, d)
    for i in range(args.n_layers):
        for name, shape in layer:
            yield f"layers.{i}.{name}.weight", shape
    yield "norm.weight", (d,)
    yield "output.weight", (args.vocab_size, d)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Canonical tensor names and shapes for `args`, in canonical (module) order."""
    return dict(iter_expected_shapes(args))


def check_specs(specs: dict[str, TensorSpec], args: ModelArgs, where: str | Path,
                declared: str = "n_layers") -> dict[str, TensorSpec]:
    """Check names and shapes against `args`; return the specs in canonical order.

    Walks the expected tensors lazily and stops at the first that is missing or misshapen,
    so the cost is bounded by the tensors the file really holds, whatever `args` claim.

    Args:
        declared: where the layer count comes from, for the message (e.g.
            "config.json num_hidden_layers").

    Raises:
        FormatError: naming the first missing, unexpected or misshapen tensor.
    """
    ordered: dict[str, TensorSpec] = {}
    for name, shape in iter_expected_shapes(args):
        if name not in specs:
            more = _missing_count(args, len(ordered) + 1, declared)
            raise FormatError(f"{where}: tensor {name} is missing{more}")
        if specs[name].shape != shape:
            raise FormatError(
                f"{where}: tensor {name} has shape {list(specs[name].shape)} but the model's "
                f"parameters say {list(shape)}"
            )
        ordered[name] = specs[name]
    unexpected = [n for n in specs if n not in ordered]
    if unexpected:
        raise FormatError(f"{where}: unexpected tensor {unexpected[0]} for this model")
    return ordered


def _missing_count(args: ModelArgs, reached: int, declared: str) -> str:
    # counted, not listed: the arguments may claim any number of layers
    total = 3 + 9 * args.n_layers
    return f" ({declared} {args.n_layers} implies {total:,} tensors)" if total > reached else ""


# Rows past the tokenizer's pieces count as padding when they only round the vocabulary up
# to a multiple of some m no larger than this (what --pad_vocab_to_multiple_of, Meta's
# shard split and GPU-friendly padding produce); more is another tokenizer.
_MAX_PAD_MULTIPLE = 1024


def is_padding(pieces: int, rows: int) -> bool:
    """Whether `rows` is `pieces` rounded up to a multiple of some m ≤ 1024."""
    extra = rows - pieces
    return 0 < extra < _MAX_PAD_MULTIPLE and any(
        rows % m == 0 for m in range(extra + 1, _MAX_PAD_MULTIPLE + 1))


def check_tokenizer_rows(ckpt: Checkpoint, tokenizer: Path | None = None) -> str | None:
    """Hold the tokenizer's size against the embedding rows.

    A tokenizer larger than the embedding is refused (its last ids have no row); a smaller
    one only when the extra rows are padding (`is_padding`), and then a one-line
    note is returned for the caller to print.

    Args:
        ckpt: the model.
        tokenizer: the tokenizer to check (default: the checkpoint's; none: nothing to check).

    Raises:
        FormatError: naming both sizes and both files.
    """
    tok = tokenizer if tokenizer is not None else ckpt.tokenizer
    if tok is None:
        return None
    pieces, rows = load_sp(tok).vocab_size(), ckpt.args.vocab_size
    model = ckpt.path if ckpt.path is not None else "the model"
    if pieces > rows:
        raise FormatError(f"{tok}: the tokenizer has {pieces} pieces, but {model} has only {rows} "
                          f"embedding rows: ids {rows}..{pieces - 1} would have no row (resize the "
                          "model with python -m model.resize, or give the model's own tokenizer)")
    extra = rows - pieces
    if extra and not is_padding(pieces, rows):
        raise FormatError(f"{tok}: the tokenizer has {pieces} pieces, but {model} has {rows} "
                          f"embedding rows: {extra} more than padding would add (is it the "
                          "model's tokenizer?)")
    if extra:
        return (f"note: {model} has {rows} embedding rows for the {pieces} pieces of {tok}: "
                f"the last {extra} are padding and never produced")
    return None


BASE_FINGERPRINT_TENSORS = ("norm.weight", "layers.0.attention.wq.weight")


def tensor_fingerprint(ckpt: Checkpoint) -> str:
    """sha256 over a few of a checkpoint's tensors: what identifies the base an adapter
    was trained on, read lazily (two small tensors, not the model).

    Hashed as float32 values in the canonical (Meta) layout, with names and shapes, so
    the same weights give the same hash whatever format or storage dtype holds them.
    """
    digest = hashlib.sha256()
    for name in BASE_FINGERPRINT_TENSORS:
        t = ckpt.get(name).detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{list(t.shape)}:".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def with_dtype(ckpt: Checkpoint, dtype: torch.dtype | None) -> Checkpoint:
    """The same checkpoint with every floating tensor cast to `dtype` as it is fetched."""
    if dtype is None:
        return ckpt
    specs = {n: TensorSpec(s.shape, dtype if s.dtype.is_floating_point else s.dtype)
             for n, s in ckpt.specs.items()}
    get = ckpt.get

    def get_cast(name: str) -> torch.Tensor:
        return get(name).to(specs[name].dtype)

    return ckpt.replace(specs=specs, get=get_cast)


def pad_vocab(ckpt: Checkpoint, multiple_of: int | None) -> Checkpoint:
    """Grow the vocabulary to a multiple of `multiple_of` with zero rows.

    Needed to split a 49,953-row embedding evenly over model-parallel shards. The extra
    ids have no piece in the tokenizer; `model.generate` never samples them.
    """
    vocab = ckpt.args.vocab_size
    if not multiple_of or vocab % multiple_of == 0:
        return ckpt
    padded = -(-vocab // multiple_of) * multiple_of
    specs = dict(ckpt.specs)
    for name in ("tok_embeddings.weight", "output.weight"):
        specs[name] = TensorSpec((padded, ckpt.args.dim), specs[name].dtype)
    get = ckpt.get

    def get_padded(name: str) -> torch.Tensor:
        t = get(name)
        if name in ("tok_embeddings.weight", "output.weight"):
            t = torch.cat([t, t.new_zeros(padded - vocab, t.shape[1])])
        return t

    return ckpt.replace(args=ckpt.args.replace(vocab_size=padded), specs=specs, get=get_padded)


def from_state_dict(
    state_dict: dict[str, torch.Tensor], args: ModelArgs, tokenizer: Path | None = None
) -> Checkpoint:
    """A checkpoint over tensors already in memory (e.g. a trained model's state_dict)."""
    specs = {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in state_dict.items()}
    specs = check_specs(specs, args, "state_dict")
    return Checkpoint("memory", None, args, specs, state_dict.__getitem__, tokenizer)


def load_model(
    ckpt: Checkpoint,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Transformer:
    """Build a `Transformer` from a checkpoint: strict, one tensor at a time.

    The model is created on the meta device and each parameter is assigned from the
    checkpoint, so memory holds one copy of the weights, never two.
    """
    model = build_model(ckpt.args, init=False)
    state = {}
    for name in tqdm(ckpt.specs, desc="loading", unit="tensor", disable=not progress):
        t = ckpt.get(name)
        state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() and dtype else t.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model
