"""Training checkpoints: `step-N/` directories written with torch.distributed.checkpoint.

What a step holds, and where:
- through DCP (any number of ranks can save and load it): the trainable parameters (the
  frozen base is re-read from model.path), the optimizer's moments and step counts, the
  loss scaler and the progress counters, every one of them a tensor;
- `rank-R.safetensors`, per rank: the RNG states (tensors) and the data position (JSON in
  the file's metadata; a global position, the same in every rank's file, so that a run
  resumed on another number of ranks reads on where it stopped);
- `config.yaml` (the resolved config) and `meta.json` (the step, the world size, a
  fingerprint of the base, and every file of the step with its size).

Nothing is unpickled on resume except DCP's `.metadata`, and that through an unpickler
that knows only DCP's own metadata classes; DCP's "bytes" items (arbitrary pickles) are
refused. The learning rate, schedule and other optimizer settings are not saved at all:
a resumed run takes them from the config it is given.

A step is written under a temporary name, every file fsynced, then renamed; pruning renames
a step out of the way before deleting it. A step whose files do not match its meta.json is
skipped on resume, with a warning, in favour of the previous complete one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from .distributed import DistInfo, barrier

_STEP = re.compile(r"step-(\d+)")
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
META_FORMAT = "zhllama-train-step"


class CheckpointError(ValueError):
    """A step directory that cannot be trusted or used; the message names the file."""


# ---------------------------------------------------------------------------------------
# what DCP saves: tensors only


@dataclass
class Progress:
    """Counters that survive a restart."""

    step: int = 0
    tokens: int = 0  # target tokens trained on, all ranks
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=torch.int64) for k, v in self.as_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step, self.tokens, self.skipped_steps = (
            int(state[k]) for k in ("step", "tokens", "skipped_steps"))

    def as_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens": self.tokens, "skipped_steps": self.skipped_steps}


@dataclass
class TrainState(Stateful):
    """Everything DCP saves and loads in place (shared across ranks or sharded by them).

    Only the optimizer's per-parameter state (moments, step counts) is saved: its parameter
    groups — learning rate, betas, weight decay — are those of the optimizer built from the
    current config, so a resumed run trains with the settings it was started with.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    progress: Progress = field(default_factory=Progress)

    def state_dict(self) -> dict[str, Any]:
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIONS)
        return {
            "model": get_model_state_dict(self.model, options=_OPTIONS),
            "optimizer": {"state": optim["state"]},
            "scaler": self.scaler.state_dict(),
            "progress": self.progress.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(
            ignore_frozen_params=True, strict=False))
        groups = get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIONS)["param_groups"]
        set_optimizer_state_dict(self.model, self.optimizer,
                                 {"state": state["optimizer"]["state"], "param_groups": groups},
                                 options=_OPTIONS)
        self.scaler.load_state_dict(state["scaler"])
        self.progress.load_state_dict(state["progress"])


# ---------------------------------------------------------------------------------------
# reading DCP without running anyone's code


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The classes DCP's `.metadata` pickle may name: DCP's own metadata dataclasses, the
    torch types they hold, and the path of the checkpoint. Nothing that can run code."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {}
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
                 "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        allowed[(metadata.__name__, name)] = getattr(metadata, name)
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a name lookup
    for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, where: Path) -> None:
        super().__init__(file)
        self.where, self.allowed = where, _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise CheckpointError(f"{self.where}: refused to load {module}.{name}: not part of a "
                                  "checkpoint's metadata (the file was tampered with)")
        return self.allowed[(module, name)]


def read_dcp_metadata(path: Path) -> Metadata:
    """DCP's `.metadata` of a step, through the restricted unpickler."""
    where = path / ".metadata"
    try:
        with open(where, "rb") as f:
            meta = _MetadataUnpickler(f, where).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{where}: not a readable checkpoint metadata file ({e})") from None
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise CheckpointError(f"{where}: not a checkpoint metadata file")
    for key, item in meta.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata):  # a pickle: our checkpoints never hold one
            raise CheckpointError(f"{where}: item {key} is a pickled object; zhllama checkpoints "
                                  "hold tensors only (the file was tampered with)")
    return meta


class SafeReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by the restricted unpickler (tensor items
    are already read by DCP with `torch.load(weights_only=True)`)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata: zhllama never writes it
            raise CheckpointError(f"{self.path}: no per-rank metadata")
        meta = read_dcp_metadata(Path(self.path))
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class TensorOnlyPlanner(DefaultLoadPlanner):
    """Refuses DCP's bytes items, which `DefaultLoadPlanner` would unpickle unrestricted."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise CheckpointError(f"item {read_item.dest_index.fqn} is a pickled object; refused")


# ---------------------------------------------------------------------------------------
# per-rank state: RNG tensors and the data position, in safetensors


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"rank-{rank}.safetensors"


def write_rank_state(path: Path, rank: int, data_state: dict[str, Any], device: torch.device) -> None:
    tensors = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    save_file(tensors, _rank_file(path, rank), metadata={"data": json.dumps(data_state)})


def _read_rank_file(path: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(RNG tensors, data position) of rank `rank`'s file of a step."""
    file = _rank_file(path, rank)
    try:
        tensors = load_file(file)
        from safetensors import safe_open

        with safe_open(file, "pt") as f:
            data = json.loads((f.metadata() or {})["data"])
    except (SafetensorError, KeyError, json.JSONDecodeError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: the data position is not a mapping")
    if "rng.torch" not in tensors:
        raise CheckpointError(f"{file}: unreadable (no rng.torch)")
    return tensors, data


def read_rank_state(path: Path, rank: int, device: torch.device) -> dict[str, Any]:
    """Restore this rank's RNG states; return the data position."""
    tensors, data = _read_rank_file(path, rank)
    try:
        torch.set_rng_state(tensors["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    except RuntimeError as e:
        raise CheckpointError(f"{_rank_file(path, rank)}: unreadable ({e})") from None
    return data


def reseed_rank(path: Path, rank: int) -> dict[str, Any]:
    """For a rank the step has no file for (it was saved by fewer ranks): seed this
    process's generators afresh, from rank 0's saved state and `rank` (reproducible, and
    unlike any other rank's stream or a fresh start's); return the data position, which
    every rank's file holds alike."""
    tensors, data = _read_rank_file(path, 0)
    digest = hashlib.sha256(tensors["rng.torch"].numpy().tobytes() + f"rank {rank}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)  # CPU and every GPU
    return data


# ---------------------------------------------------------------------------------------
# step directories


def step_of(path: Path) -> int:
    """N of a `step-N` directory."""
    return int(_STEP.fullmatch(path.name).group(1))


def step_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """Directories named `step-N` that have a meta.json, oldest first (not yet verified)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := _STEP.fullmatch(p.name)) and (p / "meta.json").is_file()]
    return sorted(found)


def read_step_meta(path: Path) -> dict[str, Any]:
    """meta.json of a step, checked key by key (it is read before anything else)."""
    file = path / "meta.json"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise CheckpointError(f"{file}: not a zhllama training step (format {META_FORMAT!r} expected)")
    for key in ("step", "world_size", "tokens", "skipped_steps"):
        if type(meta.get(key)) is not int or meta[key] < 0:
            raise CheckpointError(f"{file}: {key}: expected a non-negative integer, got {meta.get(key)!r}")
    files = meta.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in files.items()):
        raise CheckpointError(f"{file}: files: expected a mapping of file name to size")
    for name in files:
        if "/" in name or "\\" in name or name in ("", ".", "..") or name.startswith(".."):
            raise CheckpointError(f"{file}: files: {name!r} is not a plain file name of the step")
    if meta["step"] != step_of(path):
        raise CheckpointError(f"{file}: step {meta['step']} in a directory named {path.name}")
    return meta


def verify_step(path: Path) -> dict[str, Any]:
    """meta.json of a step whose every listed file is present with its recorded size."""
    meta = read_step_meta(path)
    for name, size in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{path}: {name} has {f.stat().st_size:,} bytes, meta.json says {size:,}")
    for required in (".metadata", "config.yaml"):
        if required not in meta["files"]:
            raise CheckpointError(f"{path / 'meta.json'}: files: {required} is not listed")
    return meta


def latest_complete(output_dir: Path, warn: bool = True) -> Path | None:
    """The newest step that verifies; steps that do not are skipped with a warning."""
    for _, path in reversed(step_dirs(output_dir)):
        try:
            verify_step(path)
            return path
        except CheckpointError as e:
            if warn:
                print(f"warning: skipping {path.name}: {e}", file=sys.stderr)
    return None


def set_aside(paths: list[Path], dist: DistInfo) -> None:
    """Rename checkpoints to `step-N.nonfinite` (kept for inspection, never resumed from)."""
    if dist.is_main:
        for p in paths:
            target = p.with_name(p.name + ".nonfinite")
            if target.exists():
                shutil.rmtree(target)
            p.rename(target)
        _fsync_dir(paths[0].parent) if paths else None
    barrier()


def remove_partial(output_dir: Path, dist: DistInfo) -> None:
    """Remove what a killed run left: steps being written (`.step-N.tmp`) or deleted."""
    if dist.is_main and output_dir.is_dir():
        for tmp in [*output_dir.glob(".step-*.tmp"), *output_dir.glob(".step-*.deleting")]:
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass


def _prune(output_dir: Path, keep_last: int, protect: Path | None) -> None:
    """Delete all but the newest `keep_last` steps (and `protect`), each renamed first so a
    step is never half deleted under its real name."""
    if keep_last <= 0:
        return
    for _, old in step_dirs(output_dir)[:-keep_last]:
        if protect is None or old != protect:
            doomed = old.with_name(f".{old.name}.deleting")
            old.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def save(
    output_dir: Path, state: TrainState, data_state: dict[str, Any], config_yaml: str,
    dist: DistInfo, keep_last: int, protect: Path | None = None, base_fingerprint: str = "",
) -> Path:
    """Write `step-N/` atomically (all ranks call this); prune all but the last `keep_last`
    and `protect` (the last checkpoint known to be good)."""
    step = state.progress.step
    final, tmp = output_dir / f"step-{step}", output_dir / f".step-{step}.tmp"
    if dist.is_main and tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while saving
    barrier()
    try:
        dcp.save({"train": state}, checkpoint_id=tmp)
    except CheckpointException as e:  # e.g. a full disk on some rank
        raise CheckpointError(_first_cause(e, tmp)) from None
    write_rank_state(tmp, dist.rank, data_state, dist.device)
    barrier()
    if dist.is_main:
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {"format": META_FORMAT, "step": step, "world_size": dist.world_size,
                **{k: v for k, v in state.progress.as_dict().items() if k != "step"},
                "base_fingerprint": base_fingerprint, "files": files}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for p in tmp.iterdir():  # on disk before the rename makes the step visible
            _fsync_file(p)
        _fsync_dir(tmp)
        if final.exists():
            doomed = final.with_name(f".{final.name}.deleting")
            final.rename(doomed)
            shutil.rmtree(doomed)
        tmp.rename(final)
        _fsync_dir(output_dir)
        _prune(output_dir, keep_last, protect)
    barrier()
    return final


def _first_cause(e: CheckpointException, path: Path) -> str:
    """The message of the first rank's failure, without DCP's traceback text."""
    for failure in e.failures.values():
        err = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(err, CheckpointError):
            return str(err)
        if refused := re.search(r"GLOBAL ([\w.]+)", str(err)):  # torch.load(weights_only=True)
            return (f"{path}: refused to load {refused.group(1)} from a tensor item (the checkpoint "
                    "was tampered with; zhllama checkpoints hold tensors only)")
        text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        # "global metadata read failed: <our message>; rank local …": keep ours
        m = re.search(r"metadata read failed: (.*?)(; rank local|$)", text)
        return m.group(1) if m else f"{path}: {text}"
    return f"{path}: checkpoint failed"


def load(path: Path, state: TrainState, dist: DistInfo) -> dict[str, Any]:
    """Load a verified step into `state` in place; return the data position (global: the
    same for any number of ranks).

    Each rank takes back its own RNG states. A step saved by another number of ranks
    says so in a note: the data reads on where it stopped, but ranks the step has no
    states for (a run on more ranks) start new ones (`reseed_rank`), so dropout differs
    from an unbroken run's; the states of ranks the run no longer has are left unused.
    """
    meta = verify_step(path)
    read_dcp_metadata(path)  # refuse a tampered file here, before DCP logs its own tracebacks
    try:
        dcp.load({"train": state}, storage_reader=SafeReader(path), planner=TensorOnlyPlanner())
    except CheckpointException as e:  # DCP gathers each rank's exception; report the first
        raise CheckpointError(_first_cause(e, path)) from None
    saved = meta["world_size"]
    if saved != dist.world_size and dist.is_main:
        new = f"rank {saved}" if dist.world_size == saved + 1 else f"ranks {saved}-{dist.world_size - 1}"
        fresh = f"; {new} start new random states (dropout differs from an unbroken run)" \
            if dist.world_size > saved else ""
        print(f"note: {path} was saved by {saved} rank(s), this run has {dist.world_size}: the data "
              f"reads on where it stopped{fresh}", file=sys.stderr)
    if dist.rank < saved:
        return read_rank_state(path, dist.rank, dist.device)
    return reseed_rank(path, dist.rank)
