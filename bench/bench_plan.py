"""The memory planner's prediction against the measured peak of the real step, side by side.

For small configs of each stage (with and without activation checkpointing, QLoRA, packed
documents, two FSDP ranks), each in its own process: `zhllama plan CFG --device cpu
--measure --json` plans the step on fake tensors, then builds the model from its
checkpoint and runs two real `train_step`s + optimizer steps, measuring the second (the
CPU allocator's peak, from torch's profiler; see train/plan_trace.py). Prints a Markdown
table.

    python bench/bench_plan.py [--dim 256] [--layers 8] [--vocab 8000] [--seq 256]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

# name: (stage, checkpointing, sections, processes)
CONFIGS = {
    "stage 1, new rows": ("embeddings", "none", dict(model={"new_rows_from": 4000}), 1),
    "stage 1, checkpointed": ("embeddings", "full", {}, 1),
    "stage 2 (LoRA + vocabulary), bf16": ("lora", "full", dict(model={"dtype": "bfloat16"},
                                                               parallel={"precision": "bf16"}), 1),
    "stage 2, none": ("lora", "none", {}, 1),
    "stage 2, op + document masks": ("lora", "op", dict(data={"document_mask": True}), 1),
    "stage 2, selective, grad_accum 2": ("lora", "selective", dict(optim={"grad_accum": 2}), 1),
    "stage 2 QLoRA, bf16": ("lora", "full", dict(model={"dtype": "bfloat16", "quantize": "nf4"},
                                                  parallel={"precision": "bf16"}), 1),
    "full": ("full", "none", {}, 1),
    "full, checkpointed": ("full", "full", {}, 1),
    "stage 2, 2 ranks (FSDP)": ("lora", "full", {}, 2),
}


def write_model(root: Path, dim: int, layers: int, vocab: int, seq: int, heads: int | None) -> Path:
    from model.formats import write_model_dir
    from model.llama import named_args, build_model
    from model.source import from_state_dict

    args = named_args("tiny", dim=dim, n_layers=layers, n_heads=heads or dim // 64, vocab_size=vocab,
                      max_seq_len=seq)
    model = build_model(args)
    return write_model_dir(from_state_dict(model.state_dict(), args), root / "base", progress=False)


def config_file(root: Path, base: Path, name: str, seq: int) -> Path:
    stage, ac, sections, _ = CONFIGS[name]
    data: dict = {"stage": stage, "model": {"path": str(base)},
                  "data": {"path": str(root / "no-data"), "block_size": seq},
                  "optim": {"micro_batch_size": 4}, "lora": {"dropout": 0.0},
                  "parallel": {"precision": "fp32", "activation_checkpointing": ac, "loss_chunk_size": 512}}
    for key, values in sections.items():
        data[key] = {**data.get(key, {}), **values}
    path = root / f"{len(list(root.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def plan_and_measure(cfg: Path, processes: int, device: str = "cpu") -> dict:
    cmd = [sys.executable, "-m", "train.plan", str(cfg), "--device", device, "--measure", "--json"]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "train.plan", *cmd[3:]]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--heads", type=int, help="attention heads (default: dim / 64; LLaMA-7B: 32 of 128)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the real step runs (cuda: measured by torch.cuda.max_memory_allocated)")
    p.add_argument("--only", action="append", choices=list(CONFIGS), metavar="CONFIG",
                   help="plan and measure only these configs (repeatable; default: all)")
    a = p.parse_args()
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = write_model(root, a.dim, a.layers, a.vocab, a.seq, a.heads)
        print(f"dim {a.dim}, {a.layers} layers, vocab {a.vocab:,}, micro-batch 4 × {a.seq}, fp32 unless "
              f"said, loss chunks of 512; {datetime.date.today()}, "
              f"{'a CUDA GPU' if a.device == 'cuda' else f'{os.cpu_count()} CPU cores'}\n")
        print("| config | peak in | planned (MiB) | measured (MiB) | planned ÷ measured | plan + measure (s) |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for name in a.only or CONFIGS:
            t0 = time.perf_counter()
            out = plan_and_measure(config_file(root, base, name, a.seq), CONFIGS[name][3], a.device)
            seconds = time.perf_counter() - t0
            print(f"| {name} | {out['peak_phase']} | {out['total'] / mib:,.1f} | {out['measured'] / mib:,.1f} | "
                  f"{out['total'] / out['measured']:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
