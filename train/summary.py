"""What a run says about itself: a block at the start (the model, the data, the batch, how
many steps and epochs that makes, precision, checkpointing, ranks) and one at the end (time,
throughput, the final and best validation figures), as the Hugging Face Trainer prints.

`optim.epochs` is turned into steps here too, since both need the same count: the batch
rows of an epoch, from the dataset (all ranks together: the same steps on any number of
ranks with the same global batch).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from model.llama import resolve_packed_attention

from .config import ParallelConfig, TrainConfig
from .distributed import DistInfo
from .optim import warmup_steps


# Each path of `model.packed_attention`, as the summary names it.
PACKED_PATHS = {"flex": "flex attention, block mask", "varlen": "varlen flash attention",
                "sdpa": "SDPA, dense mask"}


class Sized(Protocol):
    """What a training dataset tells about its size."""

    def rows_per_epoch(self) -> int: ...  # batch rows of an epoch, all ranks together
    def num_tokens(self) -> int: ...  # tokens of one epoch, all ranks together


def steps_for_epochs(cfg: TrainConfig, data: Sized, dist: DistInfo) -> TrainConfig:
    """With optim.epochs set, the config whose max_steps covers that many epochs of `data`
    (rounded up to whole steps); otherwise `cfg` itself."""
    o = cfg.optim
    if o.epochs is None:
        return cfg
    rows = o.micro_batch_size * o.grad_accum * dist.world_size  # per step
    steps = max(1, math.ceil(o.epochs * data.rows_per_epoch() / rows))
    return dataclasses.replace(cfg, optim=dataclasses.replace(o, max_steps=steps))


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters; a sharded parameter counts with its full shape."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def optimizer_line(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> str:
    """How the optimizer steps, named from the optimizer built (fused or foreach is chosen
    there, by device), and the schedule of its rates."""
    o = cfg.optim
    kind = type(optimizer).__name__
    how = [k for k in ("fused", "foreach") if optimizer.defaults.get(k)]
    rates = f"lr {o.lr:g}" + (f" (tok_embeddings/output {o.embedding_lr:g})" if o.embedding_lr is not None else "")
    clip = f"clip {o.clip_grad_norm:g}" if o.clip_grad_norm else "no clipping"
    return (f"optimizer: {kind}{' (' + how[0] + ')' if how else ''}, {rates}, {o.schedule} with "
            f"{warmup_steps(o):,} warmup steps, weight decay {o.weight_decay:g}, {clip}")


def loss_phrase(p: ParallelConfig) -> str:
    """How the output layer and loss run, as the summary and the memory plan both say it."""
    return f"loss chunks of {p.loss_chunk_size:,} tokens" if p.loss_chunk_size else "whole-batch loss"


def documents_phrase(cfg: TrainConfig, dist: DistInfo) -> str:
    """How packed SFT samples or document-masked blocks attend, where the data is so."""
    if not (cfg.data.pack or cfg.data.document_mask):
        return ""
    kind = resolve_packed_attention(cfg.model.packed_attention, dist.device.type)
    return f"; attention inside each document ({PACKED_PATHS[kind]})"


def memory_line(cfg: TrainConfig, dist: DistInfo) -> str:
    """Precision and every memory lever the run uses."""
    p = cfg.parallel
    ckpt = p.activation_checkpointing + (f" (every {p.selective_every})" if p.activation_checkpointing == "selective" else "")
    parts = [f"precision {p.precision}"]
    if cfg.model.quantize != "none":
        parts.append(f"frozen base weights {cfg.model.quantize}")
    parts.append(f"activation checkpointing {ckpt}" + (", offloaded to the CPU" if p.activation_offload else ""))
    parts.append(loss_phrase(p))
    if p.compile:
        parts.append("compiled blocks")
    world = f"world size {dist.world_size}"
    if p.replicate > 1:
        world += f" ({p.replicate} replicas x {dist.world_size // p.replicate} shards)"
    return ", ".join(parts + [world])


def start_block(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, data: Sized,
                dist: DistInfo, resumed_step: int) -> str:
    """The run's opening summary."""
    o = cfg.optim
    total, trainable = parameter_counts(model)
    rows = o.micro_batch_size * o.grad_accum * dist.world_size
    epochs = o.max_steps * rows / max(data.rows_per_epoch(), 1)
    per_epoch = data.rows_per_epoch()
    lines = [
        f"stage {cfg.stage}: {total:,} parameters, {trainable:,} trainable "
        f"({100 * trainable / max(total, 1):.2f}%)",
        f"data: {data.num_tokens():,} tokens, {per_epoch:,} rows per epoch" + documents_phrase(cfg, dist),
        f"batch: {o.micro_batch_size} rows x {o.grad_accum} accumulation x {dist.world_size} "
        f"rank(s) = {rows:,} rows per step",
        f"steps: {o.max_steps:,}" + (f" (optim.epochs {o.epochs:g})" if o.epochs is not None else "")
        + f" = {epochs:.2f} epochs" + (f"; resuming at step {resumed_step:,}" if resumed_step else ""),
        optimizer_line(cfg, optimizer),
        memory_line(cfg, dist),
    ]
    return "\n".join("  " + l if i else l for i, l in enumerate(lines))


LOWER_IS_BETTER = ("loss", "ppl", "bpc", "bpb")


@dataclass
class RunReport:
    """What the loop measured, for the closing summary."""

    steps: int = 0  # steps taken in this process (not counting those before a resume)
    seconds: float = 0.0
    tokens: int = 0  # tokens read in those steps, all ranks
    final: dict[str, float] = field(default_factory=dict)  # the last evaluation's figures
    best: dict[str, tuple[float, int]] = field(default_factory=dict)  # key -> (lowest, step)

    def evaluated(self, step: int, figures: dict[str, Any]) -> None:
        self.final = dict(figures)
        for k, v in figures.items():
            if not k.endswith(LOWER_IS_BETTER):
                continue
            if k not in self.best or v < self.best[k][0]:
                self.best[k] = (v, step)


def _duration(seconds: float) -> str:
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{seconds:.1f} s"


def end_block(report: RunReport) -> str:
    """The run's closing summary (lower is better for every figure shown as best)."""
    rate = report.tokens / report.seconds if report.seconds else 0.0
    lines = [f"trained {report.steps:,} steps in {_duration(report.seconds)}: {rate:,.0f} tokens/s"]
    shown = [k for k in report.final if k.endswith(("loss", "bpc"))]
    if shown:
        lines.append("final: " + ", ".join(f"{k} {report.final[k]:.4f}" for k in shown))
        lines.append("best: " + ", ".join(f"{k} {report.best[k][0]:.4f} (step {report.best[k][1]:,})"
                                          for k in shown))
    return "\n".join("  " + l if i else l for i, l in enumerate(lines))
