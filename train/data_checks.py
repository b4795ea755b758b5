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
from train.config import ConfigError

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


def check_length(key: str, length: int, base: Checkpoint) -> None:
    """Refuse sequences longer than the model's positions (params.json max_seq_len).

    Raises:
        ConfigError: naming the setting, both lengths and the model.
    """
    if length > base.args.max_seq_len:
        raise ConfigError(f"{key}: {length} is above the max_seq_len {base.args.max_seq_len} of "
                          f"{base.path or 'the model'}; use at most {base.args.max_seq_len}")
