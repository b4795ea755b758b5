"""What a run measures and logs: FLOPs per token, memory, throughput (and MFU), and the
metrics.jsonl file (with TensorBoard's copy of it when asked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenizer.files import atomic_output_file

from .config import ConfigError
from .distributed import DistInfo
from .parallelize import clean_name
from .plot import is_number, metric_group, read_metrics


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


def tensorboard_tag(key: str) -> str:
    """TensorBoard's name for a metrics.jsonl key, grouped as TensorBoard shows them:
    train/loss, train/lr, train/share/NAME, val/loss (the held-out split), val/zh/bpc."""
    val_set, figure = metric_group(key)
    if val_set is None:
        return f"train/{figure}"
    return f"val/{val_set}/{figure}" if val_set else f"val/{figure}"


def summary_writer_class() -> type:
    """torch's TensorBoard SummaryWriter, or a ConfigError naming the setting and the extra
    (torch's own writer needs the tensorboard package, which zhllama makes optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("log.tensorboard: true needs the tensorboard package "
                          "(pip install 'zhllama[tensorboard]'), or set log.tensorboard: false") from None
    return SummaryWriter


class MetricsLog:
    """metrics.jsonl on the main rank, and with `tensorboard` the same figures as TensorBoard
    scalars in the directory beside it named tensorboard/ (a tag per key, at the record's
    step; see tensorboard_tag). On resume, lines past the resumed step are dropped and
    TensorBoard is told to hide its events past it (its purge_step).

        with MetricsLog(out / "metrics.jsonl", dist.is_main, step, tensorboard=True) as log:
            log.write({"step": 1, "loss": 2.5})

    A missing tensorboard package is a ConfigError on every rank (so that all stop alike),
    raised when the log is made, before any step.
    """

    def __init__(self, path: Path, enabled: bool, resumed_step: int, tensorboard: bool = False) -> None:
        self.path, self.enabled = Path(path), enabled
        writer_class = summary_writer_class() if tensorboard else None
        if enabled and self.path.exists():
            keep = [r for r in read_metrics(self.path) if r["step"] <= resumed_step]
            with atomic_output_file(self.path, overwrite=True) as tmp:  # the history, whole or not at all
                tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self.writer = None
        if enabled and writer_class is not None:
            # events at steps after resumed_step are hidden, like the lines dropped above
            self.writer = writer_class(str(self.path.parent / "tensorboard"), purge_step=resumed_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Append `record` (with its "step") to metrics.jsonl, and its numbers to TensorBoard."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and is_number(value):
                    self.writer.add_scalar(tensorboard_tag(key), value, record["step"])
            self.writer.flush()  # a run killed later keeps what it logged

    def close(self) -> None:
        """Flush and close the TensorBoard files (metrics.jsonl is closed after each write)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
