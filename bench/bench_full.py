"""Full training of a ~1B-shaped LLaMA through the trainer's own step, with and without
torch.compile: tokens/s, peak memory and MFU against the bf16 matmul rate this GPU reaches,
measured in the same run.

    python bench/bench_full.py                 # GPU: dim 2048, 16 layers, vocab 32,000, bf16
    python bench/bench_full.py --smoke         # CPU, toy size, fp32, no compile (CI)

The step is train/trainer.py's `train_step` + AdamW on a model built by train/stages.py
(stage full, FSDP2 over a group of one, chunked loss): what `zhllama pretrain` runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int = 20) -> float:
    """FLOP/s of a large square matmul: the denominator of MFU."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def one_setting(args_kw: dict, compile_: bool, a: argparse.Namespace, device: torch.device,
                work: Path, dist) -> dict:
    from model.formats import write_model_dir
    from model.llama import ModelArgs, build_model
    from model.source import from_state_dict
    from train.config import load_config
    from train.metrics import flops_per_token
    from train.optim import LossScaler, build_optimizer
    from train.stages import build_for_stage
    from train.trainer import step_options, train_step

    args = ModelArgs(**args_kw, max_seq_len=a.seq)
    if not (work / "m").exists():
        torch.manual_seed(0)
        model = build_model(args)
        write_model_dir(from_state_dict(model.state_dict(), args), work / "m", progress=False)
        del model
    precision = "fp32" if device.type == "cpu" else "bf16"
    cfg = load_config(None, [f"--model.path={work / 'm'}", "--data.path=unused", "--stage=full",
                             f"--parallel.precision={precision}", f"--parallel.compile={str(compile_).lower()}",
                             "--parallel.activation_checkpointing=none", "--parallel.loss_chunk_size=4096"])
    built = build_for_stage(cfg, dist)
    params = [p for p in built.model.parameters() if p.requires_grad]
    opt = build_optimizer(built.model, cfg.optim)
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq))
    micro = [{"tokens": tokens, "labels": torch.roll(tokens, -1, 1)}]

    def step() -> None:
        train_step(built.model, micro, params, step_options(cfg, built), dist, LossScaler(False))
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up, and compilation
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    n_params = sum(p.numel() for p in built.model.parameters())
    fpt = flops_per_token(built.model, a.seq)
    del built, opt, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"params": n_params, "tokens_per_s": a.batch * a.seq / seconds, "peak": peak,
            "flops_per_s": fpt * a.batch * a.seq / seconds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy size on the CPU (CI)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args(argv)
    from train.distributed import setup, teardown

    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    if device.type == "cuda":
        shape = dict(dim=2048, n_layers=16, n_heads=16, vocab_size=32000)
        compiles = (False, True)
        peak = matmul_peak(device, torch.bfloat16, 8192)
    else:
        shape = dict(dim=64, n_layers=2, n_heads=4, vocab_size=512)
        a.batch, a.seq, a.steps = 2, 64, 2
        compiles = (False,)
        peak = matmul_peak(device, torch.float32, 512)
    dist = setup("auto" if device.type == "cuda" else "gloo")
    print(f"{device.type}: full training, dim {shape['dim']}, {shape['n_layers']} layers, vocab "
          f"{shape['vocab_size']:,}, batch {a.batch} × {a.seq}; MFU against {peak / 1e9:,.0f} GFLOP/s "
          f"(a {'bf16' if device.type == 'cuda' else 'fp32'} matmul, measured now)")
    print("| compile | params | tokens/s | peak memory (GB) | MFU |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for c in compiles:
            r = one_setting(shape, c, a, device, Path(tmp), dist)
            print(f"| {'yes' if c else 'no'} | {r['params'] / 1e9:.2f} B | {r['tokens_per_s']:,.0f} | "
                  f"{r['peak'] / 1e9:.1f} | {r['flops_per_s'] / peak:.1%} |", flush=True)
    teardown()


if __name__ == "__main__":
    main()
