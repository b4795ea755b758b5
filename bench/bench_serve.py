"""Throughput of `model.serve` on a small model: requests/s and tokens/s at concurrency 1, 4
and 16, batched (waves of up to 16 sequences) against one at a time (--max_batch_size 1),
measured side by side in one run.

Two servers are started on loopback with the same model (stories260K, converted from the
shared test material, or --model DIR); each concurrency level sends --requests
completions (greedy, --max_tokens new tokens each, the same prompts to both servers) from
that many client threads through the official `openai` client, first to the batched
server, then to the other, one server busy at a time. Tokens are the servers' own usage
counts. Each server runs torch on one thread (OMP_NUM_THREADS=1): at this model's size
the work per step is too small to share, and a second thread only waits for the first
(much longer when other processes hold the cores); the other core serves HTTP.

    python bench/bench_serve.py [--model DIR] [--requests 32] [--max_tokens 64]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "data" / "models" / "stories260K"
PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, Tom found",
           "The sun was", "A big red ball", "Mom said", "In the park"]


def start_server(model: Path, log: Path, batch: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "model.serve", str(model), "--port", "0",
                             "--device", "cpu", "--served_model_name", "m", "--quiet",
                             "--max_batch_size", str(batch), "--max_queue", "1024"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = re.search(r"at (http://\S+/v1)", log.read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(f"the server did not start: {log.read_text()}")


def measure(url: str, concurrency: int, requests: int, max_tokens: int) -> tuple[float, float, float]:
    """(requests/s, new tokens/s, mean seconds per request) of `requests` completions."""
    import openai

    client = openai.OpenAI(api_key="none", base_url=url, max_retries=0, timeout=600)

    def one(i: int) -> tuple[int, float]:
        start = time.perf_counter()
        r = client.completions.create(model="m", prompt=PROMPTS[i % len(PROMPTS)],
                                      max_tokens=max_tokens, temperature=0)
        return r.usage.completion_tokens, time.perf_counter() - start

    one(0)  # warm: connection, first allocations
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    return requests / wall, tokens / wall, sum(s for _, s in results) / requests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a model directory (default: stories260K)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max_tokens", type=int, default=64)
    a = p.parse_args()
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model
        if model is None:
            from model.convert import convert

            model = Path(tmp) / "stories260K"
            convert(STORIES / "stories260K.bin", model, "zhllama",
                    tokenizer=STORIES / "tok512.model", progress=False)
        servers = {"batched (waves of ≤ 16)": start_server(model, Path(tmp) / "b.log", 16),
                   "one at a time": start_server(model, Path(tmp) / "1.log", 1)}
        try:
            rows = []
            for c in (1, 4, 16):
                figures = {name: measure(url, c, a.requests, a.max_tokens)
                           for name, (_, url) in servers.items()}
                base = figures["one at a time"][1]
                for name, (rps, tps, latency) in figures.items():
                    rows.append(f"| {c} | {name} | {rps:.1f} | {tps:,.0f} | {latency:.2f} | "
                                f"{tps / base:.2f}× |")
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, {a.requests} requests of "
          f"{a.max_tokens} new tokens (greedy) per row, model {model.name}\n")
    print("| concurrency | server | requests/s | tokens/s | seconds per request | tokens/s ÷ one at a time |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
