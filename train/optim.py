"""The optimizer (torch's AdamW, or torchao's 8-bit AdamW) with decay only where it belongs
and the vocabulary matrices at their own rate if asked, the Hugging Face Trainer's
learning-rate schedules for every parameter group, and fp16 loss scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ConfigError, OptimConfig
from .parallelize import clean_name

# The vocabulary matrices, trained in full (stage 1, or lora.modules_to_save): with
# optim.embedding_lr they get a rate of their own. LoRA factors on `output` are LoRA's.
VOCAB_WEIGHTS = ("tok_embeddings.weight", "output.weight")


def param_groups(
    model: nn.Module, weight_decay: float, no_decay: tuple[str, ...] = (),
    lr: float | None = None, embedding_lr: float | None = None,
) -> list[dict]:
    """Trainable parameters in up to four groups: ≥2-D weights decay; norms, biases and other
    1-D parameters (and the names in `no_decay`) do not; with `embedding_lr`, the vocabulary
    matrices (VOCAB_WEIGHTS) form groups of their own. Given `lr`, each group records its base
    rate as `initial_lr` (as torch's schedulers name it), which `set_lr` schedules. An empty
    group is never made: it would be lost in an optimizer state's round trip."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = clean_name(name)
        exempt = p.ndim < 2 or any(name.startswith(n) for n in no_decay)
        own_rate = embedding_lr is not None and name in VOCAB_WEIGHTS
        groups.setdefault((own_rate, exempt), []).append(p)
    if not groups:
        raise ValueError("no parameter is trainable")
    out = []
    for own_rate, exempt in sorted(groups):  # a fixed order: the state's round trip needs it
        group = {"params": groups[own_rate, exempt], "weight_decay": 0.0 if exempt else weight_decay}
        if lr is not None:
            group["lr"] = group["initial_lr"] = embedding_lr if own_rate else lr
        out.append(group)
    return out


def adamw8bit_class() -> type[torch.optim.Optimizer]:
    """torchao's AdamW8bit, or a ConfigError naming the setting and the extra."""
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        raise ConfigError("optim.name: adamw8bit needs the torchao package (pip install "
                          "'zhllama[torchao]'), or set optim.name: adamw") from None
    return AdamW8bit


def build_optimizer(model: nn.Module, cfg: OptimConfig, no_decay: tuple[str, ...] = ()) -> torch.optim.Optimizer:
    """AdamW over `param_groups`: torch's (optim.name adamw) or torchao's 8-bit one (adamw8bit:
    both moments in 8 bits, blockwise scaled, for tensors of ≥ 4,096 elements; ¼ of the state).

    torch's is fused when every parameter is a floating CUDA tensor (one kernel for all
    of them, no temporaries), and otherwise foreach (one call per operation over all the
    parameters: under FSDP each is a DTensor, whose per-tensor dispatch dominates a step;
    on CPU it computes the very floats of torch's default for-loop).

    torchao's moments are its OptimState8bit, a tensor subclass (uint8 codes, a scale per
    block of 256, the 256-value map): DCP saves and loads them in place like any tensor,
    and `torch.load(weights_only=True)` rebuilds them because torchao registers the class
    as safe, so a step with them resumes bit for bit; its rates are float32 tensors, which
    `set_lr` fills in place. The step compiles itself (torch.compile, per shape): slow
    the first time in a process, and on CPU it needs a C++ compiler.
    """
    groups = param_groups(model, cfg.weight_decay, no_decay, cfg.lr, cfg.embedding_lr)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw8bit":
        return adamw8bit_class()(groups, **kwargs)
    params = [p for g in groups for p in g["params"]]
    if all(p.device.type == "cuda" and torch.is_floating_point(p) for p in params):
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


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


def lr_at(step: int, cfg: OptimConfig, base: float | None = None) -> float:
    """The learning rate of optimizer step `step` (0-based) under `cfg` for a group whose
    base rate is `base` (default optim.lr): a pure function of the step, so a resumed run
    follows the schedule of the config it is given."""
    return (cfg.lr if base is None else base) * lr_factor(
        step, warmup_steps(cfg), cfg.max_steps, cfg.min_lr_ratio, cfg.schedule)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: OptimConfig) -> float:
    """Set every group to its rate at `step` (its `initial_lr` times the schedule's factor,
    as torch's LambdaLR computes it); return optim.lr's, the rate the logs show."""
    for group in optimizer.param_groups:
        rate = lr_at(step, cfg, group.get("initial_lr"))
        if isinstance(group["lr"], torch.Tensor):  # torchao keeps it a tensor, changed in place
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate
    return lr_at(step, cfg)


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
