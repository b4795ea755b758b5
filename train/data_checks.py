"""Token data held against the model before training starts: the right kind of data for
the script, the same tokenizer, ids the embedding can look up, sequences the model's
positions cover. Each refusal names the file and what to do instead of a shape error or
an index error deep inside a step.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from data.shards import DataError, check_fits_vocab, check_tokenizer, read_meta
from model.source import Checkpoint, check_tokenizer_rows
from train.config import ConfigError, DataConfig

# Which script trains on which kind of token directory (meta.json's "kind").
SCRIPTS = {"pretrain": "train/pretrain.py", "sft": "train/sft.py"}


def check_data_for_model(path: str | Path, base: Checkpoint, kind: str, *, note: bool = True
                         ) -> dict[str, Any]:
    """meta.json of the token directory at `path`, checked against the model `base`.

    Args:
        path: the token directory (data.path).
        base: the checkpoint the model is built from.
        kind: the kind of data the calling script trains on ("pretrain" or "sft").
        note: print the note about padding rows (one rank prints it, not every one).

    Raises:
        DataError: data of another kind, tokenizer or vocabulary than the model's.
        FormatError: the model's tokenizer is larger than its embedding.
    """
    path = Path(path)
    meta = read_meta(path)
    if meta["kind"] != kind:
        raise DataError(f"{path / 'meta.json'}: kind: {meta['kind']!r} data (prepared "
                        f"{'with' if meta['kind'] == 'sft' else 'without'} --sft) cannot train in "
                        f"{SCRIPTS[kind]}; use {SCRIPTS[meta['kind']]}")
    if (padding := check_tokenizer_rows(base)) and note:
        print(padding, file=sys.stderr)
    if base.tokenizer is not None:
        check_tokenizer(meta, base.tokenizer, path)
    check_fits_vocab(path, meta, base.args.vocab_size, base.path or "the model")
    return meta


def check_inputs_for_model(data: DataConfig, base: Checkpoint, kind: str, *, note: bool = True) -> None:
    """Every token directory of the run (`DataConfig.inputs`) against the model, as
    `check_data_for_model` (the padding note said once)."""
    for i, (_, path) in enumerate(data.inputs()):
        check_data_for_model(path, base, kind, note=note and i == 0)


def check_inputs_agree(data: DataConfig) -> None:
    """The token directories of one run (data.sources, data.val_sets) were made alike: of
    one kind, with one tokenizer and, for SFT, one prompt template (the run's output
    records one). Reads only their meta.json, so it can run before anything is written.

    Raises:
        DataError: naming both directories and what differs.
    """
    inputs = data.inputs()
    if len(inputs) < 2:
        return
    first = Path(inputs[0][1])
    m0 = read_meta(first)
    for _, path in inputs[1:]:
        path, meta = Path(path), read_meta(path)
        if meta["kind"] != m0["kind"]:
            raise DataError(f"{path}: {meta['kind']!r} data, but {first} holds {m0['kind']!r} data: "
                            "the token directories of one run must be of one kind")
        t, t0 = meta["tokenizer"], m0["tokenizer"]
        if t["sha256"] != t0["sha256"]:
            raise DataError(f"{path}: tokenized with {t['file']} (sha256 {t['sha256'][:12]}…), but "
                            f"{first} with {t0['file']} (sha256 {t0['sha256'][:12]}…): the ids would "
                            "not mean the same pieces; prepare both with the model's tokenizer")
        if m0["kind"] == "sft" and meta["options"].get("template") != m0["options"].get("template"):
            raise DataError(f"{path}: prepared with the template {meta['options'].get('template')!r}, "
                            f"but {first} with {m0['options'].get('template')!r}: a run trains on, "
                            "and its output records, one template")


def check_length(key: str, length: int, base: Checkpoint) -> None:
    """Refuse sequences longer than the model's positions (params.json max_seq_len).

    Raises:
        ConfigError: naming the setting, both lengths and the model.
    """
    if length > base.args.max_seq_len:
        raise ConfigError(f"{key}: {length} is above the max_seq_len {base.args.max_seq_len} of "
                          f"{base.path or 'the model'}; use at most {base.args.max_seq_len}")
