"""Convert LLaMA checkpoints between formats, streaming tensor by tensor.

    python -m model.convert SRC DST --to zhllama|hf|meta|gguf [--tokenizer PATH] [--dtype D]
        [--shards N] [--pad_vocab_to_multiple_of M] [--max_shard_size 5GB] [--overwrite]
        [--template NAME]   # --to hf or gguf: the SFT template, as the chat_template
                            # (default: the one the model directory records)
    python -m model.convert SRC OUT.gguf --to gguf [--dtype f32|f16|q8_0]   # for llama.cpp

SRC is detected: a Meta directory (consolidated.NN.pth + params.json), a Hugging Face
directory (config.json + safetensors or pytorch_model*.bin), a zhllama model directory,
or a llama2.c .bin file (give its sentencepiece model with --tokenizer).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tokenizer.cli import ArgumentParser, command_errors, positive_int
from tokenizer.files import Inputs, check_output_against_inputs
from tokenizer.templates import TEMPLATES

from .formats import FORMATS, WriteOptions, find_format, read_checkpoint, write_checkpoint, write_names
from .source import Checkpoint, check_tokenizer_rows
from .tensor_io import return_freed_memory_promptly

TARGETS = write_names()


def parse_size(text: str) -> int:
    """'5GB' → 5·10⁹, '2GiB' → 2·2³⁰, '500MB', '1024' (bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {text!r} (try 5GB, 500MB or 2GiB)")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


def size_option(text: str) -> int:
    """`parse_size` for argparse: a positive size, or an error naming the option."""
    try:
        size = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return size


def convert(
    src: str | Path,
    dst: str | Path,
    to: str,
    *,
    tokenizer: str | Path | None = None,
    dtype: str | None = None,
    shards: int = 1,
    pad_vocab_to_multiple_of: int | None = None,
    max_shard_bytes: int = 5 << 30,
    verify_checksum: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    template: str | None = None,
) -> Checkpoint:
    """Read SRC (any format), write DST in format `to`; returns the checkpoint written.

    `template`: for `hf` and `gguf`, the SFT template written as the chat template (the
    tokenizer files' `chat_template`, GGUF's `tokenizer.chat_template`); None: the one SRC
    records, if any.
    """
    if to not in TARGETS:
        raise ValueError(f"unknown target format {to!r}; choose from {', '.join(TARGETS)}")
    dst = Path(dst)
    check_output_against_inputs(dst, (src, tokenizer))  # first: --overwrite cannot help here
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (use --overwrite to replace it)")
    ckpt = read_checkpoint(src, tokenizer=tokenizer, verify_checksum=verify_checksum,
                           progress=progress)
    if note := check_tokenizer_rows(ckpt):
        print(note, file=sys.stderr)
    return write(ckpt, dst, to, dtype=dtype, shards=shards,
                 pad_vocab_to_multiple_of=pad_vocab_to_multiple_of,
                 max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress,
                 inputs=(src, tokenizer), template=template)


def write(
    ckpt: Checkpoint,
    dst: str | Path,
    to: str,
    *,
    dtype: str | None = None,
    shards: int = 1,
    pad_vocab_to_multiple_of: int | None = None,
    max_shard_bytes: int = 5 << 30,
    overwrite: bool = False,
    progress: bool = True,
    inputs: Inputs = (),
    template: str | None = None,
) -> Checkpoint:
    """Write an open checkpoint in format `to` (the second half of `convert`).

    `inputs`: paths it was made from besides its own path and tokenizer, which `dst` may
    not overlap either. `template`: see `convert`.
    """
    fmt = find_format(to)
    if template is not None and not fmt.chat_template:
        takes = " or ".join(f.title for f in FORMATS if f.chat_template)
        raise ValueError(f"--template: a chat template goes into {takes} output only, not {to}")
    if template is not None and ckpt.tokenizer is None:
        raise ValueError("--template: no tokenizer to write the chat template for; pass --tokenizer")
    if template is not None and ckpt.template not in (None, template):
        print(f"note: --template {template} instead of {ckpt.template}, which the model records",
              file=sys.stderr)
    opts = WriteOptions(dtype=dtype, shards=shards, pad_vocab_to_multiple_of=pad_vocab_to_multiple_of,
                        max_shard_bytes=max_shard_bytes, template=template, overwrite=overwrite,
                        progress=progress, inputs=inputs)
    return write_checkpoint(ckpt, dst, fmt.name, opts)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m model.convert", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="checkpoint to read (format detected)")
    p.add_argument("dst", help="directory (or .gguf file) to write; must not exist unless --overwrite")
    p.add_argument("--to", required=True, choices=TARGETS, help="format to write")
    p.add_argument("--tokenizer", help="sentencepiece model (file or directory) to carry along; "
                   "overrides one found beside SRC")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "f32", "f16", "q8_0"),
                   help="cast floating tensors (default: keep the source's dtypes; for GGUF f16); "
                        "q8_0 is for GGUF only")
    p.add_argument("--shards", type=positive_int, default=1,
                   help="model-parallel shards for --to meta (default 1)")
    p.add_argument("--pad_vocab_to_multiple_of", type=positive_int, metavar="M",
                   help="add zero rows so the vocabulary divides by M (Meta shards must be equal)")
    p.add_argument("--max_shard_size", type=size_option, default="5GiB",
                   help="largest safetensors file before splitting, e.g. 2GB (default 5GiB)")
    p.add_argument("--skip_checksum", action="store_true",
                   help="do not verify Meta's checklist.chk md5 sums")
    p.add_argument("--template", choices=tuple(TEMPLATES),
                   help="--to hf: the SFT template the model was tuned with, written as the "
                        "tokenizer's chat_template (default: the one SRC records, if any)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    return_freed_memory_promptly()
    with command_errors(output=a.dst):
        ckpt = convert(
            a.src, a.dst, a.to, tokenizer=a.tokenizer, dtype=a.dtype, shards=a.shards,
            pad_vocab_to_multiple_of=a.pad_vocab_to_multiple_of,
            max_shard_bytes=a.max_shard_size, verify_checksum=not a.skip_checksum,
            overwrite=a.overwrite, progress=not a.no_progress, template=a.template,
        )
        print(f"wrote {a.dst} ({a.to}, {ckpt.format} source, {ckpt.nbytes / 1e6:.1f} MB, "
              f"vocab {ckpt.args.vocab_size})")


if __name__ == "__main__":
    main()
