"""A checkpoint being converted: its arguments, its tensors' specs, and a way to fetch each.

Every reader in `model/formats/` returns a `Checkpoint` whose tensors carry the canonical
(Meta) names and Meta's rotary layout; every writer consumes one. Tensors are fetched one
at a time by name, so a conversion never holds the whole model in memory. `load_model`
turns any checkpoint into a `Transformer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

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
    """

    format: str
    path: Path | None
    args: ModelArgs
    specs: dict[str, TensorSpec]
    get: Callable[[str], torch.Tensor]
    tokenizer: Path | None = None

    def replace(self, **changes) -> Checkpoint:
        return dataclasses.replace(self, **changes)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    def main_dtype(self) -> torch.dtype:
        """The dtype of the embedding, which is the checkpoint's dtype for all practical use."""
        return self.specs["tok_embeddings.weight"].dtype


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Canonical tensor names and shapes for `args`, in canonical (module) order."""
    model = build_model(args, init=False)  # meta device: costs no memory
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_specs(specs: dict[str, TensorSpec], args: ModelArgs, where: str | Path) -> dict[str, TensorSpec]:
    """Check names and shapes against `args`; return the specs in canonical order.

    Raises:
        FormatError: naming the first missing, unexpected or misshapen tensor.
    """
    expected = expected_shapes(args)
    missing = [n for n in expected if n not in specs]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FormatError(f"{where}: tensor {missing[0]} is missing{more}")
    unexpected = [n for n in specs if n not in expected]
    if unexpected:
        raise FormatError(f"{where}: unexpected tensor {unexpected[0]} for this model")
    for name, shape in expected.items():
        if specs[name].shape != shape:
            raise FormatError(
                f"{where}: tensor {name} has shape {list(specs[name].shape)} but the model's "
                f"parameters say {list(shape)}"
            )
    return {name: specs[name] for name in expected}


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
