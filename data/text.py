"""Pretraining text → token shards: planning the work units and tokenizing one.

A .txt file holds one document per line (the line without its "\\n" or "\\r\\n", otherwise
exactly as written); a .jsonl file one JSON object per line, whose --text_key field is the
document. Blank lines and empty texts are skipped and counted.
"""

from __future__ import annotations

import codecs
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tokenizer.spm_io import load_sp

from .preparer import ERRORS, Preparer, Worker
from .shards import DataError, ShardWriter, dtype_for_vocab

# Characters of text per sentencepiece call: large enough that the per-call overhead
# vanishes, small enough that the ids (as Python ints) stay a few hundred MB per worker.
ENCODE_BATCH_CHARS = 1 << 22


@dataclass(frozen=True)
class Unit:
    """Bytes [start, end) of one input file, starting at a line; shard `index`."""

    index: int
    path: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def split_points(path: Path, chunk_bytes: int) -> list[int]:
    """Offsets that cut the file into pieces of about chunk_bytes, each just after a newline."""
    size = path.stat().st_size
    points = [0]
    with open(path, "rb") as f:
        while points[-1] + chunk_bytes < size:
            f.seek(points[-1] + chunk_bytes)
            f.readline()  # move to the start of the next line
            if f.tell() >= size:
                break
            points.append(f.tell())
    return points + [size]


@dataclass(frozen=True)
class TextPreparer(Preparer):
    """Pretraining text: every document stored as <s> + tokens + </s> (each optional).

    Inputs are cut at line starts into units of about `chunk_mb`, one shard each.
    """

    kind: ClassVar[str] = "pretrain"
    suffixes: ClassVar[tuple[str, ...]] = (".txt", ".jsonl")

    text_key: str = "text"  # the text field of .jsonl lines
    bos: bool = True
    eos: bool = True
    errors: str = "strict"  # undecodable UTF-8: stop, replace with U+FFFD, or skip the line
    chunk_mb: float = 64.0  # input per work unit and token file

    def check(self) -> None:
        if not self.chunk_mb > 0:
            raise DataError(f"--chunk_mb must be positive, got {self.chunk_mb}")
        if self.errors not in ERRORS:
            raise DataError(f"--errors {self.errors!r}: choose from {', '.join(ERRORS)}")

    def plan_units(self, sources: list[Path]) -> tuple[list[Unit], dict[str, int]]:
        """Work units in output order (files in the given order, each cut at line starts);
        nothing is skipped while planning, hence the empty counts."""
        units = []
        for path in sources:
            points = split_points(path, max(1, int(self.chunk_mb * 2**20)))
            for start, end in zip(points, points[1:]):
                if end > start:
                    units.append(Unit(len(units), path, start, end))
        return units, {}

    def recorded_options(self) -> dict[str, Any]:
        return {"bos": self.bos, "eos": self.eos, "text_key": self.text_key,
                "errors": self.errors, "chunk_mb": self.chunk_mb}

    def worker(self, tokenizer: Path, out_dir: Path) -> Worker:
        return functools.partial(tokenize_unit, str(tokenizer), str(out_dir), self.recorded_options())


def line_number(unit: Unit, index: int) -> int:
    """1-based line number in the file of the unit's index-th line (for error messages).

    Counted only when a message needs it, so planning never reads the files through.
    """
    newlines, left = 0, unit.start
    with open(unit.path, "rb") as f:
        while left > 0:
            block = f.read(min(left, 1 << 24))
            newlines += block.count(b"\n")
            left -= len(block)
    return newlines + index + 1


def decode_lines(unit: Unit, raw: bytes, errors: str, skipped: dict[str, int]) -> list[str | None]:
    """Every line of the unit, decoded as --errors says (None: an undecodable line skipped)."""
    if unit.start == 0 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]  # an encoding mark, not text
    try:  # the common case: the whole unit decodes in one call
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return decode_line_by_line(unit, raw, errors, skipped)
    if "\r" in text:  # Windows line ends: drop the \r before each \n (and at the very end)
        text = text.replace("\r\n", "\n").removesuffix("\r")
    lines: list[str | None] = text.split("\n")  # not splitlines(): U+2028, \x1c… are text
    if text.endswith("\n") or not text:
        lines.pop()  # the empty string after the final newline is not a line
    return lines


def decode_line_by_line(unit: Unit, raw: bytes, errors: str, skipped: dict[str, int]) -> list[str | None]:
    raw_lines = raw.split(b"\n")
    if raw.endswith(b"\n"):
        raw_lines.pop()
    out: list[str | None] = []
    for i, line in enumerate(raw_lines):
        line = line.removesuffix(b"\r")
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            if errors == "strict":
                raise DataError(f"{unit.path}:{line_number(unit, i)}: not valid UTF-8 "
                                f"({e.reason} at byte {e.start}); use --errors replace or skip") from None
            skipped["undecodable_lines"] = skipped.get("undecodable_lines", 0) + 1
            out.append(line.decode("utf-8", errors="replace") if errors == "replace" else None)
    return out


def json_text(unit: Unit, offset: int, line: str, text_key: str) -> str:
    """The text field of one JSON Lines record, or one DataError naming file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{unit.path}:{line_number(unit, offset)}: invalid JSON ({e.msg})") from None
    if not isinstance(record, dict) or text_key not in record:
        raise DataError(f"{unit.path}:{line_number(unit, offset)}: no {text_key!r} field "
                        "(choose it with --text_key)")
    text = record[text_key]
    if not isinstance(text, str):
        raise DataError(f"{unit.path}:{line_number(unit, offset)}: field {text_key!r} is "
                        f"{type(text).__name__}, not text")
    return text


def documents(unit: Unit, lines: list[str | None], text_key: str, skipped: dict[str, int]) -> list[str]:
    """The documents of a unit: each line of a .txt, the text field of each .jsonl line;
    blank ones are counted as skipped ("empty")."""
    if unit.path.suffix == ".jsonl":
        lines = [json_text(unit, i, line, text_key) if line and not line.isspace() else line
                 for i, line in enumerate(lines)]
    present = [line for line in lines if line is not None]
    docs = [line for line in present if line and not line.isspace()]
    if len(docs) < len(present):
        skipped["empty"] = skipped.get("empty", 0) + len(present) - len(docs)
    return docs


def encode_batches(docs: list[str], batch_chars: int = ENCODE_BATCH_CHARS) -> list[slice]:
    """Consecutive slices of `docs` of about `batch_chars` characters each."""
    out, start, size = [], 0, 0
    for i, doc in enumerate(docs):
        size += len(doc)
        if size >= batch_chars:
            out.append(slice(start, i + 1))
            start, size = i + 1, 0
    if start < len(docs):
        out.append(slice(start, len(docs)))
    return out


def processor(tokenizer: str):
    """The sentencepiece processor of a model file, loaded once per process."""
    stat = os.stat(tokenizer)
    return _cached_processor(tokenizer, stat.st_size, stat.st_mtime_ns)


# The one piece of module-level state in data/: a memo of loaded tokenizers, so a worker
# process loads its tokenizer once (~20 ms) rather than for every unit. Keyed by size and
# modification time too, so a file rewritten in place is loaded again.
@functools.lru_cache(maxsize=4)
def _cached_processor(tokenizer: str, size: int, mtime_ns: int):
    return load_sp(tokenizer)


def tokenize_unit(tokenizer: str, out_dir: str, opts: dict[str, Any], unit: Unit) -> dict[str, Any]:
    """Tokenize one unit into tokens-<index>.bin / .idx; return its file entry and counts."""
    sp = processor(tokenizer)
    for name, wanted, piece_id in (("bos", opts["bos"], sp.bos_id()), ("eos", opts["eos"], sp.eos_id())):
        if wanted and piece_id < 0:
            raise DataError(f"{tokenizer}: the tokenizer has no {name.upper()} id; use --no_{name}")
    skipped: dict[str, int] = {}
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        raw = f.read(unit.nbytes)
    docs = documents(unit, decode_lines(unit, raw, opts["errors"], skipped), opts["text_key"], skipped)
    del raw
    with ShardWriter(Path(out_dir), unit.index, dtype_for_vocab(sp.vocab_size())) as shard:
        for batch in encode_batches(docs):
            # sentencepiece adds the BOS/EOS ids itself. It never matches a control piece
            # such as <s> in text, so a document containing "<s>" gets no second BOS.
            shard.add(sp.encode(docs[batch], add_bos=opts["bos"], add_eos=opts["eos"], num_threads=1))
    return {"file": shard.entry(), "skipped": skipped}
