"""Training checkpoints: `step-N/` directories written with torch.distributed.checkpoint.

What a step holds: the trainable parameters (the frozen base is re-read from model.path),
the optimizer and scheduler states, the loss scaler, progress counters (all through DCP,
so any number of ranks can save and load), and per rank the data position and RNG states
(`rank-R.pt`). A step is written under a temporary name and renamed when every rank is
done, with `meta.json` last, so a run killed while saving never leaves a step that looks
complete. Starting a run again on the same output directory resumes from the newest step.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from .distributed import DistInfo, barrier

_STEP = re.compile(r"step-(\d+)")
_OPTIONS = StateDictOptions(ignore_frozen_params=True)


@dataclass
class Progress:
    """Counters that survive a restart."""

    step: int = 0
    tokens: int = 0  # target tokens trained on, all ranks
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens": self.tokens, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.tokens, self.skipped_steps = state["step"], state["tokens"], state["skipped_steps"]


@dataclass
class TrainState(Stateful):
    """Everything DCP saves and loads in place (shared across ranks or sharded by them)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    progress: Progress = field(default_factory=Progress)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": get_model_state_dict(self.model, options=_OPTIONS),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIONS),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": self.progress.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(
            ignore_frozen_params=True, strict=False))
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=_OPTIONS)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress.load_state_dict(state["progress"])


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def step_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with meta.json), oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := _STEP.fullmatch(p.name)) and (p / "meta.json").exists()]
    return sorted(found)


def step_of(path: Path) -> int:
    """N of a `step-N` directory."""
    return int(_STEP.fullmatch(path.name).group(1))


def set_aside(paths: list[Path], dist: DistInfo) -> None:
    """Rename checkpoints to `step-N.nonfinite` (kept for inspection, never resumed from)."""
    if dist.is_main:
        for p in paths:
            target = p.with_name(p.name + ".nonfinite")
            if target.exists():
                shutil.rmtree(target)
            p.rename(target)
    barrier()


def remove_partial(output_dir: Path, dist: DistInfo) -> None:
    """Remove `.step-N.tmp` directories a killed run was writing (called at start)."""
    if dist.is_main and output_dir.is_dir():
        for tmp in output_dir.glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()


def latest(output_dir: Path) -> Path | None:
    dirs = step_dirs(output_dir)
    return dirs[-1][1] if dirs else None


def save(
    output_dir: Path, state: TrainState, data_state: dict[str, Any], config_yaml: str,
    dist: DistInfo, keep_last: int, protect: Path | None = None,
) -> Path:
    """Write `step-N/` atomically (all ranks call this); prune all but the last `keep_last`
    and `protect` (the last checkpoint known to be good)."""
    step = state.progress.step
    final, tmp = output_dir / f"step-{step}", output_dir / f".step-{step}.tmp"
    if dist.is_main and tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while saving
    barrier()
    dcp.save({"train": state}, checkpoint_id=tmp)
    torch.save({"data": data_state, "rng": rng_state(dist.device)}, tmp / f"rank-{dist.rank}.pt")
    barrier()
    if dist.is_main:
        (tmp / "config.yaml").write_text(config_yaml)
        meta = {"step": step, "world_size": dist.world_size, **state.progress.state_dict()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in step_dirs(output_dir)[:-keep_last] if keep_last > 0 else []:
            if protect is None or old != protect:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(path: Path, state: TrainState, dist: DistInfo) -> dict[str, Any] | None:
    """Load a step into `state` in place; return this rank's data state (None if the world
    size changed, in which case data positions cannot be mapped and the caller restarts
    the data order from the saved step)."""
    dcp.load({"train": state}, checkpoint_id=path)
    meta = json.loads((path / "meta.json").read_text())
    rank_file = path / f"rank-{dist.rank}.pt"
    if meta["world_size"] != dist.world_size or not rank_file.exists():
        return None
    saved = torch.load(rank_file, weights_only=True)
    set_rng_state(saved["rng"], dist.device)
    return saved["data"]
