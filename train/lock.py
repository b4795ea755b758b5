"""One run per output directory: advisory locks held by every process of the run.

Two lock files in output_dir: `.lock`, held exclusively by rank 0, and `.lock-workers`,
held shared by every rank. A new run must get both exclusively before it starts, so it is
refused while any process of an earlier run still lives — also the orphaned workers of a
launcher that was killed. The locks go away with the processes (the kernel drops them), so
a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from tokenizer.cli import CommandError

from .distributed import DistInfo, all_reduce_sum, barrier


class RunLocked(CommandError):
    """Another run holds the output directory."""


def lock_holders(path: Path) -> list[int]:
    """Process ids holding a lock on `path`, from /proc/locks (Linux; empty elsewhere)."""
    try:
        inode = path.stat().st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        parts = line.split()
        if "->" in parts or len(parts) < 6:  # a waiter, not a holder
            continue
        try:
            if int(parts[5].split(":")[-1]) == inode:
                pids.append(int(parts[4]))
        except ValueError:
            continue
    return sorted(set(pids))


def _try_lock(path: Path, mode: int) -> int | None:
    """An open descriptor holding `mode` on `path`, or None when someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class RunLock:
    """Held from `acquire()` until `release()` or the end of the process."""

    def __init__(self, output_dir: Path, dist: DistInfo) -> None:
        self.dir, self.dist = output_dir, dist
        self.fds: list[int] = []

    def acquire(self) -> None:
        """Take the locks on every rank; raise RunLocked (on every rank) if a run holds them."""
        main, workers = self.dir / ".lock", self.dir / ".lock-workers"
        message = ""
        if self.dist.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            message = self._acquire_main(main, workers)
        if all_reduce_sum(1.0 if message else 0.0, self.dist.device):
            self.release()
            raise RunLocked(message or f"{self.dir} is in use by another run")
        if not self.dist.is_main:
            fd = _try_lock(workers, fcntl.LOCK_SH)
            if fd is None:  # cannot happen unless a third party holds it exclusively
                raise RunLocked(f"{workers}: held exclusively by pid {lock_holders(workers)}")
            self.fds.append(fd)
        barrier()

    def _acquire_main(self, main: Path, workers: Path) -> str:
        fd = _try_lock(main, fcntl.LOCK_EX)
        if fd is None:
            return self._busy(main, "a run")
        self.fds.append(fd)
        # Exclusive on the workers' file only to prove that no process of an earlier run
        # lives; then shared like every other rank. (No run can slip in between: .lock is ours.)
        probe = _try_lock(workers, fcntl.LOCK_EX)
        if probe is None:
            return self._busy(workers, "processes of an earlier run")
        fcntl.flock(probe, fcntl.LOCK_SH)
        self.fds.append(probe)
        return ""

    def _busy(self, path: Path, who: str) -> str:
        pids = [p for p in lock_holders(path) if p != os.getpid()]
        held = f"pid {', '.join(map(str, pids))}" if pids else "another process"
        return (f"{self.dir} is in use: {who} ({held}) holds {path.name}; wait for it to end or "
                "stop it, or choose another output_dir")

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)  # closing drops the lock
        self.fds = []
