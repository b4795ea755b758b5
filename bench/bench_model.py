"""Forward+backward step time and peak memory: our LLaMA vs transformers' LlamaForCausalLM.

Same config, same weights, same batch, same loss; each model runs in its own process so
their memory does not mix. Ours runs twice: with whole logits (as transformers does) and
with the chunked loss of `kernels/` (what training uses). Prints all and their ratios.

    python bench/bench_model.py [--dim 512 --n_layers 8 --batch 4 --seq 512 --steps 5]
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import peak_rss_bytes, reset_peak, rss_bytes  # noqa: E402


def _build(which: str, hf_dir: Path):
    from model.formats import read_checkpoint
    from model.source import load_model

    if which.startswith("ours"):
        return load_model(read_checkpoint(hf_dir, progress=False))
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                         attn_implementation="sdpa")


def worker(which: str, hf_dir: Path, batch: int, seq: int, steps: int, vocab: int) -> dict:
    torch.manual_seed(0)
    model = _build(which, hf_dir).train()
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        if which == "ours-chunked":
            loss = model.loss(inputs, targets, chunk_size=1024) / targets.numel()
        else:
            out = model(inputs)
            logits = out if which == "ours" else out.logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: first-call allocations
    base = rss_bytes()
    reset_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "peak_extra_bytes": peak_rss_bytes() - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n_layers", type=int, default=8)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--n_kv_heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each, best kept")
    p.add_argument("--worker", choices=("ours", "ours-chunked", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--hf_dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, Path(a.hf_dir), a.batch, a.seq, a.steps, a.vocab)))
        return

    from model.formats import write_hf
    from model.llama import ModelArgs, build_model
    from model.source import from_state_dict

    args = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                     vocab_size=a.vocab, max_seq_len=max(a.seq, 2048))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args)
        write_hf(from_state_dict(model.state_dict(), args), Path(tmp) / "hf", progress=False)
        del model
        runs: dict[str, list[dict]] = {"ours": [], "ours-chunked": [], "hf": []}
        # Alternate them (ours, chunked, hf, ours, ...) and keep each one's best run, so a
        # slow moment of a noisy machine does not decide the ratio.
        for _ in range(a.repeats):
            for which in runs:
                cmd = [sys.executable, __file__, "--worker", which, "--hf_dir",
                       str(Path(tmp) / "hf"), "--batch", str(a.batch), "--seq", str(a.seq),
                       "--steps", str(a.steps), "--vocab", str(a.vocab)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs[which].append(json.loads(out.strip().splitlines()[-1]))
    best = {which: {"step_s": min(r["step_s"] for r in rs),
                    "peak_extra_bytes": min(r["peak_extra_bytes"] for r in rs)}
            for which, rs in runs.items()}
    hf = best["hf"]
    print(f"config: dim {a.dim}, {a.n_layers} layers, {a.n_heads}/{a.n_kv_heads} heads, vocab "
          f"{a.vocab}, batch {a.batch} x {a.seq}, fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    names = {"ours": "zhllama", "ours-chunked": "zhllama, chunked loss", "hf": "transformers"}
    print(f"{'':24s}{'step (s)':>10s}{'peak extra memory (MB)':>26s}{'time ratio':>12s}{'memory ratio':>14s}")
    for which, r in best.items():
        print(f"{names[which]:24s}{r['step_s']:10.3f}{r['peak_extra_bytes'] / 1e6:26.0f}"
              f"{r['step_s'] / hf['step_s']:11.2f}x{r['peak_extra_bytes'] / hf['peak_extra_bytes']:13.2f}x")


if __name__ == "__main__":
    main()
