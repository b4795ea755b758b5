"""Several token directories as one training stream, mixed by weight, and the validation
sets that go with them.

    data:
      sources: [{path: tokens/zh, weight: 0.8}, {path: tokens/en, weight: 0.2, name: en}]

`Mixture` draws each unit — a block (pretraining), a sample or, packed, a row (SFT) — from
the source furthest below its share of the units drawn so far (the largest deficit,
ties to the source listed first). The rule needs no random numbers: after n units every
source's count is within one unit of weight · n for two sources (a few units for more), so
the realised shares follow the weights from the first batch on. The choices are made for
the global sequence of units, which the ranks share out as a single dataset's (`deal`):
every rank makes every choice and moves each source past the units other ranks take, so
the mixture reads the same units in the same order on any number of ranks. Each source
keeps its own epoch and shuffle; a small source simply starts its next epoch sooner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .datasets import deal
from .shards import DataError


@dataclass
class Source:
    """One directory of a mixture (the training config's `data.sources` entries)."""

    path: str = ""  # a directory made by `zhllama prepare`
    weight: float = 1.0  # relative: the weights of a mixture need not add up to 1
    name: str = ""  # in the logs (share/NAME, val/NAME/loss); empty: the directory's name

    @property
    def label(self) -> str:
        """The source's name: `name`, or else the directory's own name."""
        return self.name or Path(self.path).name


class Units(Protocol):
    """What a mixture needs of each source: PackedBlocks and SFTDataset give it."""

    rank: int
    world_size: int

    def take(self, n: int) -> list[Any]: ...
    def skip(self, n: int) -> None: ...
    def make_batch(self, units: list[Any]) -> dict[str, torch.Tensor]: ...
    def rows_per_epoch(self) -> int: ...
    def num_tokens(self) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Mixture:
    """Training batches whose units come from several datasets in the proportion of
    `weights` (see the module docstring); resumes exactly through `state_dict`."""

    def __init__(self, sources: Sequence[Units], weights: Sequence[float], names: Sequence[str]) -> None:
        if not sources or not len(sources) == len(weights) == len(names):
            raise ValueError(f"{len(sources)} sources, {len(weights)} weights and {len(names)} names: "
                             "need one of each per source, at least one source")
        if any(not w > 0 for w in weights):
            raise ValueError(f"weights must be positive, got {list(weights)}")
        if len(set(names)) != len(names):
            raise ValueError(f"names must differ, got {list(names)}")
        total = float(sum(weights))
        self.sources, self.names = list(sources), list(names)
        self.weights = [float(w) / total for w in weights]
        self.counts = [0] * len(sources)
        self.rank, self.world_size = self.sources[0].rank, self.sources[0].world_size
        if any((s.rank, s.world_size) != (self.rank, self.world_size) for s in self.sources):
            raise ValueError("the sources of a mixture must be opened for the same rank and world size")

    def pick(self) -> int:
        """The source of the next unit (and count it): the largest deficit below its share."""
        n = sum(self.counts) + 1
        deficits = [w * n - c for w, c in zip(self.weights, self.counts)]
        i = max(range(len(deficits)), key=deficits.__getitem__)  # the first of equal ones
        self.counts[i] += 1
        return i

    def take(self, n: int) -> list[Any]:
        """The next n units of the global sequence, each from the source `pick` names."""
        return [self.sources[self.pick()].take(1)[0] for _ in range(n)]

    def skip(self, n: int) -> None:
        """Choose the next n units' sources and move those sources past them, unread."""
        for _ in range(n):
            self.sources[self.pick()].skip(1)

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's endless batches from the saved position (`deal`)."""
        while True:
            units = deal(self, batch_size, self.rank, self.world_size)
            yield self.sources[0].make_batch(units)  # all sources are of one kind

    def rows_per_epoch(self) -> int:
        """Batch rows of one epoch of every source, all ranks together."""
        return sum(s.rows_per_epoch() for s in self.sources)

    def num_tokens(self) -> int:
        """Tokens of one epoch of every source, all ranks together."""
        return sum(s.num_tokens() for s in self.sources)

    def shares(self) -> dict[str, float]:
        """The fraction of the units drawn so far (by all ranks) that came from each
        source, by name."""
        total = sum(self.counts)
        return {name: c / total if total else 0.0 for name, c in zip(self.names, self.counts)}

    def log_fields(self) -> dict[str, float]:
        """For each training line of metrics.jsonl: share/NAME, the realised share."""
        return {f"share/{name}": share for name, share in self.shares().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": list(self.weights), "counts": list(self.counts),
                "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state_dict` was taken; refuses a state of another mixture (number
        of sources, weights) and, through each source, of another setup."""
        if state.get("weights") != self.weights or len(state.get("sources", ())) != len(self.sources):
            raise DataError(f"cannot resume: the data position was saved for a mixture with weights "
                            f"{state.get('weights')!r}, this run mixes {self.weights!r}")
        for source, saved in zip(self.sources, state["sources"]):
            source.load_state_dict(saved)
        self.counts = [int(c) for c in state["counts"]]


# (path, split) → the dataset of that split of that directory; split is "train", "val"
# (the held-out tail) or "all" (the whole directory, in order)
Opener = Callable[[str, str], Any]


def open_datasets(path: str, sources: Sequence[Source], opener: Opener, val_fraction: float,
                  val_sets: Mapping[str, str]) -> tuple[Any, dict[str, Any]]:
    """A run's training data and validation sets, from `path` or a mixture of `sources`.

    Args:
        path: the one directory (data.path), or "" with `sources`.
        sources: the mixture (data.sources), or () with `path`.
        opener: builds one dataset (see `Opener`).
        val_fraction: held out from the end of each directory trained on.
        val_sets: name → directory, each read whole (data.val_sets).

    Returns:
        (train, vals): `opener(path, "train")` or a `Mixture`; vals maps "" to the held-out
        split of `path`, or each source's name to its own held-out tail, and every name of
        `val_sets` to its directory.
    """
    vals: dict[str, Any] = {}
    if sources:
        train = Mixture([opener(s.path, "train") for s in sources], [s.weight for s in sources],
                        [s.label for s in sources])
        if val_fraction:
            vals.update({s.label: opener(s.path, "val") for s in sources})
    else:
        train = opener(path, "train")
        if val_fraction:
            vals[""] = opener(path, "val")
    vals.update({name: opener(where, "all") for name, where in val_sets.items()})
    return train, vals
