"""What each memory lever saves on one training step, side by side in one run.

A stage-2-shaped step (LoRA r 8 on all seven projections, tok_embeddings and output
trained in full, fp32) of a small model, through the trainer's own `build_for_stage`,
`train_step` and optimizer, one process per lever (gloo, a process group of one):

- activations: the peak resident memory of a step above the resident memory at its
  start (forward activations, gradients, temporaries), after warm-up steps;
- optimizer state: the bytes of the optimizer's state tensors, counted from the tensors
  (torchao's 8-bit moments as their codes, scales and map);
- the losses of every step (warm-up included) against the plain run's: equal, or the
  largest difference.

The allocator is told to map every block of 64 KB or more on its own
(MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the resident set at once and the
peak follows the live tensors rather than what glibc kept for reuse.

On CPU the "device" is host memory: offloading copies the checkpointed blocks' inputs
from it to itself, so it can only show its cost here; on a GPU those bytes (given in the
last column) leave the device.

    python bench/bench_memory_levers.py [--steps 3] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import peak_rss_bytes, reset_peak, rss_bytes  # noqa: E402

MODEL = dict(dim=256, n_layers=4, n_heads=8, vocab_size=8192)
# (name, activation checkpointing, offload, optimizer)
LEVERS = [
    ("none", "none", False, "adamw"),
    ("full", "full", False, "adamw"),
    ("selective (every 2nd)", "selective", False, "adamw"),
    ("op", "op", False, "adamw"),
    ("full + offload", "full", True, "adamw"),
    ("op + offload", "op", True, "adamw"),
    ("adamw8bit", "none", False, "adamw8bit"),
]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (a DTensor's local shard; a tensor subclass
    as the plain tensors it is made of)."""
    from torch.distributed.tensor import DTensor

    def size(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    return sum(size(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def worker(ac: str, offload: bool, optim: str, batch: int, seq: int, steps: int, work: Path) -> dict:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from model.formats import write_model_dir
    from model.llama import ModelArgs, build_model
    from model.source import from_state_dict
    from train.config import load_config
    from train.distributed import setup
    from train.optim import LossScaler, build_optimizer
    from train.stages import build_for_stage
    from train.trainer import step_options, train_step

    args = ModelArgs(**MODEL, max_seq_len=seq)
    torch.manual_seed(0)
    model = build_model(args)
    write_model_dir(from_state_dict(model.state_dict(), args), work / "m", progress=False)
    del model
    cfg = load_config(None, [
        f"--model.path={work / 'm'}", "--data.path=unused", "--stage=lora", "--lora.r=8", "--lora.alpha=32",
        "--lora.targets=wq,wk,wv,wo,w1,w2,w3", "--lora.modules_to_save=tok_embeddings,output",
        "--parallel.precision=fp32", f"--parallel.activation_checkpointing={ac}",
        f"--parallel.activation_offload={str(offload).lower()}", f"--optim.name={optim}"])
    dist = setup("gloo")
    built = build_for_stage(cfg, dist)
    params = [p for p in built.model.parameters() if p.requires_grad]
    opt = build_optimizer(built.model, cfg.optim)
    tokens = torch.randint(0, args.vocab_size, (batch, seq))
    micro = [{"tokens": tokens, "labels": torch.roll(tokens, -1, 1)}]
    losses = []

    def step() -> None:
        losses.append(train_step(built.model, micro, params, step_options(cfg, built), dist, LossScaler(False))[0])
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: the state exists, torchao has compiled its step
        step()
    peaks, t0 = [], time.perf_counter()
    for _ in range(steps):
        start = rss_bytes()
        reset_peak()
        step()
        peaks.append(peak_rss_bytes() - start)
    elapsed = (time.perf_counter() - t0) / steps
    checkpointed = sum(isinstance(b, CheckpointWrapper) for b in built.model.layers)
    return {"step_peak_mb": max(peaks) / 1e6, "state_mb": state_bytes(opt) / 1e6, "step_s": elapsed,
            "offloaded_mb": checkpointed * batch * seq * args.dim * 4 / 1e6 if offload else 0.0,
            "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        ac, offload, optim = a.worker
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(worker(ac, offload == "1", optim, a.batch, a.seq, a.steps, Path(tmp))))
        return
    m = MODEL
    print(f"stage 2 shape: dim {m['dim']}, {m['n_layers']} layers, vocab {m['vocab_size']:,}, LoRA r 8 on "
          f"seven projections + embeddings/output; batch {a.batch} x {a.seq} tokens, fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"{'lever':22s} {'step peak MB':>12s} {'x none':>7s} {'optim state MB':>14s} {'x none':>7s} "
          f"{'step s':>7s} {'offloaded MB':>12s} {'losses vs none':>14s}")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    base = None
    for name, ac, offload, optim in LEVERS:
        cmd = [sys.executable, __file__, "--worker", ac, str(int(offload)), optim, "--steps", str(a.steps),
               "--batch", str(a.batch), "--seq", str(a.seq)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"{name:22s} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        base = base or r
        diff = max(abs(x - y) for x, y in zip(r["losses"], base["losses"]))
        print(f"{name:22s} {r['step_peak_mb']:12.1f} {r['step_peak_mb'] / base['step_peak_mb']:6.2f}x "
              f"{r['state_mb']:14.1f} {r['state_mb'] / base['state_mb']:6.2f}x {r['step_s']:7.2f} "
              f"{r['offloaded_mb']:12.1f} {'equal' if diff == 0 else f'{diff:.1e}':>14s}")


if __name__ == "__main__":
    main()
