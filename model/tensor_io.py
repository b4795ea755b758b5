"""Streaming tensor files: write safetensors tensor by tensor, read with bounded memory,
and create output directories atomically.

Converting a 13B checkpoint must not hold two copies of it in memory. Readers here map
files lazily and are reopened every 64 MB or so, so pages already read are released
(a mapped page stays in the process's resident set until its mapping goes away); the
writer takes tensors one at a time and writes each straight to disk.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tokenizer.cli import refused_pickle

# safetensors' dtype names (the format's spec) for the dtypes a LLaMA checkpoint holds.
SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
DTYPES_BY_SAFETENSORS_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
# What a user may call the dtypes a model is stored in (--dtype, model.dtype, ...).
DTYPES_BY_NAME = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
MODEL_DTYPES = frozenset(DTYPES_BY_NAME.values())


class FormatError(ValueError):
    """A checkpoint or model directory that cannot be read as what it claims to be."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor that will be written (known before its data is)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def read_json(path: Path) -> Any:
    """A JSON file, or one clear FormatError saying it is missing or invalid."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{path.parent}: {path.name} is missing") from None
    except ValueError as e:  # bad JSON, not UTF-8, an integer of thousands of digits
        raise FormatError(f"{path}: invalid JSON ({e})") from None


def read_weight_index(index: Path) -> dict[str, str]:
    """The `weight_map` of a weight index (Hugging Face's `*.index.json`): tensor → file.

    The file names come from an untrusted file: each must be a plain relative path inside
    the index's directory (no `..`, nothing absolute), or the index is refused by name.
    Checked on the names as written, not resolved, so the symlinked files of a Hugging
    Face cache (snapshots/… → ../../blobs/…) are still read.
    """
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index}: not a weight index (no weight_map object)")
    for tensor, fname in weight_map.items():
        if not isinstance(fname, str) or not fname:
            raise FormatError(f"{index}: weight_map.{tensor}: expected a file name, got {fname!r}")
        parts = Path(fname).parts
        if Path(fname).is_absolute() or "\\" in fname or ".." in parts:
            raise FormatError(f"{index}: weight_map.{tensor}: {fname!r} lies outside the model "
                              "directory; only files beside the index are read")
    return dict(weight_map)


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'float16' / 'fp16' / 'f16' → torch.float16, etc.; None stays None."""
    if name is None:
        return None
    if name not in DTYPES_BY_NAME:
        raise ValueError(f"unknown dtype {name!r}; use float32, float16 or bfloat16")
    return DTYPES_BY_NAME[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → 'bfloat16': how manifests and Hugging Face's config.json spell it."""
    return str(dtype).removeprefix("torch.")


def safetensors_dtype(name: str, allowed: Iterable[torch.dtype], file: Path, tensor: str) -> torch.dtype:
    """The torch dtype a safetensors header's dtype `name` stands for, if one of `allowed`.

    Raises:
        FormatError: naming the file, the tensor and the dtype.
    """
    dtype = DTYPES_BY_SAFETENSORS_NAME.get(name)
    if dtype is None or dtype not in allowed:
        raise FormatError(f"{file}: tensor {tensor} has unsupported dtype {name}")
    return dtype


def _header(specs: dict[str, TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, spec in specs.items():
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Pad with spaces so the data starts 8-byte aligned, as safetensors' own writer does.
    return raw + b" " * (-len(raw) % 8)


def write_safetensors(
    path: str | Path,
    specs: dict[str, TensorSpec],
    get_tensor: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> None:
    """Write a safetensors file, fetching and writing one tensor at a time.

    The header (names, dtypes, shapes, offsets) goes first, computed from `specs`; then each
    tensor's bytes in the order of `specs`. Only one tensor is in memory at a time, unlike
    `safetensors.torch.save_file`, which needs the whole dictionary.
    """
    header = _header(specs, metadata)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for name, spec in specs.items():
            tensor = get_tensor(name)
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise FormatError(
                    f"tensor {name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                    f"expected {spec.shape} {spec.dtype}"
                )
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))
            if on_tensor is not None:
                on_tensor(name)


def plan_shards(specs: dict[str, TensorSpec], max_shard_bytes: int) -> list[dict[str, TensorSpec]]:
    """Split tensors, in order, into consecutive groups of at most `max_shard_bytes`."""
    shards: list[dict[str, TensorSpec]] = [{}]
    size = 0
    for name, spec in specs.items():
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = spec
        size += spec.nbytes
    return shards


def write_sharded_safetensors(
    out_dir: Path,
    prefix: str,
    specs: dict[str, TensorSpec],
    get_tensor: Callable[[str], torch.Tensor],
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> list[str]:
    """Write `prefix.safetensors`, or `prefix-0000k-of-0000n.safetensors` plus
    `prefix.safetensors.index.json` (Hugging Face's layout) when one file would be too big.

    Returns the file names written.
    """
    shards = plan_shards(specs, max_shard_bytes)
    if len(shards) == 1:
        names = [f"{prefix}.safetensors"]
    else:
        names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(out_dir / name, shard, get_tensor, metadata, on_tensor)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs.values())},
            "weight_map": {t: name for name, shard in zip(names, shards) for t in shard},
        }
        (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


class Reopening:
    """Calls `open_fn()` lazily and opens it again after `release_bytes` have been read.

    Used for memory-mapped checkpoints: dropping the mapping is the only way to release
    the pages already read from the resident set.
    """

    def __init__(self, open_fn: Callable[[], Any], release_bytes: int = 64 << 20) -> None:
        self._open_fn = open_fn
        self._release_bytes = release_bytes
        self._handle: Any = None
        self._read = 0

    def get(self, upcoming_bytes: int = 0) -> Any:
        """The open handle; reopened first if reading `upcoming_bytes` would pass the limit."""
        if self._handle is not None and self._read and self._read + upcoming_bytes > self._release_bytes:
            self._handle = None
            self._read = 0
        if self._handle is None:
            self._handle = self._open_fn()
        return self._handle

    def account(self, nbytes: int) -> None:
        """Record bytes read; past the threshold, drop the handle (and its mapping)."""
        self._read += nbytes
        if self._read >= self._release_bytes:
            self._handle = None
            self._read = 0


def safe_torch_load(path: Path, mmap: bool = True) -> Any:
    """`torch.load` that never runs code from the file, with one clear error if it fails.

    `weights_only=True` refuses any pickle that would import or call something other than
    tensors and plain containers; `mmap=True` maps instead of reading the whole file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # what weights_only refuses: name what it tried to load
        raise FormatError(f"{path}: refused: {refused_pickle(e)}") from None
    except OSError:  # missing, unreadable: the command's error line names path and errno
        raise
    except RuntimeError as e:
        if mmap and "mmap" in str(e):
            # Files from torch < 1.6 (not a zip archive) cannot be mapped; read them whole.
            return safe_torch_load(path, mmap=False)
        raise FormatError(f"{path}: cannot be read as a PyTorch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # the unpickler raises many types for hostile or broken files
        raise FormatError(f"{path}: refused or unreadable ({_first_line(e)})") from None


# safetensors' own limit on the header (its MAX_HEADER_SIZE): anything above is not a header.
_MAX_SAFETENSORS_HEADER = 100_000_000


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file whose header cannot be true, saying how it is broken.

    safetensors' own errors ("incomplete metadata, file not fully covered") do not say
    that a file is truncated, nor by how much; the header says how long the file must be.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise FormatError(f"{path}: {size} bytes, too short to be a safetensors file")
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise FormatError(f"{path}: its header length field says {n:,} bytes, but the file "
                              f"has {size - 8:,} after it (truncated, or not a safetensors file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:  # not JSON, or not UTF-8
        raise FormatError(f"{path}: its header is not valid JSON ({e}); not a safetensors "
                          "file, or a corrupt one") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: its header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise FormatError(f"{path}: header entry {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
    short = end - (size - 8 - n)
    if short > 0:
        raise FormatError(f"{path}: {short:,} bytes short of what its header describes "
                          "(truncated download or copy?)")


def open_safetensors(path: Path) -> Any:
    """`safe_open(path)`, after `check_safetensors`; one FormatError for any broken file."""
    check_safetensors(path)
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types
        raise FormatError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None


class TensorFile:
    """The tensors of one safetensors file or torch `.bin`, read one at a time: shapes come
    from the header (or the mapped pickle), data only when asked for."""

    def __init__(self, file: Path) -> None:
        self.file, self._tensors = file, None
        if file.suffix == ".safetensors":
            with open_safetensors(file) as f:
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        else:
            state = safe_torch_load(file)  # mapped: tensors are read when touched
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise FormatError(f"{file}: not a dictionary of tensors")
            self._tensors = state
            self.shapes = {k: tuple(t.shape) for k, t in state.items()}

    def get(self, key: str) -> torch.Tensor:
        return self.load([key])[key]

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if self._tensors is not None:
            return {k: self._tensors[k] for k in keys}
        with safe_open(self.file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}

    def equal(self, a: str, b: str, chunk_bytes: int = 64 << 20) -> bool:
        """Whether two tensors are equal, compared a block of rows at a time."""
        if self._tensors is not None:
            return torch.equal(self._tensors[a], self._tensors[b])
        shape = self.shapes[a]
        if shape != self.shapes[b]:
            return False
        with safe_open(self.file, framework="pt") as f:
            if not shape:
                return torch.equal(f.get_tensor(a), f.get_tensor(b))
            sa, sb = f.get_slice(a), f.get_slice(b)
            row = 4 * max(1, math.prod(shape[1:]))  # bytes of a float32 row, an upper bound
            step = max(1, chunk_bytes // row)
            return all(torch.equal(sa[i:i + step], sb[i:i + step]) for i in range(0, shape[0], step))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def total_bytes(specs: Iterable[TensorSpec]) -> int:
    return sum(s.nbytes for s in specs)


def return_freed_memory_promptly() -> None:
    """Ask glibc to give large freed blocks back to the system at once (process-wide).

    glibc raises its mmap threshold after each large free (up to 32 MB), after which
    tensors of a few MB come from the heap and stay cached there once freed, so the
    resident set of a conversion wanders by hundreds of MB from run to run. A fixed 1 MB
    threshold makes every tensor its own mapping, returned on free. Called by command-line
    entry points only; does nothing where glibc's mallopt is absent.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
        libc.mallopt(m_trim_threshold, 1 << 20)
    except (OSError, AttributeError, TypeError):
        pass
