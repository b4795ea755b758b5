"""What a resumed run may change: checked before anything is built or written.

A run restarted on an output directory resumes from its newest complete step. The
optimizer's moments and the step come from the checkpoint; the learning rate, schedule,
weight decay, betas, clipping and max_steps from the config given now (each change is
reported). Settings that define what is being trained — the base and its weights, the
stage, the LoRA shape, the data and its layout — cannot change within a run: such a
resume is refused, naming every key with its old and new value.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from model.source import Checkpoint
from tokenizer.files import OutputOverlapsInput, check_output_against_inputs

from . import steps
from .config import ConfigError, TrainConfig, to_dict

# Keys whose change makes a checkpoint meaningless for the new run (a list's entries as
# data.sources.path: data.sources[i].path for every i).
FIXED = ("stage", "seed", "model.path", "model.new_rows_from", "data.path", "data.sources.path",
         "data.sources.weight", "data.block_size", "data.val_fraction", "data.pack",
         "data.max_seq_length", "lora.r", "lora.alpha", "lora.targets", "lora.modules_to_save",
         "lora.init_from", "optim.name")  # optim.name: the saved moments are in its format
# Keys that name directories, compared as the directories they name.
PATHS = ("model.path", "data.path", "data.sources.path", "lora.init_from")
# Keys that differ between runs without changing what is trained; not worth a word.
QUIET = ("output_dir",)


@dataclass(frozen=True)
class ResumePlan:
    path: Path | None  # the step to resume from; None: a fresh start
    changed: tuple[str, ...] = ()  # "key: old → new" for every setting that changed


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested keys as `section.key`; a list of mappings as `key[i].field`."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{prefix}{k}[{i}]."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _generic(key: str) -> str:
    """data.sources[1].path → data.sources.path: the name FIXED and PATHS use."""
    return re.sub(r"\[\d+\]", "", key)


def _paths_resolved(flat: dict[str, Any]) -> dict[str, Any]:
    """The keys that name directories (PATHS, data.val_sets.NAME) as the directories they name."""
    return {k: (str(Path(v).resolve()) if (_generic(k) in PATHS or k.startswith("data.val_sets."))
                and isinstance(v, str) and v else v)
            for k, v in flat.items()}


def base_fingerprint(base: Checkpoint) -> str:
    """A sha256 that changes when the base's shape or weights change: its parameters and a
    few rows of the tensors every stage trains (first and last rows of the embeddings and
    output, the final norm, a row of the first projection). Cheap on a 70B."""
    h = hashlib.sha256(json.dumps(base.args.to_params(), sort_keys=True).encode())
    for name in ("tok_embeddings.weight", "output.weight", "norm.weight", "layers.0.attention.wq.weight"):
        if name in base.specs:
            t = base.get(name)
            rows = t if t.ndim == 1 else t[[0, -1]]
            h.update(name.encode())
            h.update(rows.float().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_model_outside_output(cfg: TrainConfig) -> None:
    """model.path must not be output_dir or inside it: the run writes there."""
    out, model = Path(cfg.output_dir).resolve(), Path(cfg.model.path).resolve()
    if model == out or out in model.parents:
        raise ConfigError(f"model.path: {cfg.model.path} lies inside output_dir {cfg.output_dir}, "
                          "which this run writes to; choose another output_dir")


def check_data_outside_output(cfg: TrainConfig) -> None:
    """No token directory the run reads (data.path, data.sources, data.val_sets) may be
    output_dir, hold it or lie inside it: the run writes there."""
    for key, path in cfg.data.inputs():
        try:
            check_output_against_inputs(cfg.output_dir, (path,))
        except OutputOverlapsInput as e:
            raise ConfigError(f"{key}: {e}; output_dir is what this run writes to") from None


def plan_resume(cfg: TrainConfig, fingerprint: str) -> ResumePlan:
    """The step to resume from and what changed; ConfigError for a change that cannot be
    resumed (or a step made by another stage or model)."""
    out = Path(cfg.output_dir)
    path = steps.latest_complete(out)
    if path is None:
        return ResumePlan(None)
    meta = steps.read_step_meta(path)
    try:
        saved_raw = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        if not isinstance(saved_raw, dict):
            raise ValueError("not a mapping")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"{path / 'config.yaml'}: unreadable ({e})") from None
    old = _paths_resolved(flatten(saved_raw))
    new = _paths_resolved(flatten(to_dict(cfg)))
    diffs = [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
             if _norm(old.get(k)) != _norm(new.get(k)) and k not in QUIET]
    fixed = [d for d in diffs if _generic(d[0]) in FIXED]
    if meta.get("base_fingerprint") and meta["base_fingerprint"] != fingerprint:
        fixed.append(("model weights", "those the run started from", "different ones"))
    if fixed:
        listed = "; ".join(f"{k}: {a!r} → {b!r}" for k, a, b in fixed)
        raise ConfigError(
            f"{out}: cannot resume {path.name}, which was trained with other settings that cannot "
            f"change within a run ({listed}); start a new run with another output_dir "
            f"(e.g. --output_dir={str(out).rstrip('/')}-2)")
    return ResumePlan(path, tuple(f"{k}: {a!r} → {b!r}" for k, a, b in diffs))


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
