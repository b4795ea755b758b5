"""Apply activation checkpointing, compilation and FSDP2 to a model, from outside it.

The order matters (as in torchtitan): checkpoint wrappers go around each block first, then
`torch.compile` per block, then `fully_shard` per block and finally on the root, so each
block is one unit of all-gather / reduce-scatter and the root holds the embeddings, the
final norm and the output layer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl, checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from model.tensor_io import parse_dtype

from .config import ParallelConfig

# The model's methods besides `forward` that run it (the trainer's loss and evaluation):
# FSDP hooks only `forward`, so these are registered to gather the root's parameters.
FORWARD_METHODS = ("loss", "eval_stats")
# Wrappers insert these into parameter names; state_dict() keys stay clean.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name as the model itself spells it, without wrapper prefixes."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> None:
    """Recompute block activations in backward: every block ("full") or every n-th ("selective").

    Non-reentrant checkpointing: gradients reach LoRA weights inside a block even when
    nothing before it requires grad (frozen embeddings), unlike the reentrant variant.
    """
    if mode == "none":
        return
    for i, block in enumerate(model.layers):
        if mode == "full" or i % every == 0:
            model.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately: small graphs, compiled once, reused by every layer."""
    for i, block in enumerate(model.layers):
        model.layers[i] = torch.compile(block)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, precision: str) -> None:
    """Shard each block and the root over `mesh`; compute in `precision`, reduce in fp32.

    The root's embeddings, final norm and output layer are gathered around `forward` and
    around each of `FORWARD_METHODS` (the output weight is used inside `loss`, for its
    chunks, never on returned logits).
    """
    policy = MixedPrecisionPolicy(param_dtype=parse_dtype(precision), reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for method in FORWARD_METHODS:
        register_fsdp_forward_method(model, method)


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh) -> nn.Module:
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.selective_every)
    if cfg.compile:
        apply_compile(model)
    apply_fsdp(model, mesh, cfg.precision)
    return model
