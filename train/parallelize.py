"""Apply activation checkpointing, compilation and FSDP2 to a model, from outside it.

The order matters (as in torchtitan): checkpoint wrappers go around each block first, then
`torch.compile` per block, then `fully_shard` per block and finally on the root, so each
block is one unit of all-gather / reduce-scatter and the root holds the embeddings, the
final norm and the output layer. The checkpoint wrappers also carry activation offloading:
what a checkpointed block keeps for backward is its input, and that can wait in CPU memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl, checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from model.quant import is_nf4
from model.tensor_io import parse_dtype

from .config import ConfigError, ParallelConfig

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


@functools.cache
def costly_ops() -> frozenset:
    """The ops whose outputs per-op checkpointing ("op") keeps: the matmuls (projections,
    LoRA factors) and attention, whichever kernel SDPA picks (flash, memory-efficient,
    cuDNN, the CPU's flash) or flex attention. As torchtitan's op-level policy: these are
    what recomputing costs; norms, rotary, SwiGLU's product and the residual adds are cheap
    elementwise work, recomputed in backward instead of kept."""
    aten = torch.ops.aten
    return frozenset({
        aten.mm.default, aten.addmm.default, aten.bmm.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch.ops.higher_order.flex_attention,
    })


def keep_costly_outputs(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The selective-checkpoint policy of "op": keep what `costly_ops` computes, recompute
    the rest (MUST_SAVE: the same choice in the forward and in its recomputation)."""
    return CheckpointPolicy.MUST_SAVE if op in costly_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_costly_contexts():
    return create_selective_checkpoint_contexts(keep_costly_outputs)


def offloaded_checkpoint(fn: Callable[..., Any], *args: Any, pin_memory: bool, **kwargs: Any) -> Any:
    """Non-reentrant `checkpoint`, its saved inputs in CPU memory until backward.

    `checkpoint` stores a block's inputs as saved tensors before it enters its own hooks
    (which replace everything the block saves by its recomputation), so `save_on_cpu`
    around it moves exactly those inputs, and brings them back when backward recomputes
    the block. What "op" keeps stays on the device. Pinned memory on GPUs, for
    asynchronous copies.
    """
    with torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def check_offload(checkpointing: str, offload: bool) -> None:
    """Offloading moves checkpointed blocks' inputs: without checkpointing there are none."""
    if offload and checkpointing == "none":
        raise ConfigError("parallel.activation_offload: offloads the inputs of checkpointed blocks; "
                          "set parallel.activation_checkpointing to full, selective or op")


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2,
                                   offload: bool = False, device_type: str = "cpu") -> None:
    """Recompute block activations in backward: every block ("full"), every n-th
    ("selective"), or every block keeping its matmul and attention outputs ("op"); with
    `offload`, each checkpointed block's input waits in CPU memory (`offloaded_checkpoint`).

    Non-reentrant checkpointing: gradients reach LoRA weights inside a block even when
    nothing before it requires grad (frozen embeddings), unlike the reentrant variant.
    """
    check_offload(mode, offload)
    if mode == "none":
        return
    kwargs: dict[str, Any] = {"context_fn": _keep_costly_contexts} if mode == "op" else {}
    if offload:
        kwargs.update(checkpoint_fn=offloaded_checkpoint, pin_memory=device_type == "cuda")
    for i, block in enumerate(model.layers):
        if mode in ("full", "op") or i % every == 0:
            # (with checkpoint_fn, that function is used instead: also non-reentrant)
            model.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kwargs)


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
    # NF4 weights (model.quantize) shard through their own all-gather hooks, which FSDP2
    # skips for a shard group of 1 (pytorch/pytorch#197999); with nothing to shard, FSDP
    # leaves them alone there. (The shard dimension is the mesh's last, HSDP's too.)
    alone = {p for p in model.parameters() if is_nf4(p)} if mesh.size(-1) == 1 else None
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=alone)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=alone)
    for method in FORWARD_METHODS:
        register_fsdp_forward_method(model, method)


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh) -> nn.Module:
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.selective_every,
                                   cfg.activation_offload, mesh.device_type)
    if cfg.compile:
        apply_compile(model)
    apply_fsdp(model, mesh, cfg.precision)
    return model
