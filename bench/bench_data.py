"""Data preparation throughput and packed-block reading speed.

    python bench/bench_data.py --tokenizer TOKENIZER --input corpus.txt [--repeat 8]

1. Tokens/s of `data.prepare` with 1 and 2 workers against bare sentencepiece `encode` of
   the same lines in one process (one thread): the per-worker ratio (goal ≥ 0.85) and the
   scaling from 1 to 2 workers. The corpus is repeated --repeat times so the run is long
   enough to time; process start-up is included in `data.prepare`'s time.
2. Blocks/s of `PackedBlocks` for 512-token blocks at batch 8, with the margin over what a
   training step consumes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm


def bare_encode(tokenizer: str, lines: list[str]) -> tuple[float, int]:
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    t0 = time.perf_counter()
    n = sum(len(ids) + 2 for ids in sp.encode(lines, num_threads=1))
    return time.perf_counter() - t0, n


def prepare(tokenizer: str, corpus: Path, out: Path, workers: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "data.prepare", "--tokenizer", tokenizer, "--input",
                    str(corpus), "--output_dir", str(out), "--num_workers", str(workers),
                    "--chunk_mb", "2", "--overwrite"], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--repeat", type=int, default=8)
    a = p.parse_args()
    from tokenizer.spm_io import resolve_model_file

    tokenizer = str(resolve_model_file(a.tokenizer))
    lines = Path(a.input).read_text(encoding="utf-8").splitlines() * a.repeat
    lines = [l for l in lines if l.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        bare_s, tokens = bare_encode(tokenizer, lines)
        one = prepare(tokenizer, corpus, Path(tmp) / "one", 1)
        two = prepare(tokenizer, corpus, Path(tmp) / "two", 2)
        print(f"corpus: {len(lines):,} lines, {corpus.stat().st_size / 1e6:.1f} MB, {tokens:,} tokens")
        print(f"bare sentencepiece encode, 1 thread: {tokens / bare_s:12,.0f} tokens/s")
        print(f"data.prepare, 1 worker:              {tokens / one:12,.0f} tokens/s  "
              f"({bare_s / one:.2f}x bare, process start-up included)")
        print(f"data.prepare, 2 workers:             {tokens / two:12,.0f} tokens/s  "
              f"({one / two:.2f}x the 1-worker speed; {bare_s / two / 2:.2f}x bare per worker)")
        from data.datasets import PackedBlocks

        blocks = PackedBlocks(Path(tmp) / "one", block_size=512)
        it = blocks.batches(8)
        next(it)
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < 2.0:
            next(it)
            n += 1
        rate = n * 8 / (time.perf_counter() - t0)
        print(f"PackedBlocks, 512-token blocks, batch 8: {rate:,.0f} blocks/s "
              f"({rate * 512:,.0f} tokens/s — a 7B step on 8 GPUs takes ~3k tokens/s per GPU, "
              f"so {rate * 512 / 3000:,.0f}x what one rank consumes)")


if __name__ == "__main__":
    main()
