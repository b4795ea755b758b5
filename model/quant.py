"""QLoRA's frozen base: the blocks' projection weights stored as NF4 (torchao's `NF4Tensor`).

NF4 (QLoRA's 4-bit NormalFloat) stores each block of 64 weights as 4-bit indices into 16
levels spread like a normal distribution, scaled by the block's absolute maximum; those
scales are themselves quantized to int8 in groups ("double quantization"), leaving about
0.52 bytes per weight against bf16's 2.

- `quantize_frozen(model)` turns every frozen `nn.Linear` weight inside `model.layers` (the
  seven projections, LoRA's targets or not) into NF4, on the meta device or on a loaded
  model. The embeddings, the output layer, the norms and anything trained stay as they are.
- `to_nf4(tensor)` quantizes one weight with the block sizes below; its result is what
  every rank and every world size holds (they split it, never quantize their own part).
- Forward: `F.linear` on an NF4 weight goes through torchao's `LinearNF4`, which dequantizes
  the weight per call (to the input's dtype) and saves only the NF4 weight for backward, so
  `nn.Linear` and `LoRALinear` run unchanged. No weight gradient exists for it.
- `tensor_bytes` / `frozen_weight_bytes`: what the frozen weights occupy, NF4's parts counted.

Block sizes: 64 weights per block (QLoRA's). QLoRA groups 256 block scales for their
int8 quantization; here a group never crosses a row — it is the largest divisor of the
blocks per row up to 256 (64 for a 4,096-wide weight) — so a weight split by rows, as
FSDP shards it, splits into whole groups on any number of ranks that divides its rows.

torchao is an optional extra (`pip install 'zhllama[torchao]'`): imported only when asked.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from torch import nn

NF4_BLOCK = 64  # weights per block, each with its own scale (QLoRA's)
MAX_SCALE_GROUP = 256  # block scales per int8 group at most (QLoRA's group)
NF4_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"
INSTALL_HINT = "pip install 'zhllama[torchao]'"


class QuantizeError(ValueError):
    """torchao is missing, or a weight NF4 cannot hold; the message says which."""


@contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Raise the level of `loggers` for a moment (restored after)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def nf4_module() -> ModuleType:
    """torchao's NF4 module, imported on first use.

    Importing torchao warns that its CUDA-only kernels (mxfp8, cutlass) did not load and that
    one of its enums is registered the deprecated way; NF4 needs neither, so those import-time
    warnings are not shown.

    Raises:
        QuantizeError: torchao is not installed, or does not import.
    """
    try:
        with _quiet("torchao", "torch.utils._pytree"):
            import importlib

            return importlib.import_module(NF4_MODULE)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "torchao":
            raise QuantizeError(f"nf4 needs torchao, which fails to import: {e}") from None
        raise QuantizeError(f"nf4 needs torchao, which is not installed ({INSTALL_HINT})") from None
    except ImportError as e:  # installed, but not for this torch
        raise QuantizeError(f"nf4 needs torchao, which fails to import: {e}") from None


def is_nf4(t: Any) -> bool:
    """Whether `t` is an NF4 tensor (or parameter). False whenever torchao was never imported:
    then no NF4 tensor can exist, and nothing is imported to find that out."""
    module = sys.modules.get(NF4_MODULE)
    return module is not None and isinstance(t, module.NF4Tensor)


def scale_group(in_features: int) -> int:
    """Block scales per int8 group: the largest divisor of the blocks per row up to 256."""
    per_row = in_features // NF4_BLOCK
    return max(d for d in range(1, min(per_row, MAX_SCALE_GROUP) + 1) if per_row % d == 0)


def check_quantizable(name: str, shape: torch.Size | tuple[int, ...]) -> None:
    """Refuse a weight NF4 cannot hold in whole blocks per row.

    Raises:
        QuantizeError: naming the weight and its shape.
    """
    if len(shape) != 2 or shape[1] % NF4_BLOCK != 0:
        raise QuantizeError(f"{name}: shape {list(shape)}: NF4 needs a 2-D weight whose rows "
                            f"are a multiple of {NF4_BLOCK} long")


def to_nf4(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """`weight` (2-D, frozen) as an NF4Tensor of its dtype, on its device (meta included)."""
    check_quantizable(name, weight.shape)
    nf4 = nf4_module()
    return nf4.to_nf4(weight.detach(), block_size=NF4_BLOCK,
                      scaler_block_size=scale_group(weight.shape[1]))


def quantizable_weights(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(name, module) of every linear layer inside `model.layers` whose weight is frozen."""
    for name, module in model.layers.named_modules(prefix="layers"):
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            yield name, module


def quantize_frozen(model: nn.Module) -> list[str]:
    """Store every frozen projection weight of the blocks as NF4 (in place).

    Call it after the trainable parameters are marked (a trained weight is never touched)
    and after frozen weights have their storage dtype: NF4 keeps that dtype for its scales
    and for what it dequantizes to. Works on the meta device (then fill the weights later
    with `to_nf4` of the real ones) and on a loaded model.

    Returns:
        The names of the weights quantized.

    Raises:
        QuantizeError: torchao is missing, or a weight's rows are not a multiple of 64 long
            (checked for all before any is changed).
    """
    found = [(f"{name}.weight", module) for name, module in quantizable_weights(model)
             if not is_nf4(module.weight)]
    for name, module in found:
        check_quantizable(name, module.weight.shape)
    for name, module in found:
        module.weight = nn.Parameter(to_nf4(module.weight, name), requires_grad=False)
    return [name for name, _ in found]


def dequantize(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor an NF4 tensor stands for (in its dtype); any other tensor as it is."""
    return t.get_original_weight() if is_nf4(t) else t


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies: for NF4, its 4-bit codes, int8 scales, their group factors,
    the mean of its scales and its 16-level table."""
    if is_nf4(t):
        parts, _ = t.__tensor_flatten__()
        return sum(getattr(t, part).nbytes for part in parts)
    return t.nbytes


def frozen_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter that does not train (NF4 or not), each counted once."""
    return sum(tensor_bytes(p) for p in model.parameters() if not p.requires_grad)


__all__ = [
    "QuantizeError", "nf4_module", "is_nf4", "scale_group", "check_quantizable", "to_nf4",
    "quantizable_weights", "quantize_frozen", "dequantize", "tensor_bytes", "frozen_weight_bytes",
]
