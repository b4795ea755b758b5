"""Merge one or several LoRA adapters (ours or PEFT's) into a base model, and export it.

    python -m model.merge_lora --base_model MODEL --lora_model A[,B,..] \\
        --output_type zhllama|huggingface|pth|gguf --output_dir DIR [--dtype D] [--shards N] \\
        [--tokenizer PATH] [--force_base] [--template NAME]

The adapters are applied in the order given, as Chinese-LLaMA-Alpaca's merge script does
(e.g. `--lora_model chinese-llama-plus-lora,chinese-alpaca-plus-lora`). Before each, the
base's embeddings and output layer take the adapter's vocabulary: an adapter that trained
them (`modules_to_save`) carries them whole and they replace the base's. Each weight
becomes W + (α/r)·B·A, computed in float32, as the output is written — tensor by tensor,
so a 7B merge needs little more memory than the adapters themselves. The tokenizer goes
with the result; an adapter directory's tokenizer.model wins over the base's, and
--tokenizer over both. The SFT template goes with it too: the last one an adapter records
(else the base's) goes into the manifest, or the Hugging Face or GGUF chat template,
unless --template says otherwise. An adapter of ours records the base it was trained on
(parameters, tokenizer hash, a hash of a few tensors) and is refused over another base
unless --force_base. On any error nothing is left at --output_dir.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tokenizer.cli import ArgumentParser, command_errors, positive_int
from tokenizer.files import Inputs, atomic_output_dir, check_output_against_inputs
from tokenizer.spm_io import load_sp
from tokenizer.templates import TEMPLATES

from .adapters import merge_adapter, read_adapter_weights
from .convert import size_option, write
from .formats import find_format, read_checkpoint, write_names
from .source import Checkpoint
from .tensor_io import FormatError, return_freed_memory_promptly

# Every format written, by its name or by the Chinese-LLaMA-Alpaca script's (huggingface, pth).
OUTPUT_TYPES = write_names(aliases=True)


def merge(base_model: str | Path, lora_models: list[str | Path], *,
          tokenizer: str | Path | None = None, force_base: bool = False,
          progress: bool = True) -> Checkpoint:
    """The base checkpoint with every adapter folded in, in order (lazily).

    Args:
        tokenizer: a sentencepiece model to ship with the result instead of the base's or
            an adapter's (a file, or a directory holding tokenizer.model).
        force_base: merge adapters even into a base other than the one they recorded
            (their parameters, tokenizer or weights differ); each is warned about.
    """
    if not lora_models:
        raise ValueError("no adapter to merge: give --lora_model one or more directories")
    ckpt = read_checkpoint(base_model, tokenizer=tokenizer, progress=progress)
    chosen = ckpt.tokenizer if tokenizer is not None else None
    for path in lora_models:
        adapter = read_adapter_weights(path, ckpt.args.n_heads, ckpt.args.kv_heads)
        ckpt = merge_adapter(ckpt, adapter, force_base=force_base)
    if chosen is not None:
        pieces = load_sp(chosen).vocab_size()
        if pieces > ckpt.args.vocab_size:
            raise FormatError(f"{chosen}: {pieces} pieces, but the merged model has "
                              f"{ckpt.args.vocab_size} embedding rows")
        ckpt = ckpt.replace(tokenizer=chosen)
    return ckpt


def output_path(output_dir: Path, output_type: str, dtype: str | None) -> Path:
    """Where the result goes: the directory itself, or for a single-file format (GGUF) its
    file inside it."""
    fmt = find_format(output_type)
    return output_dir if fmt.file_name is None else output_dir / fmt.file_name(dtype)


def write_output(ckpt: Checkpoint, output_dir: str | Path, output_type: str, *,
                 overwrite: bool = False, inputs: Inputs = (), **options: Any) -> Path:
    """Write the merged checkpoint (options: those of `model.convert.write`); returns the path.

    Every writer builds its output under a temporary name and renames it at the end. A
    .gguf goes into --output_dir: an existing directory receives just the file, a new one
    is itself created whole, so a failure leaves no empty directory behind. The output
    may not overlap `inputs` (the base, the adapters, a tokenizer given).
    """
    fmt, out_dir = find_format(output_type), Path(output_dir)
    dst = output_path(out_dir, output_type, options.get("dtype"))
    inputs = (ckpt.path, ckpt.tokenizer, *inputs)
    if fmt.file_name is None or out_dir.is_dir():
        write(ckpt, dst, fmt.name, overwrite=overwrite, inputs=inputs, **options)
    else:
        with atomic_output_dir(out_dir, inputs=inputs) as tmp:
            write(ckpt, tmp / dst.name, fmt.name, inputs=inputs, **options)
    return dst


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m model.merge_lora", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", required=True, help="model directory or any checkpoint "
                   "model.convert reads (Meta, Hugging Face, ...)")
    p.add_argument("--lora_model", required=True,
                   help="adapter directories, comma-separated, applied in this order")
    p.add_argument("--output_type", required=True, choices=sorted(OUTPUT_TYPES))
    p.add_argument("--output_dir", required=True)
    p.add_argument("--tokenizer", help="sentencepiece model (file or directory) to ship with the "
                   "result; overrides the base's and the adapters'")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "f32", "f16", "q8_0"),
                   help="output dtype (default: the base's; GGUF: f16)")
    p.add_argument("--shards", type=positive_int, default=1, help="model-parallel shards for pth")
    p.add_argument("--pad_vocab_to_multiple_of", type=positive_int, metavar="M",
                   help="zero rows so the vocabulary divides by M (pth shards must be equal)")
    p.add_argument("--max_shard_size", type=size_option, default="5GiB",
                   help="largest safetensors file (default 5GiB)")
    p.add_argument("--template", choices=tuple(TEMPLATES),
                   help="huggingface and gguf output: the SFT template the adapters were "
                        "tuned with, written as the chat template (default: the last one an "
                        "adapter, or the base, records)")
    p.add_argument("--force_base", action="store_true",
                   help="merge even if an adapter recorded another base (other parameters, "
                        "tokenizer or weights); sizes must still fit")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    return_freed_memory_promptly()
    adapters = [s.strip() for s in a.lora_model.split(",") if s.strip()]
    with command_errors(output=a.output_dir):
        dst = output_path(Path(a.output_dir), a.output_type, a.dtype)
        inputs = [a.base_model, *adapters, a.tokenizer]
        check_output_against_inputs(dst, inputs)  # --overwrite cannot help with this one
        if dst.exists() and not a.overwrite:  # fail before the (long) merge, not after
            raise FileExistsError(f"{dst} already exists (use --overwrite to replace it)")
        ckpt = merge(a.base_model, adapters, tokenizer=a.tokenizer, force_base=a.force_base,
                     progress=not a.no_progress)
        write_output(ckpt, a.output_dir, a.output_type, overwrite=a.overwrite, dtype=a.dtype,
                     shards=a.shards, pad_vocab_to_multiple_of=a.pad_vocab_to_multiple_of,
                     max_shard_bytes=a.max_shard_size, progress=not a.no_progress, inputs=inputs,
                     template=a.template)
        print(f"wrote {dst}: vocabulary {ckpt.args.vocab_size}, adapters applied in order: "
              f"{', '.join(adapters)}")


if __name__ == "__main__":
    main()
