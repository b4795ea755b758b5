"""Readers and writers of the checkpoint formats users own.

Readers return a `model.source.Checkpoint` (canonical names, Meta rotary layout);
writers take one. `read_checkpoint` detects the format of a path.
"""

from __future__ import annotations

from pathlib import Path

from ..source import Checkpoint
from ..tensor_io import FormatError
from .hf import WEIGHT_FILES, read_hf, write_hf
from .llama2c import looks_like_llama2c, read_llama2c
from .meta import read_meta, write_meta
from .zhllama import is_model_dir, read_model_dir, write_model_dir

__all__ = ["detect_format", "read_checkpoint", "write_hf", "write_meta", "write_model_dir"]


def detect_format(path: str | Path) -> str:
    """'meta', 'hf', 'zhllama' or 'llama2c', from what a path holds."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory")
    if path.is_file():
        if looks_like_llama2c(path):
            return "llama2c"
        if path.name.startswith("consolidated.") and path.suffix == ".pth":
            raise FormatError(f"{path}: give the directory holding the consolidated.*.pth and params.json")
        raise FormatError(f"{path}: unknown format (not a llama2.c float32 model file)")
    if any(path.glob("consolidated.*.pth")):
        return "meta"
    if (path / "config.json").exists():
        return "hf"
    if is_model_dir(path):
        return "zhllama"
    raise FormatError(
        f"{path}: unknown format: expected consolidated.*.pth + params.json (Meta), config.json + "
        f"{' or '.join(WEIGHT_FILES[:2])} (Hugging Face), params.json + model.safetensors "
        f"(zhllama), or a llama2.c .bin file"
    )


def read_checkpoint(
    path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    verify_checksum: bool = True,
    progress: bool = True,
) -> Checkpoint:
    """Open any supported checkpoint lazily; `tokenizer` overrides the one found beside it."""
    fmt = detect_format(path)
    if fmt == "meta":
        ckpt = read_meta(path, verify_checksum=verify_checksum, progress=progress)
    elif fmt == "hf":
        ckpt = read_hf(path)
    elif fmt == "zhllama":
        ckpt = read_model_dir(path)
    else:
        ckpt = read_llama2c(path)
    if tokenizer is not None:
        tok = Path(tokenizer)
        tok = tok / "tokenizer.model" if tok.is_dir() else tok
        if not tok.is_file():
            raise FormatError(f"{tok}: no such tokenizer file")
        ckpt = ckpt.replace(tokenizer=tok)
    return ckpt
