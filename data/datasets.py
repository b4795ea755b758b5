"""Training batches from token directories: packed pretraining blocks and SFT samples.

Both give `batches(batch_size)`: an endless iterator of dicts
    tokens  LongTensor (batch, length)
    labels  LongTensor (batch, length): labels[:, j] is the token to predict at position j
            (tokens[:, j + 1]), or -100 where no loss is taken
(+ segment_ids for packed SFT rows), shuffled per epoch with a seed, and `state_dict()` /
`load_state_dict()` that resume exactly. `take(n)`, `skip(n)` and `make_batch(units)` are the
same batches a unit at a time (a block, a sample, a packed row), for a mixture of several
directories (data/mixing.py).

The order is global, the same whatever the number of ranks: the training units form one
sequence (each epoch's seeded permutation after the last), and at global position G the
ranks' next batches of b units are units G .. G + b·W - 1 of it, rank r of W taking
G + r, G + r + W, … (`deal`). The position saved, the units of the epoch consumed by all
ranks together, is the same on every rank, and a run resumed on another number of ranks
(with the same global batch) reads on exactly where it stopped.

Splits: "train", "val" (the held-out tail of `val_fraction`) and "all" (the whole
directory, whatever `val_fraction` says: a validation set of its own). Only "train"
shuffles and runs endlessly; the others are read once, in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from tokenizer.labels import IGNORE_INDEX

from .shards import DataError, open_tokens, read_index, read_meta


class TokenStream:
    """The concatenation of a directory's token files, read through memory maps.

    Maps stay open between reads (opening one costs more than reading a block from it)
    and are all dropped after every `release_bytes` read: a mapped page stays in the
    process's resident set until its mapping goes away, so holding them for good would
    make a long run look as if it held the whole dataset in memory.
    """

    def __init__(self, path: str | Path, release_bytes: int = 64 << 20) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.files = self.meta["files"]
        sizes = [f["num_tokens"] for f in self.files]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # file i: [starts[i], starts[i+1])
        self.release_bytes = release_bytes
        self._maps: dict[int, np.ndarray] = {}
        self._read_bytes = 0
        check_file_sizes(self.path, self.files, self.dtype)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _map(self, i: int) -> np.ndarray:
        if i not in self._maps:
            # a plain ndarray view slices faster than np.memmap and keeps the mapping alive
            self._maps[i] = open_tokens(self.path, self.files[i], self.dtype).view(np.ndarray)
        return self._maps[i]

    def read(self, start: int, length: int) -> np.ndarray:
        """A copy of tokens[start : start + length] of the stream, across files if need be."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"{self.path}: tokens [{start}, {start + length}) outside [0, {len(self)})")
        out, pos, end = [], start, start + length
        while pos < end:
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1  # empty files are skipped
            local = pos - int(self.starts[i])
            take = min(end, int(self.starts[i + 1])) - pos
            out.append(np.array(self._map(i)[local : local + take]))
            pos += take
        self._read_bytes += length * self.dtype.itemsize
        if self._read_bytes >= self.release_bytes:
            self._maps.clear()
            self._read_bytes = 0
        if not out:
            return np.zeros(0, self.dtype)
        return out[0] if len(out) == 1 else np.concatenate(out)

    def document_starts(self) -> np.ndarray:
        """Global start offset of every document (int64)."""
        parts = [read_index(self.path, f)[:-1].astype(np.int64) + int(s)
                 for f, s in zip(self.files, self.starts[:-1])]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def check_file_sizes(path: Path, files: list[dict[str, Any]], dtype: np.dtype) -> None:
    """Refuse token files shorter or longer than meta.json and their index say.

    A truncated copy would otherwise surface as a numpy error in the middle of training
    (or, past the end of a memory map, as a crash), long after the data was opened.
    """
    for f in files:
        tokens, index = path / f["tokens"], path / f["index"]
        for file in (tokens, index):
            if not file.is_file():
                raise DataError(f"{path}: {file.name} is missing (listed in meta.json)")
        n_index = (f["num_documents"] + 1) * 8
        if index.stat().st_size != n_index:
            raise DataError(f"{index}: {index.stat().st_size:,} bytes, but meta.json's "
                            f"{f['num_documents']:,} documents need {n_index:,}")
        with open(index, "rb") as fh:
            fh.seek(-8, 2)
            indexed = int.from_bytes(fh.read(8), "little")  # the index ends with the token count
        if indexed != f["num_tokens"]:
            raise DataError(f"{index}: indexes {indexed:,} tokens, meta.json says {f['num_tokens']:,}")
        size, want = tokens.stat().st_size, indexed * dtype.itemsize
        if size != want:
            how = f"{want - size:,} bytes short of" if size < want else f"{size - want:,} bytes longer than"
            raise DataError(f"{tokens}: {how} its index ({indexed:,} {dtype.name} tokens = "
                            f"{want:,} bytes; truncated copy?)")


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The items of an epoch in the order every rank reads them: a permutation seeded by
    (seed, epoch), or 0 .. n - 1."""
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def rank_order(n: int, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool) -> np.ndarray:
    """This rank's items of one pass (validation): the epoch's order dealt round-robin, cut
    to equal shares so every rank takes the same number of batches (at most
    world_size - 1 items sit the pass out)."""
    per_rank = n // world_size
    return epoch_order(n, seed, epoch, shuffle)[rank::world_size][:per_rank]


class GlobalUnits(Protocol):
    """A sequence of training units shared by all ranks: each rank's copy moves through
    every unit, reading only those `deal` gives it."""

    def take(self, n: int) -> list[Any]: ...
    def skip(self, n: int) -> None: ...


def deal(units: GlobalUnits, n: int, rank: int, world_size: int) -> list[Any]:
    """Rank `rank`'s n units of the next n · world_size: from the global position G, units
    G + rank, G + rank + world_size, …; afterwards every rank's position is G + n · world_size."""
    out: list[Any] = []
    for _ in range(n):
        units.skip(rank)
        out += units.take(1)
        units.skip(world_size - 1 - rank)
    return out


def shift_labels(tokens: np.ndarray, first_target: int = 0) -> np.ndarray:
    """labels[j] = tokens[j + 1] for target positions j + 1 ≥ first_target; else -100."""
    labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = tokens[1:]
    labels[: max(first_target - 1, 0)] = IGNORE_INDEX
    return labels


class _Resumable:
    """Epoch/position bookkeeping shared by both datasets: `position` items of epoch
    `epoch`'s order consumed, by all ranks together."""

    epoch: int
    position: int
    seed: int
    rank: int
    world_size: int
    _cached_order: tuple[tuple[int, int, bool], np.ndarray] | None = None

    def _orders(self, n: int, epoch: int, shuffle: bool) -> np.ndarray:
        """The items of `epoch` (`epoch_order`), computed once per epoch, not per step."""
        key = (n, epoch, shuffle)
        if self._cached_order is None or self._cached_order[0] != key:
            self._cached_order = (key, epoch_order(n, self.seed, epoch, shuffle))
        return self._cached_order[1]

    def _skip_items(self, k: int, n: int) -> None:
        """Move the position k items on, in epochs of n items."""
        self.epoch, self.position = self.epoch + (self.position + k) // n, (self.position + k) % n

    def _state(self, **fixed: Any) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, **fixed}

    def _load(self, state: dict[str, Any], **fixed: Any) -> None:
        for key, value in fixed.items():
            if state.get(key) != value:
                raise DataError(f"cannot resume: the data position was saved with {key}="
                                f"{state.get(key)!r}, this run has {value!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size")


SPLITS = ("train", "val", "all")


def check_split(split: str, val_fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


class PackedBlocks(_Resumable):
    """Fixed-length blocks over the token stream: block i = tokens[i·L : (i+1)·L].

    A validation split is held out by whole documents: the tail of the stream from the
    first document boundary at or after (1 - val_fraction) of the tokens. The trailing
    partial block of each region is dropped. Each epoch, the region's blocks are shuffled
    with `default_rng([seed, epoch])`; training reads the epochs one after another, dealt to
    the ranks unit by unit (`deal`: the same blocks in the same order on any number of
    ranks; a batch may span two epochs). Validation splits give each rank
    n_blocks // world_size blocks of one pass (`rank_order`). Split "all" is every block of
    the directory, in order.

    With `document_mask`, batches carry segment_ids numbering the documents (or parts of
    them) inside each block, from the shards' document index, so that attention stays
    inside each document and positions restart at its start; the position before each
    document boundary has no target (its next token is another document's, unseen).
    """

    def __init__(self, path: str | Path, block_size: int = 512, split: str = "train",
                 val_fraction: float = 0.0, seed: int = 0, rank: int = 0, world_size: int = 1,
                 document_mask: bool = False) -> None:
        check_split(split, val_fraction)
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        check_rank(rank, world_size)
        self.stream = TokenStream(path)
        self.block_size, self.split, self.seed = block_size, split, seed
        self.rank, self.world_size = rank, world_size
        boundary = len(self.stream)
        if val_fraction > 0 and split != "all":
            starts = self.stream.document_starts()
            i = int(np.searchsorted(starts, int((1 - val_fraction) * len(self.stream))))
            boundary = int(starts[i]) if i < len(starts) else len(self.stream)
        self.region = {"train": (0, boundary), "val": (boundary, len(self.stream)),
                       "all": (0, len(self.stream))}[split]
        self.n_blocks = (self.region[1] - self.region[0]) // block_size
        if self.n_blocks < world_size:
            which = "" if split == "all" else f"{split} "
            raise DataError(f"{path}: {self.n_blocks} {which}blocks of {block_size} tokens for "
                            f"{world_size} rank(s): not enough data"
                            + (" (no validation split: val_fraction is 0)" if split == "val" and
                               not val_fraction else ""))
        self.epoch = self.position = 0
        self.document_mask = document_mask
        self.doc_starts = self.stream.document_starts() if document_mask else None

    def __len__(self) -> int:
        """Blocks per rank of one pass (validation: `iter_epoch`)."""
        return self.n_blocks // self.world_size

    def rows_per_epoch(self) -> int:
        """Batch rows of one training epoch, all ranks together: the blocks."""
        return self.n_blocks

    def num_tokens(self) -> int:
        """Tokens of one epoch, all ranks together."""
        return self.n_blocks * self.block_size

    def block(self, i: int) -> np.ndarray:
        """Block i of this split's region, (block_size,) in the file's dtype."""
        return self.stream.read(self.region[0] + i * self.block_size, self.block_size)

    def _order(self, epoch: int) -> np.ndarray:
        """This rank's blocks of one pass over `epoch` (validation)."""
        return rank_order(self.n_blocks, self.seed, epoch, self.rank, self.world_size, self.split == "train")

    def segments(self, i: int) -> np.ndarray:
        """Segment ids of block i: 0 up to the first document start inside it, then one
        more at each start, (block_size,) int64."""
        start = self.region[0] + i * self.block_size
        lo, hi = np.searchsorted(self.doc_starts, [start + 1, start + self.block_size])
        marks = np.zeros(self.block_size, dtype=np.int64)
        marks[self.doc_starts[lo:hi] - start] = 1
        return np.cumsum(marks)

    def unit(self, i: int) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """What a batch is made of: block i, and with document_mask its segment ids."""
        return (self.block(i), self.segments(i)) if self.document_mask else self.block(i)

    def make_batch(self, units: list) -> dict[str, torch.Tensor]:
        """A batch of units (`unit` or `take`): tokens and labels, (B, L) each, and with
        document_mask the segment ids."""
        blocks = [u[0] for u in units] if self.document_mask else units
        tokens = np.stack(blocks).astype(np.int64)  # (B, L)
        labels = np.full_like(tokens, IGNORE_INDEX)  # (B, L); the last position has no target
        labels[:, :-1] = tokens[:, 1:]
        batch = {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels)}
        if self.document_mask:
            segments = np.stack([u[1] for u in units])
            labels[:, :-1][segments[:, 1:] != segments[:, :-1]] = IGNORE_INDEX  # across a boundary
            batch["segment_ids"] = torch.from_numpy(segments)
        return batch

    def _batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.make_batch([self.unit(i) for i in indices])

    def iter_epoch(self, batch_size: int, epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over this rank's blocks of `epoch` (for validation); the last batch may
        be smaller. Does not move the position that `state_dict` saves."""
        order = self._order(epoch).tolist()
        for i in range(0, len(order), batch_size):
            yield self._batch(order[i : i + batch_size])

    def _next_indices(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = self._orders(self.n_blocks, self.epoch, shuffle=True)
            take = order[self.position : self.position + n - len(out)].tolist()
            out += take
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def take(self, n: int) -> list[np.ndarray]:
        """The next n units (`unit`) of the global training sequence from the saved position
        (which moves on), across epochs."""
        return [self.unit(i) for i in self._next_indices(n)]

    def skip(self, n: int) -> None:
        """Move the position past the next n units without reading them (other ranks' units)."""
        self._skip_items(n, self.n_blocks)

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Train: this rank's endless batches from the saved position (`deal`), across
        epochs. Val, all: one pass in order (`iter_epoch`)."""
        if self.split != "train":
            yield from self.iter_epoch(batch_size)
            return
        while True:
            yield self.make_batch(deal(self, batch_size, self.rank, self.world_size))

    def state_dict(self) -> dict[str, Any]:
        return self._state(**self._fixed())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state_dict` was taken; refuses a state from another setup (seed,
        block size, split, data). Any rank of any number of ranks may load any rank's
        state: the position is global, the same on every rank."""
        self._load(state, **self._fixed())

    def _fixed(self) -> dict[str, Any]:
        return {"seed": self.seed, "block_size": self.block_size, "split": self.split,
                "n_blocks": self.n_blocks}


class SFTDataset(_Resumable):
    """Instruction samples with their prompt lengths; batches padded to the longest sample,
    or (pack=True) several samples per row of max_seq_length, attention kept inside each.

    A validation split holds out the last `val_fraction` of the samples (at least one when
    the fraction is positive); training shuffles its samples each epoch and deals them, or
    the rows packed from them, to the ranks unit by unit (`deal`: packed greedily from the
    global order, the same rows on any number of ranks); validation gives each rank its
    share once, in order (split "all": every sample of the directory).
    """

    def __init__(self, path: str | Path, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pack: bool = False, max_seq_length: int | None = None, split: str = "train",
                 val_fraction: float = 0.0) -> None:
        check_rank(rank, world_size)
        check_split(split, val_fraction)
        self.stream = TokenStream(path)
        if self.stream.meta["kind"] != "sft":
            raise DataError(f"{path}: prepared as {self.stream.meta['kind']!r} data, not SFT "
                            "(use `python -m data.prepare --sft`)")
        self.starts = self.stream.document_starts()
        self.lengths = np.diff(np.append(self.starts, len(self.stream)))
        self.plens = np.concatenate([np.fromfile(self.stream.path / f["plen"], dtype="<u4")
                                     for f in self.stream.files]).astype(np.int64)
        if len(self.plens) != len(self.starts):  # a truncated .plen shifts every later sample
            raise DataError(f"{path}: the .plen files hold {len(self.plens):,} prompt lengths for "
                            f"{len(self.starts):,} samples (truncated copy?)")
        self.seed, self.rank, self.world_size, self.pack = seed, rank, world_size, pack
        self.split = split
        prepared = self.stream.meta["options"]["max_seq_length"]
        if max_seq_length is not None and max_seq_length < prepared and int(self.lengths.max()) > max_seq_length:
            raise DataError(f"{path}: prepared with --max_seq_length {prepared}, longer than "
                            f"max_seq_length {max_seq_length}; prepare it again with "
                            f"--max_seq_length {max_seq_length} (truncating here would drop EOS)")
        self.max_seq_length = max_seq_length or prepared
        n = len(self.starts)
        n_val = max(1, int(n * val_fraction)) if val_fraction > 0 and split != "all" else 0
        self.ids = {"train": np.arange(n - n_val), "val": np.arange(n - n_val, n), "all": np.arange(n)}[split]
        pad = self.stream.meta["special_ids"]["pad"]
        # Any id would do when the tokenizer has no pad: padding sits after the sample (right
        # padding), causal attention never lets real tokens see it, and its labels are -100.
        self.pad_id = pad if pad >= 0 else 0
        if len(self.ids) < world_size:
            raise DataError(f"{path}: {len(self.ids)} {split} samples for {world_size} ranks")
        self.epoch = self.position = 0

    def __len__(self) -> int:
        """Samples per rank of one pass (validation)."""
        return len(self.ids) // self.world_size

    def rows_per_epoch(self) -> int:
        """Batch rows of one training epoch, all ranks together: the samples, or packed,
        the rows the first epoch's samples fill (later epochs differ by a row or two)."""
        if not self.pack:
            return len(self.ids)
        order = epoch_order(len(self.ids), self.seed, 0, True)
        rows, used = 0, self.max_seq_length + 1
        for n in self.lengths[self.ids[order]].tolist():
            if used + n > self.max_seq_length:
                rows, used = rows + 1, 0
            used += n
        return rows

    def num_tokens(self) -> int:
        """Tokens of one epoch, all ranks together."""
        return int(self.lengths[self.ids].sum())

    def sample(self, i: int) -> tuple[np.ndarray, int]:
        """(tokens, prompt length) of sample i of the whole file (any split)."""
        return self.stream.read(int(self.starts[i]), int(self.lengths[i])), int(self.plens[i])

    def _next(self) -> int:
        """The next sample of the global training order (its id in the file)."""
        order = self._orders(len(self.ids), self.epoch, shuffle=True)
        i = int(self.ids[order[self.position]])
        self._skip_items(1, len(order))
        return i

    def _packed_row(self) -> list[int]:
        """The samples of the next row: whole ones, up to max_seq_length tokens (always at
        least one). Their lengths decide, so rows other ranks take cost no reading."""
        row, used = [], 0
        while True:
            saved = (self.epoch, self.position)
            i = self._next()
            if row and used + int(self.lengths[i]) > self.max_seq_length:
                self.epoch, self.position = saved  # it starts the next row instead
                return row
            row.append(i)
            used += int(self.lengths[i])

    def take(self, n: int) -> list[Any]:
        """The next n units of the global training sequence from the saved position (which
        moves on): packed rows (lists of samples) with `pack`, else samples ((tokens,
        prompt length) each)."""
        if self.pack:
            return [[self.sample(i) for i in self._packed_row()] for _ in range(n)]
        return [self.sample(self._next()) for _ in range(n)]

    def skip(self, n: int) -> None:
        """Move the position past the next n units without reading them (other ranks' units)."""
        if not self.pack:
            self._skip_items(n, len(self.ids))
            return
        for _ in range(n):
            self._packed_row()

    def make_batch(self, units: list[Any]) -> dict[str, torch.Tensor]:
        """A batch of units (`take`): padded samples, or packed rows with segment_ids."""
        return collate_packed(units, self.pad_id) if self.pack else collate(units, self.pad_id)

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Train: endless batches from the saved position, across epochs. Val, all: this
        rank's samples once, in order (the last batch may be smaller); the position is
        untouched."""
        if self.split != "train":
            yield from self._one_pass(batch_size)
            return
        while True:
            yield self.make_batch(deal(self, batch_size, self.rank, self.world_size))

    def _one_pass(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        order = rank_order(len(self.ids), self.seed, 0, self.rank, self.world_size, False)
        samples = [self.sample(int(i)) for i in self.ids[order]]
        if not self.pack:
            for k in range(0, len(samples), batch_size):
                yield collate(samples[k : k + batch_size], self.pad_id)
            return
        rows: list[list[tuple[np.ndarray, int]]] = []
        for tokens, plen in samples:
            if not rows or sum(len(t) for t, _ in rows[-1]) + len(tokens) > self.max_seq_length:
                rows.append([])
            rows[-1].append((tokens, plen))
        for k in range(0, len(rows), batch_size):
            yield collate_packed(rows[k : k + batch_size], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return self._state(**self._fixed())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load(state, **self._fixed())

    def _fixed(self) -> dict[str, Any]:
        return {"seed": self.seed, "samples": len(self.ids), "pack": self.pack}


def collate(samples: list[tuple[np.ndarray, int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; labels only on response tokens (incl. EOS)."""
    width = max(len(t) for t, _ in samples)
    tokens = np.full((len(samples), width), pad_id, dtype=np.int64)
    labels = np.full((len(samples), width), IGNORE_INDEX, dtype=np.int64)
    for row, (t, plen) in enumerate(samples):
        tokens[row, : len(t)] = t
        labels[row, : len(t)] = shift_labels(t.astype(np.int64), plen)
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels)}


def collate_packed(rows: list[list[tuple[np.ndarray, int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of several samples each; segment_ids number the samples in a row (padding gets
    its own), so attention and positions stay inside each sample."""
    width = max(sum(len(t) for t, _ in row) for row in rows)
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    segments = np.full((len(rows), width), len(max(rows, key=len)), dtype=np.int64)
    for r, row in enumerate(rows):
        pos = 0
        for s, (t, plen) in enumerate(row):
            tokens[r, pos : pos + len(t)] = t
            labels[r, pos : pos + len(t)] = shift_labels(t.astype(np.int64), plen)
            segments[r, pos : pos + len(t)] = s
            pos += len(t)
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "segment_ids": torch.from_numpy(segments)}
