"""QLoRA vs bf16 vs fp32 frozen weights: their memory and the stage-2 step time, side by side.

The same random base, batch and stage-2 step (LoRA r 8 on the seven projections,
embeddings and output trained, full activation checkpointing) through zhllama's own
trainer path — `build_for_stage` and `train_step` — three ways:

- fp32: frozen weights stored float32, computed in fp32;
- bf16: frozen weights stored bfloat16, computed in bf16;
- nf4: the blocks' frozen projections stored as NF4 (`model.quantize: nf4`, from the bf16
  weights), dequantized per call, computed in bf16.

Each runs in its own process (clean peak-memory figures). Printed per way: the frozen
weights' bytes (all of them: NF4's codes, scales and tables, and the norms) and their
ratio to bf16, the median step time, the process's peak memory (CUDA's peak allocated,
or the peak resident set on CPU) and the first step's loss (NF4's differs a little: its
weights are not the same numbers).

    python bench/bench_qlora.py                         # 7B-shaped width 1024, on CPU
    python bench/bench_qlora.py --layers 32 --dim 4096 --vocab 49954 --batch 4 --seq 512 --device cuda  # 7B
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import peak_rss_bytes, reset_peak as reset_rss_peak  # noqa: E402

WAYS = {  # name: (model.dtype, model.quantize, parallel.precision)
    "fp32": ("float32", "none", "fp32"),
    "bf16": ("bfloat16", "none", "bf16"),
    "nf4": ("bfloat16", "nf4", "bf16"),
}


def random_state(args, seed: int) -> dict[str, torch.Tensor]:
    """Random base weights (float32), the same for every way."""
    from model.llama import build_model

    torch.manual_seed(seed)
    model = build_model(args, init=False)
    model.to_empty(device="cpu")
    model.init_weights()
    return model.state_dict()


def frozen_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's frozen parameters (a sharded one by its local part)."""
    from torch.distributed.tensor import DTensor

    from model.quant import tensor_bytes

    return sum(tensor_bytes(p.to_local() if isinstance(p, DTensor) else p)
               for p in model.parameters() if not p.requires_grad)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_rss_peak()


def model_args(a: argparse.Namespace):
    from model.llama import named_args

    return named_args(a.size, dim=a.dim, n_layers=a.layers, n_heads=a.dim // 128,
                      vocab_size=a.vocab, max_seq_len=max(a.seq, 512))


def write_base(a: argparse.Namespace, out: Path) -> None:
    """The random base every way loads (float32 on disk, as a converted checkpoint)."""
    from model.formats import write_model_dir
    from model.source import from_state_dict

    args = model_args(a)
    write_model_dir(from_state_dict(random_state(args, seed=0), args), out, progress=False)


def run_way(a: argparse.Namespace, way: str) -> dict:
    """One way's figures (in its own process, loading the base at a.base)."""
    from train.config import load_config
    from train.distributed import setup
    from train.optim import LossScaler, build_optimizer
    from train.stages import build_for_stage
    from train.trainer import step_options, train_step

    dtype, quantize, precision = WAYS[way]
    cfg = load_config(None, [
        f"--model.path={a.base}", "--data.path=unused", "--stage=lora",
        f"--model.dtype={dtype}", f"--model.quantize={quantize}",
        f"--parallel.precision={precision}", "--parallel.activation_checkpointing=full",
        "--parallel.loss_chunk_size=4096", "--lora.dropout=0.0"])
    dist = setup("auto" if a.device == "cuda" else "gloo")
    built = build_for_stage(cfg, dist)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(dist.device)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    params = [p for p in built.model.parameters() if p.requires_grad]
    opt = build_optimizer(built.model, cfg.optim)
    micro, opts, losses = [{"tokens": tokens, "labels": labels}], step_options(cfg, built), []

    def step() -> None:
        losses.append(train_step(built.model, micro, params, opts, dist, LossScaler(False))[0])
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (and the optimizer's state allocated)
    reset_peak(dist.device)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"frozen_bytes": frozen_bytes(built.model), "step_s": statistics.median(times),
            "peak_bytes": peak_memory(dist.device), "first_loss": losses[0]}


def report(a: argparse.Namespace, results: dict[str, dict]) -> None:
    print(f"stage 2 step: {a.size}-shaped, dim {a.dim}, {a.layers} layers, vocab {a.vocab}, "
          f"batch {a.batch} x {a.seq}, LoRA r 8 on 7 projections + embeddings/output, "
          f"full activation checkpointing, {a.device}, torch {torch.__version__}")
    print(f"{'frozen weights':16s}{'frozen MB':>10s}{'vs bf16':>9s}{'step (s)':>10s}"
          f"{'tokens/s':>10s}{'peak MB':>9s}{'1st loss':>10s}")
    bf16 = results["bf16"]["frozen_bytes"]
    for way, r in results.items():
        print(f"{way:16s}{r['frozen_bytes'] / 1e6:10.1f}{r['frozen_bytes'] / bf16:9.3f}"
              f"{r['step_s']:10.3f}{a.batch * a.seq / r['step_s']:10.0f}"
              f"{r['peak_bytes'] / 1e6:9.0f}{r['first_loss']:10.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="llama-7b", help="the named size whose shape rules apply")
    p.add_argument("--dim", type=int, default=1024, help="model width (heads of 128, as 7B's)")
    p.add_argument("--layers", type=int, default=4)
    # the frozen projections outweigh 7B's embeddings and output 16 to 1: a small
    # vocabulary keeps them the larger part here too (3 to 1 at the defaults)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", choices=tuple(WAYS), help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker is not None:
        print(json.dumps(run_way(a, a.worker)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_base(a, Path(tmp) / "base")
        for way in WAYS:  # each in its own process: clean memory statistics
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", way,
                                  "--base", str(Path(tmp) / "base")], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{way} failed:\n{out.stderr[-3000:]}")
            results[way] = json.loads(out.stdout.strip().splitlines()[-1])
    report(a, results)


if __name__ == "__main__":
    main()
