"""What each stage of the recipe trains, one function per stage, and the model built for it.

- `embeddings` (stage 1): only `tok_embeddings` and `output`; with `model.new_rows_from`,
  only their rows from that id on (the new tokens): the old rows get no gradient and no
  weight decay, so AdamW leaves them bit for bit.
- `lora` (stage 2, and instruction tuning): LoRA on `lora.targets` plus
  `lora.modules_to_save` in full; or an existing adapter continued (`lora.init_from`).
- `full`: every parameter.

`build_for_stage` then makes the model on the meta device, applies LoRA, marks what
trains, stores frozen weights in `model.dtype` (and, with `model.quantize: nf4`, the
blocks' frozen projections as NF4: QLoRA, stage lora only), shards it (FSDP2) and fills it
from the base checkpoint, one tensor at a time.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from model.formats import read_checkpoint
from model.llama import build_model
from model.lora import LoRAConfig, apply_lora, mark_trainable
from model.quant import QuantizeError, is_nf4, nf4_module, quantize_frozen, to_nf4
from model.source import Checkpoint
from model.tensor_io import parse_dtype

from .config import ConfigError, TrainConfig
from .distributed import DistInfo
from .lora_setup import plan_lora
from .parallelize import clean_name, parallelize

VOCAB_ROWS = ("tok_embeddings", "output")


@dataclass
class Stage:
    """What a stage trains, decided before any module exists."""

    base: Checkpoint  # the weights the model starts from (a continued adapter's embeddings in)
    trainable: tuple[str, ...] | None  # module prefixes that train besides LoRA; None: all
    lora: LoRAConfig | None = None
    init: dict[str, torch.Tensor] = field(default_factory=dict)  # starting LoRA factors
    no_decay: tuple[str, ...] = ()  # module prefixes kept out of weight decay
    mask_grads: Callable[[nn.Module], None] | None = None  # applied to gradients before clipping


def embeddings_stage(cfg: TrainConfig, base: Checkpoint) -> Stage:
    """Stage 1: the embeddings and output layer, optionally only their new rows."""
    start = cfg.model.new_rows_from
    if start is None:
        return Stage(base, VOCAB_ROWS)
    if start >= base.args.vocab_size:
        raise ConfigError(f"model.new_rows_from: {start} is not below the model's vocabulary "
                          f"size {base.args.vocab_size}: no row would train")
    return Stage(base, VOCAB_ROWS, no_decay=VOCAB_ROWS,
                 mask_grads=lambda model: mask_old_rows(model, start))


def lora_stage(cfg: TrainConfig, base: Checkpoint) -> Stage:
    """Stage 2 and SFT: LoRA plus the modules trained in full (or an adapter continued)."""
    plan = plan_lora(cfg.lora, base)
    return Stage(plan.base, plan.config.modules_to_save, lora=plan.config, init=plan.init)


def full_stage(cfg: TrainConfig, base: Checkpoint) -> Stage:
    """Every parameter trains."""
    return Stage(base, None)


STAGES: dict[str, Callable[[TrainConfig, Checkpoint], Stage]] = {
    "embeddings": embeddings_stage, "lora": lora_stage, "full": full_stage}


@dataclass
class Built:
    model: nn.Module
    base: Checkpoint  # the checkpoint the frozen weights come from
    stage: Stage
    origin: Checkpoint  # model.path as read (before a continued adapter's embeddings)

    @property
    def lora(self) -> LoRAConfig | None:
        return self.stage.lora


def build_for_stage(cfg: TrainConfig, dist: DistInfo) -> Built:
    """Meta-device model → LoRA → trainable marks → shard → load weights."""
    origin = read_checkpoint(cfg.model.path, progress=False)
    check_quantize(cfg)
    check_packed_attention(cfg, dist.device)
    if cfg.stage != "lora" and cfg.lora.init_from is not None:
        raise ConfigError(f"lora.init_from: only for stage lora (stage is {cfg.stage!r})")
    stage = STAGES[cfg.stage](cfg, origin)
    model = sharded_meta_model(cfg, stage, dist.mesh)
    model.to_empty(device=dist.device)
    load_weights(model, stage.base, cfg.seed, stage.init)
    return Built(model, stage.base, stage, origin)


def sharded_meta_model(cfg: TrainConfig, stage: Stage, mesh) -> nn.Module:
    """The stage's model on the meta device: LoRA, trainable marks, frozen weights in
    model.dtype (NF4 with model.quantize), checkpointing, compile and FSDP2 over `mesh`
    (what `build_for_stage` loads, and what the memory planner traces)."""
    model = build_model(stage.base.args, init=False)
    model.packed_attention = cfg.model.packed_attention
    if stage.lora is not None:
        apply_lora(model, stage.lora)
    if stage.trainable is not None:
        mark_trainable(model, stage.trainable)
    frozen_dtype = parse_dtype(cfg.model.dtype)
    for p in model.parameters():
        if not p.requires_grad:  # frozen weights may be stored narrower; trained ones stay fp32
            p.data = p.data.to(frozen_dtype)
    if cfg.model.quantize == "nf4":
        quantize_for_ranks(model, cfg, mesh.size(-1))  # the shard group (HSDP: a node)
    return parallelize(model, cfg.parallel, mesh)


def check_packed_attention(cfg: TrainConfig, device: torch.device) -> None:
    """`model.packed_attention: varlen` is flash attention's kernel: CUDA only (bf16 or fp16,
    which `train.config.check` holds to)."""
    if cfg.model.packed_attention == "varlen" and device.type != "cuda":
        raise ConfigError(f"model.packed_attention: varlen (flash attention) needs a CUDA device; this run "
                          f"is on {device.type}: use auto or sdpa")


def check_quantize(cfg: TrainConfig) -> None:
    """`model.quantize: nf4` is for stage lora, with torchao installed (read-only, fast).

    Stages embeddings and full write the whole model out, frozen weights included, and full
    trains the projections themselves: NF4 has no place in either.
    """
    if cfg.model.quantize == "none":
        return
    if cfg.stage != "lora":
        raise ConfigError(f"model.quantize: {cfg.model.quantize} (QLoRA) is for stage lora, not "
                          f"{cfg.stage!r}: that stage exports or trains the weights it would "
                          "quantize; set model.quantize: none")
    try:
        nf4_module()
    except QuantizeError as e:
        raise ConfigError(f"model.quantize: {e}; or set model.quantize: none") from None


def quantize_for_ranks(model: nn.Module, cfg: TrainConfig, shards: int) -> None:
    """The frozen projections as NF4 on the meta device (filled by `load_weights`).

    FSDP shards an NF4 weight by whole rows over the `shards` ranks of a shard group and
    needs every rank's part the same size.
    """
    try:
        names = quantize_frozen(model)
    except QuantizeError as e:
        raise ConfigError(f"model.quantize: {e}") from None
    shapes = dict(model.named_parameters())
    uneven = [n for n in names if shapes[n].shape[0] % shards]
    if uneven:
        raise ConfigError(f"model.quantize: {cfg.model.quantize} shards each weight by rows over "
                          f"{shards} ranks, but {uneven[0]} has {shapes[uneven[0]].shape[0]} "
                          "rows; use a number of ranks (per node with parallel.replicate) that divides it")


def initial_tensor(name: str, shape: torch.Size, base: Checkpoint, seed: int,
                   init: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The starting value of a parameter: from `init` (a continued adapter's factors), the
    checkpoint, or LoRA's initialisation.

    LoRA's A is drawn from a generator seeded by the parameter's name, so its value does
    not depend on the number of ranks or on the order parameters are visited in.
    """
    if init and name in init:
        return init[name]
    if name in base.specs:
        return base.get(name)
    if name.endswith(".lora_b"):
        return torch.zeros(shape)
    if name.endswith(".lora_a"):  # kaiming-uniform with a = √5, as nn.Linear: U(±1/√fan_in)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        bound = 1 / math.sqrt(shape[1])
        return (torch.rand(shape, generator=g) * 2 - 1) * bound
    raise KeyError(f"no initial value for parameter {name}")


@torch.no_grad()
def load_weights(model: nn.Module, base: Checkpoint, seed: int,
                 init: dict[str, torch.Tensor] | None = None) -> None:
    """Fill every (possibly sharded) parameter, one full tensor at a time."""
    for raw_name, p in list(model.named_parameters()):
        full = initial_tensor(clean_name(raw_name), p.shape, base, seed, init).to(p.device, p.dtype)
        if is_nf4(p.to_local() if isinstance(p, DTensor) else p):
            assign_nf4(model, raw_name, p, to_nf4(full, clean_name(raw_name)))
            continue
        if isinstance(p, DTensor):  # each rank keeps its own slice; no communication needed
            full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        p.copy_(full)


def assign_nf4(model: nn.Module, raw_name: str, p: nn.Parameter, full: torch.Tensor) -> None:
    """Put a whole weight's NF4 (`full`) in place of parameter `p`, or this rank's rows of it.

    The weight is quantized whole and then split, never each part on its own: a part's
    block scales and their groups are those of the whole, so the ranks' parts gather back
    to exactly what one process holds. The parameter is assigned, not copied into (copying
    into an NF4 tensor quantizes again); FSDP takes the new one up (`load_state_dict`'s
    assign is how it expects a sharded parameter to be replaced).
    """
    value = full
    if isinstance(p, DTensor):
        mesh = p.device_mesh
        for dim, placement in enumerate(p.placements):
            if isinstance(placement, Shard):  # FSDP shards rows: dim 0, evenly (checked)
                value = torch.chunk(value, mesh.size(dim), dim=placement.dim)[mesh.get_local_rank(dim)]
        value = DTensor.from_local(value, mesh, p.placements, run_check=False,
                                   shape=p.shape, stride=p.stride())
    owner, _, attr = raw_name.rpartition(".")
    model.get_submodule(owner).load_state_dict({attr: nn.Parameter(value, requires_grad=False)},
                                               strict=False, assign=True)


def mask_old_rows(model: nn.Module, new_rows_from: int) -> None:
    """Zero the gradient rows of old tokens in tok_embeddings and output (stage 1 option).

    With no gradient and no weight decay (those tensors get none in this mode), AdamW
    leaves the rows exactly as they were. Under FSDP each rank masks its own rows: a
    (vocab, 1) column is sharded like the gradient, so no full-size mask is ever built.
    """
    for raw_name, p in model.named_parameters():
        if clean_name(raw_name) in ("tok_embeddings.weight", "output.weight") and p.grad is not None:
            keep = torch.ones(p.shape[0], 1, device=p.device, dtype=p.grad.dtype)
            keep[:new_rows_from] = 0
            if isinstance(p.grad, DTensor):
                keep = distribute_tensor(keep, p.grad.device_mesh, p.grad.placements,
                                         src_data_rank=None).to_local()
                p.grad.to_local().mul_(keep)
            else:
                p.grad.mul_(keep)
