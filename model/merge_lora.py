"""Merge one or several LoRA adapters (ours or PEFT's) into a base model, and export it.

    python -m model.merge_lora --base_model MODEL --lora_model A[,B,..] \\
        --output_type zhllama|huggingface|pth|gguf --output_dir DIR [--dtype D] [--shards N]

The adapters are applied in the order given, as Chinese-LLaMA-Alpaca's merge script does
(e.g. `--lora_model chinese-llama-plus-lora,chinese-alpaca-plus-lora`). Before each, the
base's embeddings and output layer take the adapter's vocabulary: an adapter that trained
them (`modules_to_save`) carries them whole and they replace the base's. Each weight
becomes W + (α/r)·B·A, computed in float32, as the output is written — tensor by tensor,
so a 7B merge needs little more memory than the adapters themselves. The tokenizer goes
with the result; an adapter directory's tokenizer.model wins over the base's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .adapters import merge_adapter, read_adapter_weights
from .checkpoint import Checkpoint
from .convert import parse_size, write
from .formats import read_checkpoint
from .tensor_io import FormatError, return_freed_memory_promptly

OUTPUT_TYPES = {"zhllama": "zhllama", "huggingface": "hf", "hf": "hf", "pth": "meta",
                "meta": "meta", "gguf": "gguf"}


def merge(base_model: str | Path, lora_models: list[str | Path], *, progress: bool = True) -> Checkpoint:
    """The base checkpoint with every adapter folded in, in order (lazily)."""
    ckpt = read_checkpoint(base_model, progress=progress)
    for path in lora_models:
        adapter = read_adapter_weights(path, ckpt.args.n_heads, ckpt.args.kv_heads)
        ckpt = merge_adapter(ckpt, adapter)
    return ckpt


def output_path(output_dir: Path, output_type: str, dtype: str | None) -> Path:
    """Where the result goes: the directory itself, or a .gguf file inside it."""
    if OUTPUT_TYPES[output_type] == "gguf":
        return output_dir / f"model-{dtype or 'f16'}.gguf"
    return output_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.merge_lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", required=True, help="model directory or any checkpoint "
                   "model.convert reads (Meta, Hugging Face, ...)")
    p.add_argument("--lora_model", required=True,
                   help="adapter directories, comma-separated, applied in this order")
    p.add_argument("--output_type", required=True, choices=sorted(OUTPUT_TYPES))
    p.add_argument("--output_dir", required=True)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "f32", "f16", "q8_0"),
                   help="output dtype (default: the base's; GGUF: f16)")
    p.add_argument("--shards", type=int, default=1, help="model-parallel shards for pth")
    p.add_argument("--pad_vocab_to_multiple_of", type=int, metavar="M",
                   help="zero rows so the vocabulary divides by M (pth shards must be equal)")
    p.add_argument("--max_shard_size", default="5GiB", help="largest safetensors file (default 5GiB)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    return_freed_memory_promptly()
    out_dir = Path(a.output_dir)
    dst = output_path(out_dir, a.output_type, a.dtype)
    try:
        if OUTPUT_TYPES[a.output_type] == "gguf":
            out_dir.mkdir(parents=True, exist_ok=True)
        elif out_dir.exists() and not a.overwrite:
            raise FileExistsError(f"{out_dir} already exists (use --overwrite to replace it)")
        ckpt = merge(a.base_model, [s for s in a.lora_model.split(",") if s],
                     progress=not a.no_progress)
        write(ckpt, dst, OUTPUT_TYPES[a.output_type], dtype=a.dtype, shards=a.shards,
              pad_vocab_to_multiple_of=a.pad_vocab_to_multiple_of,
              max_shard_bytes=parse_size(a.max_shard_size), overwrite=a.overwrite,
              progress=not a.no_progress)
    except (FormatError, FileExistsError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {dst}: vocabulary {ckpt.args.vocab_size}, adapters applied in order: {a.lora_model}")


if __name__ == "__main__":
    main()
