"""AdamW with decay only where it belongs, the Hugging Face Trainer's learning-rate
schedules, and fp16 loss scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig
from .parallelize import clean_name


def param_groups(
    model: nn.Module, weight_decay: float, no_decay: tuple[str, ...] = ()
) -> list[dict]:
    """Trainable parameters in up to two groups: ≥2-D weights decay; norms, biases and other
    1-D parameters (and the names in `no_decay`) do not. An empty group is never made: it
    would be lost in an optimizer state's round trip."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or any(clean_name(name).startswith(n) for n in no_decay)
        (plain if exempt else decay).append(p)
    if not decay and not plain:
        raise ValueError("no parameter is trainable")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, no_decay: tuple[str, ...] = ()) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, no_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def warmup_steps(cfg: OptimConfig) -> int:
    """`warmup_steps` when set, else the ratio of max_steps rounded up (as the Trainer)."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_ratio * cfg.max_steps)


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float = 0.0,
              schedule: str = "cosine") -> float:
    """The multiplier of the learning rate for the 0-based optimizer step `step`.

    The same numbers as transformers' `get_cosine_schedule_with_warmup` (with
    `min_lr_rate` as `get_cosine_with_min_lr_schedule_with_warmup`),
    `get_linear_schedule_with_warmup` and `get_constant_schedule_with_warmup`: warmup from 0
    (`step / warmup`, so the first step of a warmup does not move the weights), then cosine
    to `min_ratio`, linear to 0, or constant.
    """
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant_with_warmup":
        return 1.0
    if schedule == "linear":
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup))
    progress = (step - warmup) / max(1, max_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return max(0.0, cosine * (1 - min_ratio) + min_ratio)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) under `cfg`: a pure function of
    the step, so a resumed run follows the schedule of the config it is given."""
    return cfg.lr * lr_factor(step, warmup_steps(cfg), cfg.max_steps, cfg.min_lr_ratio, cfg.schedule)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class LossScaler:
    """Dynamic loss scaling for fp16 training.

    The loss is multiplied by `scale` before backward so small fp16 gradients do not
    underflow; gradients are divided by it before clipping. When the (global) gradient norm
    is not finite the step is skipped and the scale halved; after `growth_interval` good
    steps it doubles. torch's GradScaler checks for infs per device, which under FSDP2 can
    let ranks disagree about skipping; the trainer decides from the global norm instead.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0

    @torch.no_grad()
    def unscale_(self, params: list[nn.Parameter]) -> None:
        if self.enabled:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self.scale)

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale /= 2
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2

    def state_dict(self) -> dict[str, torch.Tensor]:
        """As tensors: checkpoints hold nothing else."""
        return {"scale": torch.tensor(self.scale, dtype=torch.float64),
                "good_steps": torch.tensor(self.good_steps, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
