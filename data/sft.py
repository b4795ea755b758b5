"""Instruction data → token shards with prompt lengths: reading records, formatting,
truncating without losing EOS, and tokenizing one unit of records.

A sample is source + target: source = BOS + the formatted prompt, target = the response
+ EOS, each tokenized on its own (as Chinese-LLaMA-Alpaca does), so the boundary between
them is exact. The loss covers the target only; each sample's source length is stored.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tokenizer.templates import TEMPLATES, format_prompt

from .preparer import ERRORS, Preparer, Worker
from .shards import DataError, ShardWriter, dtype_for_vocab
from .text import processor

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
    def nbytes(self) -> int:  # for the progress bar
        return sum(len(r.instruction.encode()) + len(r.input.encode()) + len(r.output.encode())
                   for r in self.records)


def parse_field_map(text: str) -> dict[str, str]:
    """'instruction=question,output=std_answer' → {ours: theirs}, unmapped fields as is."""
    mapping = {f: f for f in FIELDS}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        ours, sep, theirs = pair.partition("=")
        if not sep or ours.strip() not in FIELDS or not theirs.strip():
            raise DataError(f"--field_map: {pair!r} is not one of {', '.join(FIELDS)}=FIELD")
        mapping[ours.strip()] = theirs.strip()
    return mapping


def lookup(record: Any, path: str) -> Any:
    """A dotted path into nested dicts and lists ('instances.0.input'); None if absent."""
    node = record
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def read_text(path: Path, errors: str = "strict", skipped: dict[str, int] | None = None) -> str:
    """The file as text (a UTF-8 BOM dropped), decoded as --errors says.

    strict: one DataError naming the first bad line; replace: bad bytes become U+FFFD;
    skip: undecodable lines are dropped (JSON Lines only: a line of a JSON list is not a
    record). Replaced or skipped lines are counted as `undecodable_lines`.
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        if errors == "strict":
            raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason}); "
                            "use --errors replace or skip") from None
        if errors == "skip" and path.suffix == ".json":
            raise DataError(f"{path}:{line}: not valid UTF-8; --errors skip drops lines of JSON "
                            "Lines files, use --errors replace for a JSON list") from None
    kept, bad = [], 0
    for raw_line in raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"):
        try:
            kept.append(raw_line.decode("utf-8"))
        except UnicodeDecodeError:
            bad += 1  # a skipped line stays as an empty one, so later line numbers hold
            kept.append(raw_line.decode("utf-8", errors="replace") if errors == "replace" else "")
    if skipped is not None:
        skipped["undecodable_lines"] = skipped.get("undecodable_lines", 0) + bad
    return "\n".join(kept)


def raw_records(path: Path, errors: str = "strict", skipped: dict[str, int] | None = None
                ) -> list[tuple[str, Any]]:
    """(location, object) of every record in an Alpaca JSON list or a JSON Lines file."""
    text = read_text(path, errors, skipped)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (Alpaca format)")
        return [(f"{path} record {i}", r) for i, r in enumerate(data)]
    out = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other "line breaks"
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                out.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return out


def read_records(path: Path, fields: dict[str, str], skipped: dict[str, int],
                 errors: str = "strict") -> list[Record]:
    """The usable records of one file; those with an empty instruction or no response are
    counted in `skipped`.

    A field that no record of the file has (the response, or an input named in
    --field_map) is a wrong field name, not a run of bad records: one DataError.
    """
    records, present = [], set()
    for where, raw in raw_records(path, errors, skipped):
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
        values = {f: lookup(raw, fields[f]) for f in FIELDS}
        present.update(f for f in FIELDS if values[f] is not None)
        for f in FIELDS:
            if values[f] is not None and not isinstance(values[f], str):
                raise DataError(f"{where}: field {fields[f]!r} is {type(values[f]).__name__}, not text")
        if values["instruction"] is None:
            raise DataError(f"{where}: no {fields['instruction']!r} field (map it with --field_map)")
        # A missing field means a wrong --field_map (stop); an empty one, a bad record (skip).
        empty = [k for k, f in (("no_instruction", "instruction"), ("no_response", "output"))
                 if not (values[f] or "").strip()]
        if empty:
            skipped[empty[0]] = skipped.get(empty[0], 0) + 1
            continue
        records.append(Record(where, values["instruction"], values["input"] or "", values["output"]))
    must_exist = ["output"] + (["input"] if fields["input"] != "input" else [])
    for f in must_exist:
        if present and f not in present:
            raise DataError(f"{path}: no record has a {fields[f]!r} field "
                            f"(name the {f} field with --field_map {f}=FIELD)")
    return records


@dataclass(frozen=True)
class SFTPreparer(Preparer):
    """Instruction data: every record formatted with `template`, stored as one sample with
    its prompt length (the loss covers the response and its </s> only).

    Records are read whole (a JSON list cannot be cut), then cut into units of
    RECORDS_PER_UNIT records.
    """

    kind: ClassVar[str] = "sft"
    suffixes: ClassVar[tuple[str, ...]] = (".json", ".jsonl")

    template: str = "cla_v1"  # tokenizer/templates.py
    max_seq_length: int = 512  # longest sample in tokens; longer ones are shortened, keeping EOS
    field_map: str = ""  # "our=theirs,…" (see parse_field_map)
    system_prompt: str | None = None  # None: the template's own
    errors: str = "strict"  # undecodable UTF-8: stop, replace with U+FFFD, or skip the line

    def check(self) -> None:
        if self.max_seq_length < 2:
            raise DataError(f"--max_seq_length must be at least 2, got {self.max_seq_length}")
        if self.template not in TEMPLATES:
            raise DataError(f"--template {self.template!r}: choose from {', '.join(TEMPLATES)}")
        if self.errors not in ERRORS:
            raise DataError(f"--errors {self.errors!r}: choose from {', '.join(ERRORS)}")
        parse_field_map(self.field_map)

    def plan_units(self, sources: list[Path]) -> tuple[list[Unit], dict[str, int]]:
        """Every usable record, in file order, cut into units; and the records skipped."""
        fields = parse_field_map(self.field_map)
        skipped: dict[str, int] = {}
        records = [r for path in sources for r in read_records(path, fields, skipped, self.errors)]
        chunks = [tuple(records[i : i + RECORDS_PER_UNIT])
                  for i in range(0, len(records), RECORDS_PER_UNIT)]
        return [Unit(i, c) for i, c in enumerate(chunks)], skipped

    def recorded_options(self) -> dict[str, Any]:
        return {"template": self.template, "max_seq_length": self.max_seq_length,
                "field_map": self.field_map, "system_prompt": self.system_prompt}

    def worker(self, tokenizer: Path, out_dir: Path) -> Worker:
        return functools.partial(tokenize_unit, str(tokenizer), str(out_dir), self.recorded_options())


def cut_content(instruction: str, input: str, budget: int) -> tuple[str, str]:
    """Keep `budget` characters of user content: the input is shortened first."""
    if budget >= len(instruction) + len(input):
        return instruction, input
    if budget >= len(instruction):
        return instruction, input[: budget - len(instruction)]
    return instruction[:budget], ""


def shortest_source(sp, r: Record, opts: dict[str, Any], budget: int) -> list[int]:
    """BOS + the prompt with as much user content as fits in `budget` tokens.

    Bisection over the number of characters kept (input first, then instruction); the
    prompt is re-formatted and re-tokenized each time, so the template text stays whole.
    """
    lo, hi, best = 0, len(r.instruction) + len(r.input), None
    while lo <= hi:
        mid = (lo + hi) // 2
        ins, inp = cut_content(r.instruction, r.input, mid)
        source = [sp.bos_id()] + sp.encode(format_prompt(opts["template"], ins, inp, opts["system_prompt"]))
        if len(source) <= budget:
            best, lo = source, mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise DataError(f"{r.where}: --max_seq_length {opts['max_seq_length']} leaves no room for the "
                        f"template {opts['template']!r} itself")
    return best


def encode_sample(sp, r: Record, opts: dict[str, Any]) -> tuple[list[int], int, bool]:
    """(tokens, prompt length, truncated) of one record.

    Source = BOS + prompt; target = response + EOS. When too long, the response keeps at
    least min(its length, max_seq_length // 2) tokens — its first ones — and always ends
    with EOS; the prompt gives up user content first (see `shortest_source`).
    """
    limit = opts["max_seq_length"]
    prompt = format_prompt(opts["template"], r.instruction, r.input, opts["system_prompt"])
    source = [sp.bos_id()] + sp.encode(prompt)
    target = sp.encode(r.output) + [sp.eos_id()]
    if len(source) + len(target) <= limit:
        return source + target, len(source), False
    keep = max(limit - len(source), min(len(target), limit // 2), 1)
    if len(target) > keep:
        target = target[: keep - 1] + [sp.eos_id()]
    if len(source) > limit - len(target):
        source = shortest_source(sp, r, opts, limit - len(target))
    return source + target, len(source), True


def tokenize_unit(tokenizer: str, out_dir: str, opts: dict[str, Any], unit: Unit) -> dict[str, Any]:
    """Tokenize one unit into tokens-<index>.bin / .idx / .plen; return its entry and counts."""
    sp = processor(tokenizer)
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise DataError(f"{tokenizer}: instruction data needs a tokenizer with BOS and EOS ids")
    samples, plens, truncated = [], [], 0
    for r in unit.records:
        tokens, plen, cut = encode_sample(sp, r, opts)
        samples.append(tokens)
        plens.append(plen)
        truncated += cut
    with ShardWriter(Path(out_dir), unit.index, dtype_for_vocab(sp.vocab_size())) as shard:
        shard.add(samples)
    np.asarray(plens, dtype="<u4").tofile(Path(out_dir) / shard.names["plen"])
    entry = {**shard.entry(), "plen": shard.names["plen"]}
    return {"file": entry, "skipped": {}, "truncated": truncated}
