"""Peak resident memory of converting a synthetic two-shard Meta checkpoint.

Writes a Meta checkpoint of about --gb gigabytes (bf16, 2 model-parallel shards), then
converts it in a fresh process to Hugging Face, to the canonical directory, and back to
Meta shards, reading the converter's peak resident set each time. Prints the peak as a
fraction of the checkpoint's size, with and without the ~process baseline (Python + torch).

    python bench/bench_convert.py [--gb 1.1] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import peak_rss_bytes, reset_peak, rss_bytes  # noqa: E402

CHILD = """
import json, sys
sys.path.insert(0, {bench!r})
from memory import peak_rss_bytes, reset_peak, rss_bytes
from model.convert import convert
from model.tensor_io import return_freed_memory_promptly
return_freed_memory_promptly()  # as the command line does
base = rss_bytes(); reset_peak()
convert({src!r}, {dst!r}, {to!r}, shards={shards}, progress=False, verify_checksum=False)
print(json.dumps({{"base": base, "peak": peak_rss_bytes()}}))
"""


def make_meta_checkpoint(out: Path, gb: float, n_shards: int = 2) -> int:
    """A random bf16 Meta checkpoint of LLaMA shape (dim 2048) with about `gb` GB."""
    from model.formats.meta import split_dim
    from model.llama import ModelArgs
    from model.source import expected_shapes

    per_layer = (4 * 2048 * 2048 + 3 * 2048 * 5632) * 2
    n_layers = max(1, round((gb * 1e9 - 2 * 32000 * 2048 * 2) / per_layer))
    args = ModelArgs(dim=2048, n_layers=n_layers, n_heads=16, vocab_size=32000)
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for rank in range(n_shards):
        shard = {}
        for name, shape in expected_shapes(args).items():
            shape, dim = list(shape), split_dim(name)
            if dim is not None:
                shape[dim] //= n_shards
            shard[name] = torch.randn(shape, generator=g).to(torch.bfloat16)
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")
        del shard
    (out / "params.json").write_text(json.dumps(args.to_params()))
    return sum(f.stat().st_size for f in out.glob("*.pth"))


def measure(src: Path, dst: Path, to: str, shards: int = 1) -> dict:
    code = CHILD.format(bench=str(Path(__file__).resolve().parent), src=str(src), dst=str(dst),
                        to=to, shards=shards)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.1, help="checkpoint size to synthesise")
    p.add_argument("--workdir", help="where to write (default: a temporary directory)")
    a = p.parse_args()
    tmp = Path(a.workdir or tempfile.mkdtemp(prefix="zhllama-bench-"))
    try:
        size = make_meta_checkpoint(tmp / "meta", a.gb)
        print(f"checkpoint: {size / 1e9:.2f} GB in 2 Meta shards (bf16)")
        print(f"{'conversion':24s}{'peak RSS':>10s}{'/ size':>8s}{'above baseline / size':>24s}")
        steps = [("meta -> hf", tmp / "meta", tmp / "hf", "hf", 1),
                 ("meta -> zhllama", tmp / "meta", tmp / "canon", "zhllama", 1),
                 ("zhllama -> meta (2)", tmp / "canon", tmp / "meta2", "meta", 2)]
        for label, src, dst, to, shards in steps:
            r = measure(src, dst, to, shards)
            print(f"{label:24s}{r['peak'] / 1e9:9.2f}G{r['peak'] / size:8.2f}"
                  f"{(r['peak'] - r['base']) / size:24.2f}")
    finally:
        if not a.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
