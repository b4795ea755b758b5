"""The token shard format: a directory of flat little-endian token files plus meta.json.

    meta.json            format and version, kind (pretrain | sft), dtype, vocab size,
                         tokenizer sha256, special ids, counts, sources, the ordered files
    tokens-00000.bin     token ids, raw (uint16 when the vocabulary fits, else uint32);
                         concatenated in meta.json's order they are the token stream
    tokens-00000.idx     uint64 start offset of every document in that file, then its length
    tokens-00000.plen    (SFT) uint32 per sample: how many leading tokens are prompt

Readers map the files with numpy; nothing is loaded whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tokenizer.spm_io import sha256_file

FORMAT = "zhllama-tokens"
FORMAT_VERSION = 1
META = "meta.json"


class DataError(ValueError):
    """Input or a token directory that cannot be used; the message names the file."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def shard_names(index: int) -> dict[str, str]:
    stem = f"tokens-{index:05d}"
    return {"tokens": f"{stem}.bin", "index": f"{stem}.idx", "plen": f"{stem}.plen"}


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a token directory, checked to be ours and complete."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no {META} (not a token directory, or an interrupted prepare)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path / META}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path / META}: not a zhllama token directory")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path / META}: format version {meta.get('format_version')}, "
                        f"this zhllama reads {FORMAT_VERSION}")
    return meta


def check_tokenizer(meta: dict[str, Any], tokenizer_file: str | Path, where: str | Path = "") -> None:
    """Refuse data made with another tokenizer than the model's."""
    sha = sha256_file(tokenizer_file)
    if meta["tokenizer"]["sha256"] != sha:
        raise DataError(
            f"{where}: tokenized with {meta['tokenizer']['file']} (sha256 "
            f"{meta['tokenizer']['sha256'][:12]}…), but the model's tokenizer {tokenizer_file} has "
            f"sha256 {sha[:12]}…: the ids would not mean the same pieces. Prepare the data again "
            "with the model's tokenizer.")


def open_tokens(path: Path, file_meta: dict[str, Any], dtype: np.dtype) -> np.ndarray:
    return np.memmap(path / file_meta["tokens"], dtype=dtype, mode="r")


def read_index(path: Path, file_meta: dict[str, Any]) -> np.ndarray:
    """Document start offsets in that file, followed by its token count."""
    return np.fromfile(path / file_meta["index"], dtype="<u8")


@contextlib.contextmanager
def atomic_dir(dst: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside `dst`, renamed to it only when the block succeeds."""
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (use --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
