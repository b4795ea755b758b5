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

from torch import nn

from .config import TrainConfig
from .distributed import DistInfo


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


def start_block(cfg: TrainConfig, model: nn.Module, data: Sized, dist: DistInfo, resumed_step: int) -> str:
    """The run's opening summary."""
    o, p = cfg.optim, cfg.parallel
    total, trainable = parameter_counts(model)
    rows = o.micro_batch_size * o.grad_accum * dist.world_size
    epochs = o.max_steps * rows / max(data.rows_per_epoch(), 1)
    per_epoch = data.rows_per_epoch()
    ckpt = p.activation_checkpointing + (f" (every {p.selective_every})" if p.activation_checkpointing == "selective" else "")
    lines = [
        f"stage {cfg.stage}: {total:,} parameters, {trainable:,} trainable "
        f"({100 * trainable / max(total, 1):.2f}%)",
        f"data: {data.num_tokens():,} tokens, {per_epoch:,} rows per epoch",
        f"batch: {o.micro_batch_size} rows x {o.grad_accum} accumulation x {dist.world_size} "
        f"rank(s) = {rows:,} rows per step",
        f"steps: {o.max_steps:,}" + (f" (optim.epochs {o.epochs:g})" if o.epochs is not None else "")
        + f" = {epochs:.2f} epochs" + (f"; resuming at step {resumed_step:,}" if resumed_step else ""),
        f"precision {p.precision}, activation checkpointing {ckpt}, world size {dist.world_size}",
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
