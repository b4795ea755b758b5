"""File helpers every layer of zhllama uses: hashing, and outputs that appear whole or not at all.

They live here because `tokenizer` is the bottom layer: `model` and `data` may import it,
it imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `dst` only if the block succeeds.

    The temporary directory sits beside `dst` (same filesystem, so the final rename is
    atomic) and is removed on any error: no partial output is ever left at `dst`.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (use --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            _remove(old)
        else:
            os.replace(tmp, dst)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_output_file(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Like `atomic_output_dir`, for a single file."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (use --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dst)
    fd, name = tempfile.mkstemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", dir=dst.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        _remove(tmp)


def remove_stale_temporaries(dst: Path) -> None:
    """Remove temporaries of `dst` left by runs that were killed (their process is gone).

    A temporary's name carries its process id; one whose process still runs is another
    run's work in progress and is left alone.
    """
    for tmp in dst.parent.glob(f".{glob_escape(dst.name)}.tmp-*"):
        pid = tmp.name[len(dst.name) + 6 :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(tmp)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
