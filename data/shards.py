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

import itertools
import json
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tokenizer.files import sha256_file

FORMAT = "zhllama-tokens"
FORMAT_VERSION = 1
META = "meta.json"


class DataError(ValueError):
    """Input or a token directory that cannot be used; the message names the file."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it (vocab ≤ 65,536), else uint32; little-endian."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def shard_names(index: int) -> dict[str, str]:
    stem = f"tokens-{index:05d}"
    return {"tokens": f"{stem}.bin", "index": f"{stem}.idx", "plen": f"{stem}.plen"}


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a token directory, checked to be ours and complete."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no {META} (not a token directory, or an interrupted prepare)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path / META}: invalid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path / META}: not a zhllama token directory")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path / META}: format version {meta.get('format_version')}, "
                        f"this zhllama reads {FORMAT_VERSION}")
    return meta


def check_tokenizer(meta: dict[str, Any], tokenizer_file: str | Path, where: str | Path = "") -> None:
    """Refuse data made with another tokenizer than the model's.

    Args:
        meta: the token directory's meta.json (`read_meta`).
        tokenizer_file: the sentencepiece model the model uses.
        where: the token directory, named in the message.

    Raises:
        DataError: the sha256 of `tokenizer_file` is not the one recorded in `meta`.
    """
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


class ShardWriter:
    """Writes one shard (tokens-k.bin + tokens-k.idx) a batch of documents at a time.

    Documents arrive as lists of ids (what sentencepiece returns); they are appended to the
    .bin file as they come, so a worker never holds a whole unit as Python ints (~36 bytes
    per id). Use as a context manager; `entry()` after the block gives meta.json's record.
    """

    def __init__(self, out_dir: Path, index: int, dtype: np.dtype) -> None:
        self.names = shard_names(index)
        self.out_dir, self.dtype = Path(out_dir), dtype
        self._lengths: list[np.ndarray] = []
        self._file: BinaryIO | None = None

    def __enter__(self) -> ShardWriter:
        self._file = open(self.out_dir / self.names["tokens"], "wb")
        return self

    def add(self, docs: list[list[int]]) -> None:
        """Append documents (each a list of ids) to the shard, in order."""
        lengths = np.fromiter(map(len, docs), dtype=np.uint64, count=len(docs))
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=self.dtype, count=int(lengths.sum()))
        flat.tofile(self._file)
        self._lengths.append(lengths)

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        if exc[0] is None:
            lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.uint64)
            index = np.zeros(len(lengths) + 1, dtype="<u8")  # starts, then the file's total
            np.cumsum(lengths, out=index[1:])
            index.tofile(self.out_dir / self.names["index"])
            self.num_tokens, self.num_documents = int(index[-1]), len(lengths)

    def entry(self) -> dict[str, Any]:
        """meta.json's record of this shard: file names and counts."""
        return {"tokens": self.names["tokens"], "index": self.names["index"],
                "num_tokens": self.num_tokens, "num_documents": self.num_documents}
