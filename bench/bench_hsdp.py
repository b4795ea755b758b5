"""HSDP vs FSDP: the trainer's own step on 2 processes, both meshes side by side in one run.

FSDP (parallel.replicate 1) shards every parameter over both ranks: each block's weights
are all-gathered before its forward and backward and its gradients reduce-scattered.
HSDP with replicate 2 on 2 ranks makes shard groups of one: every rank keeps whole
weights and the gradients are all-reduced, as DDP does. On N nodes × 8 GPUs,
replicate N shards within a node and replicates across nodes; 2 CPU processes can only
show the two ends of that range.

    python bench/bench_hsdp.py [--steps 5] [--batch 4] [--seq 256] [--size 4M]

It starts `torchrun --standalone --nproc_per_node 2` on itself; each rank builds the
model once per mesh (stage full and stage lora, fp32), runs the real `train_step` +
AdamW, and rank 0 prints the median step time and what each rank holds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SIZES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, vocab_size=512),
    "4M": dict(dim=256, n_layers=4, n_heads=8, vocab_size=1000),
}


def local_mb(model: torch.nn.Module, trainable_only: bool) -> float:
    """MB of parameters this rank holds (its shards), of every one or only the trained."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total / 1e6


def measure(model_dir: Path, stage: str, replicate: int, a: argparse.Namespace) -> dict:
    """Median step time and per-rank state of one (stage, mesh) on this process group."""
    from train.config import load_config
    from train.distributed import setup
    from train.optim import LossScaler, build_optimizer
    from train.stages import build_for_stage
    from train.trainer import step_options, train_step

    cfg = load_config(None, [f"--model.path={model_dir}", "--data.path=unused", f"--stage={stage}",
                             "--parallel.precision=fp32", "--lora.dropout=0.0",
                             f"--parallel.replicate={replicate}"])
    dist = setup("gloo", replicate)  # the process group once; a mesh each time
    built = build_for_stage(cfg, dist)
    params = [p for p in built.model.parameters() if p.requires_grad]
    opt = build_optimizer(built.model, cfg.optim, built.stage.no_decay)
    g = torch.Generator().manual_seed(dist.rank)
    tokens = torch.randint(0, built.base.args.vocab_size, (a.batch, a.seq), generator=g)
    micro = [{"tokens": tokens, "labels": torch.roll(tokens, -1, 1)}]

    def step() -> None:
        train_step(built.model, micro, params, step_options(cfg, built), dist, LossScaler(False))
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: the optimizer's state, the first gathers
    times = []
    for _ in range(a.steps):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    # AdamW keeps two fp32 moments per trained element, sharded like the parameter
    return {"step_s": statistics.median(times), "params_mb": local_mb(built.model, False),
            "adam_mb": 2 * local_mb(built.model, True)}


def worker(a: argparse.Namespace) -> None:
    rows = []
    for stage in ("full", "lora"):
        for replicate, name in ((1, "FSDP"), (2, "HSDP (replicate 2)")):
            rows.append((stage, name, measure(Path(a.worker), stage, replicate, a)))
    if torch.distributed.get_rank() != 0:
        return
    print(f"2 processes (gloo, 1 thread each), batch {a.batch} x {a.seq} tokens per rank, fp32, "
          f"model {a.size}")
    print(f"{'stage':5s} {'mesh':19s} {'step (s)':>8s} {'÷ FSDP':>7s} {'params/rank MB':>14s} "
          f"{'AdamW/rank MB':>13s}")
    for stage, name, r in rows:
        fsdp = next(x for s, n, x in rows if s == stage and n == "FSDP")
        print(f"{stage:5s} {name:19s} {r['step_s']:8.3f} {r['step_s'] / fsdp['step_s']:6.2f}x "
              f"{r['params_mb']:14.1f} {r['adam_mb']:13.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--size", choices=SIZES, default="4M")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # the model directory, under torchrun
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    from model.formats import write_model_dir
    from model.llama import ModelArgs, build_model
    from model.source import from_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        args = ModelArgs(**SIZES[a.size], max_seq_len=a.seq)
        torch.manual_seed(0)
        model = build_model(args)
        write_model_dir(from_state_dict(model.state_dict(), args), Path(tmp) / "m", progress=False)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, "--worker", str(Path(tmp) / "m"), "--steps", str(a.steps), "--batch",
               str(a.batch), "--seq", str(a.seq), "--size", a.size]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
