"""The token shard format: a directory of flat little-endian token files plus meta.json.

    meta.json            format and version, kind (pretrain | sft), dtype, vocab size,
                         tokenizer sha256, special ids, counts, the largest token id,
                         sources, the ordered files
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
from tokenizer.schema import Field, check_fields, describe

FORMAT = "zhllama-tokens"
FORMAT_VERSION = 1
META = "meta.json"
KINDS = ("pretrain", "sft")


class DataError(ValueError):
    """Input or a token directory that cannot be used; the message names the file."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it (vocab ≤ 65,536), else uint32; little-endian."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def shard_names(index: int) -> dict[str, str]:
    stem = f"tokens-{index:05d}"
    return {"tokens": f"{stem}.bin", "index": f"{stem}.idx", "plen": f"{stem}.plen"}


_FILE_FIELDS = {
    "tokens": Field("string"), "index": Field("string"), "plen": Field("string", required=False),
    "num_tokens": Field("integer", min=0), "num_documents": Field("integer", min=0),
    "max_token_id": Field("integer", min=0, required=False, nullable=True),
}
# What each key of meta.json may hold, checked before any token file is opened.
META_FIELDS = {
    "kind": Field("string", choices=KINDS),
    "dtype": Field("string", choices=("uint16", "uint32")),
    "vocab_size": Field("integer", min=1, max=1 << 32),
    "tokenizer": Field("object", fields={"file": Field("string"), "sha256": Field("string")}),
    "special_ids": Field("object", fields={k: Field("integer", min=-1)
                                           for k in ("bos", "eos", "pad", "unk")}),
    "options": Field("object"),
    "files": Field("list", items=Field("object", fields=_FILE_FIELDS)),
    "num_tokens": Field("integer", min=0),
    "num_documents": Field("integer", min=0),
    # recorded since prepare computes it; older directories have none (computed on demand)
    "max_token_id": Field("integer", min=0, required=False, nullable=True),
}
_SFT_FIELDS = {"options": Field("object", fields={"max_seq_length": Field("integer", min=2)})}


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a token directory, checked to be ours, complete and consistent.

    Every key is checked for type and range (`META_FIELDS`), file names must lie in the
    directory, and the counts must agree, before a token file is opened.

    Raises:
        DataError: naming meta.json and the first key that does not fit.
    """
    path = Path(path)
    where = path / META
    try:
        meta = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no {META} (not a token directory, or an interrupted prepare)") from None
    except ValueError as e:  # bad JSON, not UTF-8, an integer of thousands of digits
        raise DataError(f"{where}: invalid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{where}: not a zhllama token directory")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{where}: format version {describe(meta.get('format_version'))}, "
                        f"this zhllama reads {FORMAT_VERSION}")
    check_fields(meta, META_FIELDS, where, DataError)
    _check_consistent(meta, where)
    return meta


def _check_consistent(meta: dict[str, Any], where: Path) -> None:
    """What the per-key table cannot say: sizes that must agree, names inside the directory."""
    vocab = meta["vocab_size"]
    if meta["dtype"] == "uint16" and vocab > 65536:
        raise DataError(f"{where}: dtype: uint16 cannot hold the ids of vocab_size {vocab}")
    for key, value in meta["special_ids"].items():
        if value >= vocab:
            raise DataError(f"{where}: special_ids.{key}: {value} is not below vocab_size {vocab}")
    if meta["kind"] == "sft":
        check_fields(meta, _SFT_FIELDS, where, DataError)
    for i, f in enumerate(meta["files"]):
        names = ("tokens", "index", "plen") if meta["kind"] == "sft" else ("tokens", "index")
        for key in names:
            name = f.get(key)
            if name is None:
                raise DataError(f"{where}: files[{i}].{key}: missing")
            if Path(name).name != name or name in ("", ".", ".."):
                raise DataError(f"{where}: files[{i}].{key}: {describe(name)} is not a file name "
                                "inside the token directory")
        if f.get("max_token_id") is not None and f["max_token_id"] >= vocab:
            raise DataError(f"{where}: files[{i}].max_token_id: {f['max_token_id']} is not below "
                            f"vocab_size {vocab}")
    for key in ("num_tokens", "num_documents"):
        total = sum(f[key] for f in meta["files"])
        if total != meta[key]:
            raise DataError(f"{where}: {key}: {meta[key]}, but its files add up to {total}")
    if meta.get("max_token_id") is not None and meta["max_token_id"] >= vocab:
        raise DataError(f"{where}: max_token_id: {meta['max_token_id']} is not below vocab_size {vocab}")


def max_token_id(path: str | Path, meta: dict[str, Any], chunk: int = 1 << 24) -> int:
    """The largest token id in a token directory (-1 when it holds no token).

    meta.json records it since prepare computes it; for older directories it is computed
    with numpy over the memory-mapped files, a chunk at a time (a few seconds per GB).
    """
    if meta.get("max_token_id") is not None:
        return int(meta["max_token_id"])
    path, dtype = Path(path), np.dtype(meta["dtype"]).newbyteorder("<")
    best = -1
    for f in meta["files"]:
        if f.get("max_token_id") is not None:
            best = max(best, int(f["max_token_id"]))
            continue
        if f["num_tokens"] == 0:  # an empty file cannot be mapped, and holds no id
            continue
        try:
            tokens = open_tokens(path, f, dtype)
        except (OSError, ValueError) as e:  # missing, or not a whole number of ids
            raise DataError(f"{path / f['tokens']}: cannot be read as {meta['dtype']} token ids "
                            f"({e})") from None
        for start in range(0, len(tokens), chunk):
            best = max(best, int(tokens[start : start + chunk].max()))
    return best


def check_fits_vocab(path: str | Path, meta: dict[str, Any], rows: int, what: str) -> None:
    """Refuse token data whose ids a model with `rows` embedding rows cannot look up.

    Args:
        path: the token directory (named in the message).
        meta: its meta.json (`read_meta`).
        rows: the model's vocabulary size (embedding rows).
        what: the model, for the message (e.g. its directory).

    Raises:
        DataError: naming both sizes.
    """
    if meta["vocab_size"] > rows:
        raise DataError(f"{path}: prepared with a {meta['vocab_size']}-piece tokenizer, larger than "
                        f"the {rows} embedding rows of {what}; resize the model first "
                        "(python -m model.resize)")
    top = max_token_id(path, meta)
    if top >= rows:
        raise DataError(f"{path}: holds token id {top}, but {what} has only {rows} embedding rows "
                        f"(ids 0..{rows - 1})")
    if top >= meta["vocab_size"]:
        raise DataError(f"{path}: holds token id {top}, outside its own vocab_size "
                        f"{meta['vocab_size']} (meta.json): the files are corrupt")


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
        self.max_token_id = -1

    def __enter__(self) -> ShardWriter:
        self._file = open(self.out_dir / self.names["tokens"], "wb")
        return self

    def add(self, docs: list[list[int]]) -> None:
        """Append documents (each a list of ids) to the shard, in order."""
        lengths = np.fromiter(map(len, docs), dtype=np.uint64, count=len(docs))
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=self.dtype, count=int(lengths.sum()))
        flat.tofile(self._file)
        self._lengths.append(lengths)
        if flat.size:  # recorded in meta.json, so training can check ids without a pass
            self.max_token_id = max(self.max_token_id, int(flat.max()))

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
                "num_tokens": self.num_tokens, "num_documents": self.num_documents,
                "max_token_id": self.max_token_id if self.max_token_id >= 0 else None}
