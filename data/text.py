"""Pretraining text → token shards: planning the work units and tokenizing one."""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenizer.spm_io import load_sp

from .shards import DataError, dtype_for_vocab, shard_names

SUFFIXES = (".txt", ".jsonl")


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


def plan_units(sources: list[Path], a: argparse.Namespace) -> list[Unit]:
    units = []
    for path in sources:
        points = split_points(path, max(1, int(a.chunk_mb * 2**20)))
        for start, end in zip(points, points[1:]):
            if end > start:
                units.append(Unit(len(units), path, start, end))
    return units


def options(a: argparse.Namespace) -> dict[str, Any]:
    return {"bos": not a.no_bos, "eos": not a.no_eos, "text_key": a.text_key, "errors": a.errors}


def make_worker(tokenizer: Path, out_dir: Path, a: argparse.Namespace):
    return functools.partial(tokenize_unit, str(tokenizer), str(out_dir), options(a))


def line_number(unit: Unit, index: int) -> int:
    """1-based line number in the file of the unit's index-th line (for error messages)."""
    with open(unit.path, "rb") as f:
        before = f.read(unit.start)
    return before.count(b"\n") + index + 1


def decode_lines(unit: Unit, raw: bytes, errors: str, skipped: dict[str, int]) -> list[tuple[int, str]]:
    """(line index in the unit, text) of every line, decoded as --errors says."""
    lines = raw.split(b"\n")
    if raw.endswith(b"\n"):
        lines.pop()  # the empty string after the final newline is not a line
    try:  # the common case, decoded in one call
        text = raw.decode("utf-8")
        return list(enumerate(line.removesuffix("\r") for line in text.split("\n")[: len(lines)]))
    except UnicodeDecodeError:
        pass
    out = []
    for i, line in enumerate(lines):
        line = line.removesuffix(b"\r")
        try:
            out.append((i, line.decode("utf-8")))
        except UnicodeDecodeError as e:
            if errors == "strict":
                raise DataError(f"{unit.path}:{line_number(unit, i)}: not valid UTF-8 "
                                f"({e.reason} at byte {e.start}); use --errors replace or skip") from None
            skipped["undecodable_lines"] = skipped.get("undecodable_lines", 0) + 1
            if errors == "replace":
                out.append((i, line.decode("utf-8", errors="replace")))
    return out


def documents(unit: Unit, lines: list[tuple[int, str]], text_key: str, skipped: dict[str, int]) -> list[str]:
    """The documents of a unit: each line of a .txt, the text field of each .jsonl line."""
    docs = []
    is_jsonl = unit.path.suffix == ".jsonl"
    for offset, line in lines:
        if is_jsonl:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{unit.path}:{line_number(unit, offset)}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_key not in record:
                raise DataError(f"{unit.path}:{line_number(unit, offset)}: no {text_key!r} field "
                                "(choose it with --text_key)")
            line = record[text_key]
            if not isinstance(line, str):
                raise DataError(f"{unit.path}:{line_number(unit, offset)}: field {text_key!r} is "
                                f"{type(line).__name__}, not text")
        if not line.strip():
            skipped["empty"] = skipped.get("empty", 0) + 1
            continue
        docs.append(line)
    return docs


def pack_documents(encoded: list[list[int]], bos: int | None, eos: int | None,
                   dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, index): documents laid end to end with BOS/EOS; index = starts + total."""
    extra = (bos is not None) + (eos is not None)
    lengths = np.fromiter((len(ids) + extra for ids in encoded), dtype=np.uint64, count=len(encoded))
    index = np.zeros(len(encoded) + 1, dtype="<u8")
    np.cumsum(lengths, out=index[1:])
    tokens = np.empty(int(index[-1]), dtype=dtype)
    for start, ids in zip(index[:-1].tolist(), encoded):
        if bos is not None:
            tokens[start] = bos
            start += 1
        tokens[start : start + len(ids)] = ids
        if eos is not None:
            tokens[start + len(ids)] = eos
    return tokens, index


def tokenize_unit(tokenizer: str, out_dir: str, opts: dict[str, Any], unit: Unit) -> dict[str, Any]:
    """Tokenize one unit into tokens-<index>.bin / .idx; return its file entry and counts."""
    sp = load_sp(tokenizer)
    skipped: dict[str, int] = {}
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        raw = f.read(unit.nbytes)
    docs = documents(unit, decode_lines(unit, raw, opts["errors"], skipped), opts["text_key"], skipped)
    # Control pieces such as <s> are never matched in text by sentencepiece, so a document
    # containing the string "<s>" cannot produce a second BOS.
    encoded = sp.encode(docs, num_threads=1)
    tokens, index = pack_documents(encoded, sp.bos_id() if opts["bos"] else None,
                                   sp.eos_id() if opts["eos"] else None, dtype_for_vocab(sp.vocab_size()))
    names = shard_names(unit.index)
    tokens.tofile(Path(out_dir) / names["tokens"])
    index.tofile(Path(out_dir) / names["index"])
    entry = {"tokens": names["tokens"], "index": names["index"], "num_tokens": int(index[-1]),
             "num_documents": len(docs)}
    return {"file": entry, "skipped": skipped}
