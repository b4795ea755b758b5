"""llama2.c model files (`run.c`'s format): a small header, then float32 weights.

The legacy format (version 0) starts with 7 int32: dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len. A negative vocab_size means the classifier is stored
separately at the end; otherwise it is tied to the embedding. Version 1 starts with the
magic "ak42", a version int32, the same 7 ints and a shared-classifier flag, padded to 256
bytes. Weights are grouped by kind across layers (all wq, then all wk, ...), each matrix in
nn.Linear's [out, in] layout, rows in Meta's rotary order. The file carries no tokenizer:
its sentencepiece model must be given.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from ..llama import ModelArgs, ffn_params_for
from ..source import Checkpoint, check_specs
from ..tensor_io import FormatError, TensorSpec
from .options import ReadOptions

MAGIC = 0x616B3432  # "ak42" read as a little-endian int32
_V1_HEADER_BYTES = 256


def read_header(path: Path) -> tuple[dict[str, int], int, bool]:
    """(header fields, byte offset of the weights, shared classifier) of a llama2.c file.

    The offset also tells the version apart: 28 for the legacy format, 256 for version 1.
    """
    with open(path, "rb") as f:
        raw = f.read(_V1_HEADER_BYTES)
    if len(raw) < 28:
        raise FormatError(f"{path}: too short to be a llama2.c model ({len(raw)} bytes)")
    keys = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    if struct.unpack("<I", raw[:4])[0] == MAGIC:
        version = struct.unpack("<i", raw[4:8])[0]
        if version != 1:
            raise FormatError(f"{path}: llama2.c format version {version} is not supported "
                              "(only 0 and 1: float32 weights)")
        fields = dict(zip(keys, struct.unpack("<7i", raw[8:36])))
        return fields, _V1_HEADER_BYTES, bool(raw[36])
    fields = dict(zip(keys, struct.unpack("<7i", raw[:28])))
    shared = fields["vocab_size"] > 0
    fields["vocab_size"] = abs(fields["vocab_size"])
    return fields, 28, shared


def looks_like_llama2c(path: Path) -> bool:
    """True if the header's numbers are plausible and the file size fits them exactly."""
    try:
        fields, offset, shared = read_header(path)
        blocks = _layout(fields, shared, offset)
    except (FormatError, ValueError, OSError, struct.error):
        return False
    return path.stat().st_size == offset + 4 * _total_floats(blocks)


def _args(fields: dict[str, int]) -> ModelArgs:
    multiple_of, multiplier = ffn_params_for(fields["dim"], fields["hidden_dim"])
    return ModelArgs(
        dim=fields["dim"], n_layers=fields["n_layers"], n_heads=fields["n_heads"],
        n_kv_heads=fields["n_kv_heads"], vocab_size=fields["vocab_size"],
        multiple_of=multiple_of, ffn_dim_multiplier=multiplier,
        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=fields["seq_len"],
    )


def _layout(
    fields: dict[str, int], shared: bool, offset: int
) -> list[tuple[str, tuple[int, ...]]]:
    """(kind, shape) of each block of floats, in file order; per-layer kinds have a layer dim."""
    if min(fields.values()) <= 0 or fields["dim"] % fields["n_heads"]:
        raise ValueError("implausible header")
    d, h, L, v = fields["dim"], fields["hidden_dim"], fields["n_layers"], fields["vocab_size"]
    hd = d // fields["n_heads"]
    kv = fields["n_kv_heads"] * hd
    matrices = [("wq", (L, d, d)), ("wk", (L, kv, d)), ("wv", (L, kv, d)), ("wo", (L, d, d))]
    ffn = [("w1", (L, h, d)), ("w2", (L, d, h)), ("w3", (L, h, d))]
    if offset == _V1_HEADER_BYTES:  # version 1: norms first, no rotary tables
        blocks = [("attention_norm", (L, d)), ("ffn_norm", (L, d)), ("norm", (d,)),
                  ("tok_embeddings", (v, d)), *matrices, *ffn]
    else:
        blocks = [
            ("tok_embeddings", (v, d)), ("attention_norm", (L, d)), *matrices,
            ("ffn_norm", (L, d)), *ffn, ("norm", (d,)),
            # Precomputed rotary tables, unused: positions are rotated at run time.
            ("freq_cis_real", (fields["seq_len"], hd // 2)),
            ("freq_cis_imag", (fields["seq_len"], hd // 2)),
        ]
    if not shared:
        blocks.append(("output", (v, d)))
    return blocks


def _total_floats(blocks: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(int(np.prod(shape)) for _, shape in blocks)


_KIND_NAMES = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv",
               "wo": "attention.wo", "w1": "feed_forward.w1", "w2": "feed_forward.w2",
               "w3": "feed_forward.w3", "attention_norm": "attention_norm", "ffn_norm": "ffn_norm"}


def read_llama2c(path: str | Path, tokenizer: str | Path | None = None) -> Checkpoint:
    """Open a llama2.c `.bin` as a canonical checkpoint (memory-mapped)."""
    path = Path(path)
    fields, offset, shared = read_header(path)
    try:
        blocks = _layout(fields, shared, offset)
        args = _args(fields)
    except ValueError as e:
        raise FormatError(f"{path}: not a llama2.c model ({e}: {fields})") from None
    need = offset + 4 * _total_floats(blocks)
    if path.stat().st_size != need:
        raise FormatError(f"{path}: {path.stat().st_size} bytes, but its header {fields} needs "
                          f"{need} (truncated or not a llama2.c float32 model)")
    floats = np.memmap(path, dtype="<f4", mode="r", offset=offset)
    views: dict[str, np.ndarray] = {}
    pos = 0
    for kind, shape in blocks:
        n = int(np.prod(shape))
        block = floats[pos : pos + n].reshape(shape)
        pos += n
        if kind in _KIND_NAMES:
            for i in range(args.n_layers):
                views[f"layers.{i}.{_KIND_NAMES[kind]}.weight"] = block[i]
        elif kind in ("tok_embeddings", "norm", "output"):
            views[f"{kind}.weight"] = block
    if shared:
        views["output.weight"] = views["tok_embeddings.weight"]
    specs = {n: TensorSpec(tuple(a.shape), torch.float32) for n, a in views.items()}
    specs = check_specs(specs, args, path)

    def get(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(views[name]))  # a copy: the map is read-only

    tok = Path(tokenizer) if tokenizer is not None else None
    return Checkpoint("llama2c", path, args, specs, get, tok)


# The registry's protocol (model/formats/__init__.py); read only: nothing writes llama2.c.
def detect(path: Path) -> bool:
    return path.is_file() and looks_like_llama2c(path)


def read(path: Path, opts: ReadOptions) -> Checkpoint:
    return read_llama2c(path)  # its tokenizer comes from --tokenizer
