"""AdamW with decay only where it belongs, a warmup + cosine schedule, and fp16 loss scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig
from .parallelize import clean_name


def param_groups(
    model: nn.Module, weight_decay: float, no_decay: tuple[str, ...] = ()
) -> list[dict]:
    """Trainable parameters in two groups: ≥2-D weights decay; norms, biases and other 1-D
    parameters (and the names in `no_decay`) do not."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or any(clean_name(name).startswith(n) for n in no_decay)
        (plain if exempt else decay).append(p)
    if not decay and not plain:
        raise ValueError("no parameter is trainable")
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, no_decay: tuple[str, ...] = ()) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, no_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def warmup_steps(cfg: OptimConfig) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(cfg.warmup_ratio * cfg.max_steps)


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at max_steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps(cfg)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, cfg.max_steps, cfg.min_lr_ratio))


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

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = state["scale"], state["good_steps"]
