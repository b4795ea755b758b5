"""File helpers every layer of zhllama uses: hashing, and outputs that appear whole or not at
all, never over their own inputs, with the modes the umask gives.

They live here because `tokenizer` is the bottom layer: `model` and `data` may import it,
it imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

# The inputs of a command that its output must not overlap (None: an optional one not given).
Inputs = Iterable[str | Path | None]


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class OutputOverlapsInput(ValueError):
    """An output that is, contains or lies inside one of the inputs of the same command."""


def check_output_against_inputs(output: str | Path, inputs: Inputs) -> None:
    """Refuse an output that would replace, or be written into, one of the inputs.

    Replacing an output removes whatever is at its path, so an output that is an input, or
    a directory holding one, would delete it; an output inside an input changes it. Paths
    are compared as written (made absolute) and with symlinks resolved: a link inside the
    output goes with it, and a link to an input leads to that input. `None` entries (an
    optional input not given) are skipped.

    Raises:
        OutputOverlapsInput: naming the output, the input and how they overlap.
    """
    for given in inputs:
        if given is None:
            continue
        for out, src in zip(_path_forms(output), _path_forms(given)):
            if out == src:
                how, action = "is", "replace it"
            elif out in src.parents:
                how, action = "contains", "replace it"
            elif src in out.parents:
                how, action = "lies inside", "write into it"
            else:
                continue
            raise OutputOverlapsInput(f"output {output} {how} the input {given}: refusing to "
                                      f"{action} (choose another output)")


def _path_forms(path: str | Path) -> tuple[Path, Path]:
    return Path(os.path.abspath(path)), Path(path).resolve()


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, overwrite: bool = False, *,
                      inputs: Inputs = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `dst` only if the block succeeds.

    The temporary directory sits beside `dst` (same filesystem, so the final rename is
    atomic) and is removed on any error, with the parent directories this call created:
    no partial output is ever left at `dst`. Before anything is created or removed, `dst`
    is checked against `inputs` (see `check_output_against_inputs`). The output gets the
    mode a plain `mkdir` gives under the umask.
    """
    dst = Path(dst)
    with _output_slot([dst], overwrite, inputs):
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", dir=dst.parent))
        try:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 suits a temporary, not the output
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
def atomic_output_file(dst: str | Path, overwrite: bool = False, *,
                       inputs: Inputs = ()) -> Iterator[Path]:
    """Like `atomic_output_dir`, for a single file (with the mode of a plain `open`)."""
    dst = Path(dst)
    with _output_slot([dst], overwrite, inputs):
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", dir=dst.parent)
        tmp = Path(name)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 suits a temporary only
            os.close(fd)
            yield tmp
            os.replace(tmp, dst)
        finally:
            _remove(tmp)


@contextlib.contextmanager
def atomic_output_files(dsts: Sequence[str | Path], overwrite: bool = False, *,
                        inputs: Inputs = ()) -> Iterator[Path]:
    """Yield a temporary directory in which a program writes several output files at once.

    For writers that take a prefix rather than a path (sentencepiece's trainer writes
    P.model and P.vocab): when the block succeeds, the file named like each of `dsts` in
    the directory replaces it. All `dsts` share one parent; they are checked as in
    `atomic_output_dir`, and the files keep the mode their writer gave them.
    """
    dsts = [Path(d) for d in dsts]
    if not dsts or len({d.parent for d in dsts}) != 1:
        raise ValueError("atomic_output_files needs one or more files in one directory")
    with _output_slot(dsts, overwrite, inputs):
        tmp = Path(tempfile.mkdtemp(prefix=f".{dsts[0].name}.tmp-{os.getpid()}-",
                                    dir=dsts[0].parent))
        try:
            yield tmp
            for dst in dsts:
                os.replace(tmp / dst.name, dst)
        finally:
            _remove(tmp)


@contextlib.contextmanager
def _output_slot(dsts: list[Path], overwrite: bool, inputs: Inputs) -> Iterator[None]:
    """Checks before an output is written; removes the parents it made if the block fails."""
    inputs = list(inputs)
    for dst in dsts:
        check_output_against_inputs(dst, inputs)
    existing = [d for d in dsts if d.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists (use --overwrite to replace it)")
    created = _make_parents(dsts[0].parent)
    try:
        for dst in dsts:
            remove_stale_temporaries(dst)
        yield
    except BaseException:
        _remove_empty(created)  # a failed command leaves no empty directory behind
        raise


def _make_parents(path: Path) -> list[Path]:
    """`mkdir -p path`; returns the directories it created, outermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return missing[::-1]


def _remove_empty(dirs: list[Path]) -> None:
    for d in reversed(dirs):  # innermost first
        try:
            d.rmdir()
        except OSError:  # not empty (someone else wrote there) or already gone
            return


def _umask() -> int:
    """The process's umask, read without changing it where the system shows it (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    # os.umask can only be read by setting it: the most restrictive value meanwhile, so a
    # file another thread creates in between is never more open than intended
    old = os.umask(0o077)
    os.umask(old)
    return old


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
