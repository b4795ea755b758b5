"""Checking untrusted JSON (params.json, config.json, adapter_config.json, meta.json) key by key.

Every reader describes the keys it uses once, as a table of `Field`s, and `check_fields`
holds a parsed file against it before anything is built from it, so that a wrong type or
an absurd size ends in one message naming the file and the key,
`params.json: norm_eps: expected a number, got "abc"`, instead of a TypeError deep inside
torch (or gigabytes allocated for `n_layers: 1000000000`).

It lives here because `tokenizer` is the bottom layer: `model` and `data` both use it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What each kind is called in a message; "number" accepts ints and floats, "integer" ints only.
_KIND_NAMES = {"integer": "an integer", "number": "a number", "string": "a string",
               "boolean": "true or false", "object": "an object", "list": "a list"}


@dataclass(frozen=True)
class Field:
    """What one key may hold.

    Attributes:
        kind: "integer", "number", "string", "boolean", "object" or "list".
        min, max: inclusive bounds for numbers.
        above: exclusive lower bound for numbers (e.g. 0 for an epsilon).
        choices: the only values allowed (strings or numbers).
        also: values allowed besides the range (e.g. -1 for Meta's vocab_size).
        required: whether the key must be present.
        nullable: whether null is allowed.
        fields: for objects, the table their keys are checked against.
        items: for lists, what every element must be.
        values: for objects used as maps (e.g. PEFT's rank_pattern), what every value must be.
    """

    kind: str
    min: float | None = None
    max: float | None = None
    above: float | None = None
    choices: tuple[Any, ...] | None = None
    also: tuple[Any, ...] = ()
    required: bool = True
    nullable: bool = False
    fields: Mapping[str, Field] | None = None
    items: Field | None = None
    values: Field | None = None


def describe(value: Any, limit: int = 40) -> str:
    """A value as JSON would show it, cut short (`"abc"`, `[1, 2]`, `true`, `NaN`)."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _kind_ok(value: Any, kind: str) -> bool:
    # bool is an int subclass in Python; `true` is never a size or a rate
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    types = {"string": str, "boolean": bool, "object": dict, "list": list}
    if kind not in types:
        raise ValueError(f"unknown field kind {kind!r}")
    return isinstance(value, types[kind])


def _range_problem(value: Any, f: Field) -> str | None:
    if f.kind in ("integer", "number"):
        if isinstance(value, float) and not math.isfinite(value):
            return f"expected a finite number, got {describe(value)}"
        if f.min is not None and value < f.min:
            return f"expected at least {f.min:g}, got {describe(value)}"
        if f.max is not None and value > f.max:
            return f"expected at most {f.max:g}, got {describe(value)}"
        if f.above is not None and not value > f.above:
            return f"expected a number above {f.above:g}, got {describe(value)}"
    if f.choices is not None and value not in f.choices:
        return f"expected one of {', '.join(map(describe, f.choices))}, got {describe(value)}"
    return None


def _problem(value: Any, f: Field, key: str) -> tuple[str, str] | None:
    """(key path, what is wrong) for the first problem in `value`, or None."""
    if value is None:
        return None if f.nullable else (key, f"expected {_KIND_NAMES[f.kind]}, got null")
    if value in f.also and _kind_ok(value, f.kind):
        return None
    if not _kind_ok(value, f.kind):
        return key, f"expected {_KIND_NAMES[f.kind]}, got {describe(value)}"
    if (why := _range_problem(value, f)) is not None:
        return key, why
    if f.kind == "object" and f.fields is not None:
        return _first_problem(value, f.fields, f"{key}.")
    if f.kind == "object" and f.values is not None:
        for k, v in value.items():
            if (p := _problem(v, f.values, f"{key}.{k}")) is not None:
                return p
    if f.kind == "list" and f.items is not None:
        for i, v in enumerate(value):
            if (p := _problem(v, f.items, f"{key}[{i}]")) is not None:
                return p
    return None


def _first_problem(obj: Mapping[str, Any], table: Mapping[str, Field], prefix: str = ""
                   ) -> tuple[str, str] | None:
    for key, f in table.items():
        if key not in obj:
            if f.required:
                return f"{prefix}{key}", "missing"
            continue
        if (p := _problem(obj[key], f, f"{prefix}{key}")) is not None:
            return p
    return None


def check_fields(
    obj: Any, table: Mapping[str, Field], where: str | Path = "",
    error: type[Exception] = ValueError,
) -> dict[str, Any]:
    """Check a parsed JSON object against `table`; return it unchanged.

    Keys not in the table are left alone (callers that refuse unknown keys say so
    themselves, with the list of known ones).

    Args:
        obj: the parsed JSON.
        table: key → Field, checked in this order (the first problem is reported).
        where: the file, put in front of the message; empty for none.
        error: the exception to raise (FormatError, DataError, ...).

    Raises:
        error: `"{where}: {key}: expected …, got …"` for the first key that does not fit.
    """
    prefix = f"{where}: " if str(where) else ""
    if not isinstance(obj, dict):
        raise error(f"{prefix}expected a JSON object, got {describe(obj)}")
    problem = _first_problem(obj, table)
    if problem is not None:
        raise error(f"{prefix}{problem[0]}: {problem[1]}")
    return obj


__all__ = ["Field", "check_fields", "describe"]
