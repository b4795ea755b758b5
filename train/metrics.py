"""What a run measures and logs: FLOPs per token, memory, throughput (and MFU), and the
metrics.jsonl file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributed import DistInfo
from .parallelize import clean_name


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: forward 2·N, backward 2·N for input gradients plus 2·N_trained
    for weight gradients (frozen weights need none), plus attention (PaLM's 12·L·d·T)."""
    matmul, trained = 0, 0
    for raw_name, p in model.named_parameters():
        name = clean_name(raw_name)
        if p.ndim == 2 and name != "tok_embeddings.weight":  # an embedding is a lookup
            matmul += p.numel()
            trained += p.numel() if p.requires_grad else 0
    args = model.args
    return 4 * matmul + 2 * trained + 12 * args.n_layers * args.dim * seq_len


def memory_bytes(device: torch.device) -> int:
    """Peak memory: CUDA's peak allocated, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def throughput(tokens: int, seconds: float, flops_per_tok: float, peak_tflops: float,
               dist: DistInfo) -> dict[str, float]:
    """tokens/s over all ranks, this rank's memory, and MFU when the peak is known."""
    record = {"tokens_per_s": tokens / seconds, "memory_gb": memory_bytes(dist.device) / 1e9}
    if peak_tflops:
        record["mfu"] = flops_per_tok * tokens / seconds / (peak_tflops * 1e12 * dist.world_size)
    return record


class MetricsLog:
    """metrics.jsonl on the main rank; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool, resumed_step: int) -> None:
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            keep = [l for l in path.read_text().splitlines()
                    if l.strip() and json.loads(l).get("step", 0) <= resumed_step]
            path.write_text("".join(l + "\n" for l in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
