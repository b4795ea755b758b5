"""What `data.prepare` needs from a kind of input: the interface that pretraining text
(data/text.py, `TextPreparer`) and instruction data (data/sft.py, `SFTPreparer`) implement.

`data.prepare` does the parts every kind shares — finding the inputs, checking the output,
running the work units in parallel, writing meta.json last — and asks the preparer only
for what differs: which files it reads, how the inputs are cut into units, how one unit is
tokenized into its shard, and which of its settings meta.json records. A preparer is a
frozen dataclass of its settings, so a job is described by values, not by parsed flags.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol

ERRORS = ("strict", "replace", "skip")  # what to do with undecodable UTF-8 (--errors)


class WorkUnit(Protocol):
    """One piece of the input, tokenized by one worker into shard `index`."""

    index: int

    @property
    def nbytes(self) -> int:
        """Input bytes of the unit, for the progress bar."""
        ...


# A worker tokenizes one unit into its shard files and returns {"file": meta.json's entry
# for them, "skipped": counts, ...}. It is sent to other processes, so it must pickle.
Worker = Callable[[Any], dict[str, Any]]


class Preparer(Protocol):
    """A kind of input that `data.prepare` turns into token shards."""

    kind: ClassVar[str]  # meta.json's "kind" (data/shards.py KINDS): which trainer reads it
    suffixes: ClassVar[tuple[str, ...]]  # the input files it reads

    def check(self) -> None:
        """Raise DataError for settings that cannot work, before any input is read."""
        ...

    def plan_units(self, sources: list[Path]) -> tuple[list[WorkUnit], dict[str, int]]:
        """The work units in output order, and what planning already skipped (counted)."""
        ...

    def worker(self, tokenizer: Path, out_dir: Path) -> Worker:
        """The picklable function that tokenizes one unit into `out_dir`."""
        ...

    def recorded_options(self) -> dict[str, Any]:
        """The settings meta.json records under "options" (what the tokens depend on)."""
        ...
