"""Training throughput, peak memory and MFU of the real training step on this machine.

For each model size (the tiny test size and a ~4M-parameter one) and each setting
(activation checkpointing on/off, chunked loss on/off), runs the trainer's own
`train_step` + AdamW for a few steps in a process group of one and reports tokens/s, the
peak resident memory above the loaded model, and MFU against the matmul FLOP/s this
machine actually reaches (measured in the same run; on a GPU pass --peak_tflops instead).

    python bench/bench_train.py [--steps 5] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import peak_rss_bytes, reset_peak, rss_bytes  # noqa: E402

SIZES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, vocab_size=512),
    "4M": dict(dim=256, n_layers=4, n_heads=8, vocab_size=1000),
}
SETTINGS = [("none", 0), ("full", 0), ("none", 1024), ("full", 1024)]


def matmul_peak_flops(n: int = 1024, reps: int = 10) -> float:
    """FLOP/s of a large fp32 matmul: the best this machine does, the denominator of MFU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def worker(size: str, ac: str, chunk: int, batch: int, seq: int, steps: int, work: Path) -> dict:
    from model.formats import write_model_dir
    from model.llama import ModelArgs, build_model
    from model.source import from_state_dict
    from train.config import load_config
    from train.distributed import setup
    from train.optim import LossScaler, build_optimizer
    from train.metrics import flops_per_token
    from train.stages import build_for_stage
    from train.trainer import step_options, train_step

    args = ModelArgs(**SIZES[size], max_seq_len=seq)
    torch.manual_seed(0)
    model = build_model(args)
    write_model_dir(from_state_dict(model.state_dict(), args), work / "m", progress=False)
    del model
    cfg = load_config(None, [f"--model.path={work / 'm'}", "--data.path=unused", "--stage=full",
                             "--parallel.precision=fp32", f"--parallel.activation_checkpointing={ac}",
                             f"--parallel.loss_chunk_size={chunk}"])
    dist = setup("gloo")
    built = build_for_stage(cfg, dist)
    params = [p for p in built.model.parameters() if p.requires_grad]
    opt = build_optimizer(built.model, cfg.optim)
    tokens = torch.randint(0, args.vocab_size, (batch, seq))
    micro = [{"tokens": tokens, "labels": torch.roll(tokens, -1, 1)}]

    def step() -> None:
        train_step(built.model, micro, params, step_options(cfg, built), dist, LossScaler(False))
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    base = rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = (time.perf_counter() - t0) / steps
    fpt = flops_per_token(built.model, seq)
    return {"tokens_per_s": batch * seq / elapsed, "step_s": elapsed,
            "peak_extra_mb": (peak_rss_bytes() - base) / 1e6, "flops_per_s": fpt * batch * seq / elapsed,
            "params": sum(p.numel() for p in built.model.parameters())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--peak_tflops", type=float, help="device peak; default: measured fp32 matmul")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        size, ac, chunk = a.worker
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(worker(size, ac, int(chunk), a.batch, a.seq, a.steps, Path(tmp))))
        return
    peak = a.peak_tflops * 1e12 if a.peak_tflops else matmul_peak_flops()
    print(f"batch {a.batch} x {a.seq} tokens, fp32, {torch.get_num_threads()} threads; MFU against "
          f"{peak / 1e9:.1f} GFLOP/s ({'given' if a.peak_tflops else 'measured fp32 matmul'})")
    print(f"{'model':6s} {'params':>8s} {'act. ckpt':>9s} {'loss':>8s} {'tokens/s':>9s} "
          f"{'peak extra MB':>13s} {'MFU':>6s}")
    for size in SIZES:
        for ac, chunk in SETTINGS:
            cmd = [sys.executable, __file__, "--worker", size, ac, str(chunk), "--steps",
                   str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq)]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True)
                           .stdout.strip().splitlines()[-1])
            loss = f"chunk{chunk}" if chunk else "whole"
            print(f"{size:6s} {r['params'] / 1e6:7.2f}M {ac:>9s} {loss:>8s} {r['tokens_per_s']:9.0f} "
                  f"{r['peak_extra_mb']:13.0f} {r['flops_per_s'] / peak:6.1%}")


if __name__ == "__main__":
    main()
