"""Instruction data → token shards with prompt lengths: reading records, formatting,
truncating without losing EOS, and tokenizing one unit of records."""

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
from .templates import TEMPLATES, format_prompt
from .text import pack_documents

SUFFIXES = (".json", ".jsonl")
FIELDS = ("instruction", "input", "output")
RECORDS_PER_UNIT = 2000


@dataclass(frozen=True)
class Record:
    where: str  # "file:line" or "file record N", for messages
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Unit:
    index: int
    records: tuple[Record, ...]

    @property
    def nbytes(self) -> int:
        return sum(len(r.instruction) + len(r.input) + len(r.output) for r in self.records)


def parse_field_map(text: str) -> dict[str, str]:
    """'instruction=question,output=std_answer' → {ours: theirs}, unmapped fields as is."""
    mapping = {f: f for f in FIELDS}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        ours, sep, theirs = pair.partition("=")
        if not sep or ours not in FIELDS or not theirs:
            raise DataError(f"--field_map: {pair!r} is not one of {', '.join(FIELDS)}=FIELD")
        mapping[ours] = theirs
    return mapping


def lookup(record: Any, path: str) -> Any:
    """A dotted path into nested dicts and lists ('instances.0.input'); None if absent."""
    node = record
    for part in path.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def raw_records(path: Path) -> list[tuple[str, Any]]:
    """(location, object) of every record in an Alpaca JSON list or a JSON Lines file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (Alpaca format)")
        return [(f"{path} record {i}", r) for i, r in enumerate(data)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return out


def read_records(path: Path, fields: dict[str, str], skipped: dict[str, int]) -> list[Record]:
    records = []
    for where, raw in raw_records(path):
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
        values = {f: lookup(raw, fields[f]) for f in FIELDS}
        if not isinstance(values["instruction"], str) or not values["instruction"].strip():
            raise DataError(f"{where}: no {fields['instruction']!r} field (map it with --field_map)")
        for f in ("input", "output"):
            if values[f] is not None and not isinstance(values[f], str):
                raise DataError(f"{where}: field {fields[f]!r} is {type(values[f]).__name__}, not text")
        if not values["output"] or not values["output"].strip():
            skipped["no_response"] = skipped.get("no_response", 0) + 1
            continue
        records.append(Record(where, values["instruction"], values["input"] or "", values["output"]))
    return records


def plan_units(sources: list[Path], a: argparse.Namespace) -> list[Unit]:
    if a.template not in TEMPLATES:
        raise DataError(f"--template {a.template!r}: choose from {', '.join(TEMPLATES)}")
    fields = parse_field_map(a.field_map)
    skipped: dict[str, int] = {}
    records = [r for path in sources for r in read_records(path, fields, skipped)]
    a.read_skipped = skipped  # reported in meta.json with the workers' counts
    chunks = [tuple(records[i : i + RECORDS_PER_UNIT]) for i in range(0, len(records), RECORDS_PER_UNIT)]
    if not chunks and skipped:
        raise DataError(f"no usable records ({skipped})")
    return [Unit(i, c) for i, c in enumerate(chunks)]


def options(a: argparse.Namespace) -> dict[str, Any]:
    return {"template": a.template, "max_seq_length": a.max_seq_length,
            "field_map": a.field_map, "system_prompt": a.system_prompt}


def make_worker(tokenizer: Path, out_dir: Path, a: argparse.Namespace):
    # records skipped while reading are reported once, with the first unit's counts
    opts = {**options(a), "read_skipped": getattr(a, "read_skipped", {})}
    return functools.partial(tokenize_unit, str(tokenizer), str(out_dir), opts)


def cut_content(instruction: str, input: str, budget: int) -> tuple[str, str]:
    """Keep `budget` characters of user content: the input is shortened first."""
    if budget >= len(instruction) + len(input):
        return instruction, input
    if budget >= len(instruction):
        return instruction, input[: budget - len(instruction)]
    return instruction[:budget], ""


def encode_sample(sp, r: Record, opts: dict[str, Any]) -> tuple[list[int], int, bool]:
    """(tokens, prompt length, truncated) of one record.

    Source = BOS + prompt; target = response + EOS. When too long, the response keeps at
    least half of max_seq_length (or all of it) and always ends with EOS; the prompt is
    shortened in its user content, found by bisection, so the template text stays whole.
    """
    limit = opts["max_seq_length"]
    system = opts["system_prompt"]
    source = [sp.bos_id()] + sp.encode(format_prompt(opts["template"], r.instruction, r.input, system))
    target = sp.encode(r.output) + [sp.eos_id()]
    if len(source) + len(target) <= limit:
        return source + target, len(source), False
    keep = max(limit - len(source), min(len(target), limit // 2))
    if len(target) > keep:
        target = target[: keep - 1] + [sp.eos_id()]
    budget = limit - len(target)
    if len(source) > budget:
        lo, hi = 0, len(r.instruction) + len(r.input)  # largest content that fits: bisection
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            ins, inp = cut_content(r.instruction, r.input, mid)
            candidate = [sp.bos_id()] + sp.encode(format_prompt(opts["template"], ins, inp, system))
            if len(candidate) <= budget:
                best, lo = candidate, mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise DataError(f"{r.where}: --max_seq_length {limit} leaves no room for the template "
                            f"{opts['template']!r} itself")
        source = best
    return source + target, len(source), True


def tokenize_unit(tokenizer: str, out_dir: str, opts: dict[str, Any], unit: Unit) -> dict[str, Any]:
    sp = load_sp(tokenizer)
    samples, plens, truncated = [], [], 0
    for r in unit.records:
        tokens, plen, cut = encode_sample(sp, r, opts)
        samples.append(tokens)
        plens.append(plen)
        truncated += cut
    tokens, index = pack_documents(samples, None, None, dtype_for_vocab(sp.vocab_size()))
    names = shard_names(unit.index)
    tokens.tofile(Path(out_dir) / names["tokens"])
    index.tofile(Path(out_dir) / names["index"])
    np.asarray(plens, dtype="<u4").tofile(Path(out_dir) / names["plen"])
    entry = {"tokens": names["tokens"], "index": names["index"], "plen": names["plen"],
             "num_tokens": int(index[-1]), "num_documents": len(samples)}
    skipped = dict(opts["read_skipped"]) if unit.index == 0 else {}
    return {"file": entry, "skipped": skipped, "truncated": truncated}
