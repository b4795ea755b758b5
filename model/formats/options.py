"""What every format's `read` and `write` take: the options of the commands, as typed.

A format uses the options that apply to it and refuses, in the command's words, those it
cannot honour; the helpers here are the refusals and preparations the tensor-storing
formats (zhllama, Hugging Face, Meta) share.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tokenizer.files import Inputs

from ..source import Checkpoint, pad_vocab, with_dtype
from ..tensor_io import parse_dtype


@dataclass(frozen=True)
class ReadOptions:
    """How to read a checkpoint."""

    verify_checksum: bool = True  # Meta's checklist.chk md5 sums, when there is one
    progress: bool = True


@dataclass(frozen=True)
class WriteOptions:
    """How to write a checkpoint: `--dtype`, `--shards`, … as the user gave them.

    Attributes:
        dtype: as typed (float16, f16, q8_0, …); None keeps the source's dtypes (GGUF: f16).
        shards: model-parallel shards (Meta's layout only).
        pad_vocab_to_multiple_of: zero rows so the vocabulary divides by this.
        max_shard_bytes: the largest safetensors file before splitting.
        template: the SFT template written as a chat template (formats that carry one);
            None: the one the checkpoint records, if any.
        overwrite: replace an existing output.
        progress: show progress bars.
        inputs: paths the checkpoint was made from besides its own path and tokenizer,
            which the output may not overlap either.
    """

    dtype: str | None = None
    shards: int = 1
    pad_vocab_to_multiple_of: int | None = None
    max_shard_bytes: int = 5 << 30
    template: str | None = None
    overwrite: bool = False
    progress: bool = True
    inputs: Inputs = ()


def refuse_shards(opts: WriteOptions) -> None:
    """For formats that split by file size, not by model-parallel rank."""
    if opts.shards != 1:
        raise ValueError("--shards applies to --to meta; use --max_shard_size for safetensors")


def tensors_as_asked(ckpt: Checkpoint, opts: WriteOptions) -> Checkpoint:
    """The checkpoint cast to `--dtype` and padded, for formats that store torch dtypes
    (q8_0 is GGUF's alone); warns when no tokenizer will go with it."""
    if opts.dtype == "q8_0":
        raise ValueError("--dtype q8_0 is only for --to gguf")
    ckpt = pad_vocab(with_dtype(ckpt, parse_dtype(opts.dtype)), opts.pad_vocab_to_multiple_of)
    if ckpt.tokenizer is None:
        print(f"warning: no tokenizer.model found for {ckpt.path}; pass --tokenizer to include one",
              file=sys.stderr)
    return ckpt
