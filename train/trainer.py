"""The training loop: the step, evaluation, the loop itself, and what a run leaves behind.

One step: micro-batches → summed token losses divided by the number of target tokens of
the whole step on all ranks → clip → AdamW at the schedule's rate. The loop adds
evaluation, logging and checkpoints, and resumes from the step the run's plan names. The
model it trains comes from train/stages.py; train/pretrain.py and train/sft.py put the
pieces together.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from data.shards import read_meta
from model.formats import write_model_dir
from model.lora import adapter_keys, save_adapter
from model.source import from_state_dict
from model.tensor_io import parse_dtype
from tokenizer.files import sha256_file
from tokenizer.labels import IGNORE_INDEX
from tokenizer.lengths import TextLengths, text_lengths
from tokenizer.templates import TEMPLATES

from . import steps
from .config import TrainConfig, dump
from .distributed import DistInfo, all_reduce_sum
from .metrics import MetricsLog, flops_per_token, throughput
from .nonfinite import NonFiniteGuard
from .optim import LossScaler, build_optimizer, set_lr
from .plot import LossPicture
from .resume import ResumePlan
from .session import Interrupted
from .stages import Built
from .summary import RunReport, end_block, start_block, steps_for_epochs


class BatchSource(Protocol):
    """What the loop needs from a dataset: batches, and a position it can save and restore."""

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]: ...
    def rows_per_epoch(self) -> int: ...  # for the summary and optim.epochs
    def num_tokens(self) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------------------------------
# one optimizer step


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int, device) -> torch.Tensor:
    """Summed token loss of a micro-batch."""
    kwargs = {"segment_ids": batch["segment_ids"].to(device)} if "segment_ids" in batch else {}
    return model.loss(batch["tokens"].to(device), batch["labels"].to(device),
                      chunk_size=chunk or None, **kwargs)


@dataclass(frozen=True)
class StepOptions:
    """What one optimizer step needs to know, besides the model and the batches."""

    chunk_size: int  # tokens per chunk of the output layer and loss (0: all at once)
    clip_grad_norm: float | None
    mask_grads: Callable[[nn.Module], None] | None = None  # the stage's, before clipping


def step_options(cfg: TrainConfig, built: Built) -> StepOptions:
    """The step's settings from a run's config and its stage."""
    return StepOptions(cfg.parallel.loss_chunk_size, cfg.optim.clip_grad_norm, built.stage.mask_grads)


def train_step(
    model: nn.Module, micro_batches: list[dict[str, torch.Tensor]], params: list[nn.Parameter],
    opts: StepOptions, dist: DistInfo, scaler: LossScaler,
) -> tuple[float, float, int]:
    """Forward/backward over the micro-batches; return (mean loss, grad norm, target tokens).

    Each micro-batch's summed loss is divided by the number of target tokens in the whole
    step on all ranks, so the gradient is that of the mean over every target token however
    the tokens fall into micro-batches. FSDP averages gradients over ranks, hence the
    factor world_size.
    """
    n_local = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
    n_global = all_reduce_sum(n_local, dist.device)
    if n_global == 0:
        return float("nan"), float("nan"), 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    for batch in micro_batches:
        loss = forward_loss(model, batch, opts.chunk_size, dist.device)
        (loss * (dist.world_size / n_global * scaler.scale)).backward()
        loss_sum += loss.detach()
    loss_mean = all_reduce_sum(float(loss_sum), dist.device) / n_global
    scaler.unscale_(params)
    if opts.mask_grads is not None:
        opts.mask_grads(model)
    max_norm = opts.clip_grad_norm if opts.clip_grad_norm else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    return loss_mean, float(norm), int(n_global)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]], n_batches: int | None,
             chunk: int, dist: DistInfo, lengths: TextLengths | None = None) -> dict[str, float]:
    """Validation figures over `n_batches` per rank (None: all the batches there are).

    loss (mean token NLL, nats), ppl, acc (next-token accuracy) and, given the tokenizer's
    text lengths, bpc and bpb: the summed NLL in bits over the characters (UTF-8 bytes) of
    the text the targets stand for, which compare across tokenizers as loss cannot. The
    output layer runs in chunks of `chunk` tokens, as in training, so evaluation never
    holds a batch's whole logits either.
    """
    model.eval()
    sums = dict.fromkeys(("nll", "correct", "targets", "chars", "bytes"), 0.0)
    for _, batch in zip(range(n_batches) if n_batches is not None else itertools.count(), batches):
        labels = batch["labels"].to(dist.device)
        kwargs = {"segment_ids": batch["segment_ids"].to(dist.device)} if "segment_ids" in batch else {}
        loss, right = model.eval_stats(batch["tokens"].to(dist.device), labels, chunk_size=chunk or None,
                                       **kwargs)
        sums["nll"] += float(loss)
        sums["correct"] += float(right)
        sums["targets"] += float((labels != IGNORE_INDEX).sum())
        if lengths is not None:
            chars, nbytes = lengths.of_targets(batch["tokens"], batch["labels"], batch.get("text_starts"))
            sums["chars"] += chars
            sums["bytes"] += nbytes
    if isinstance(model, FSDPModule):
        # The root keeps its parameters unsharded after a forward with no backward; reshard
        # so the module holds the very parameters the optimizer steps (and checkpoints name).
        model.reshard()
    model.train()
    sums = {k: all_reduce_sum(v, dist.device) for k, v in sums.items()}
    return figures(sums, with_lengths=lengths is not None)


def figures(sums: dict[str, float], with_lengths: bool) -> dict[str, float]:
    """Validation figures from summed NLL (nats), correct predictions, targets, characters
    and bytes."""
    loss = sums["nll"] / max(sums["targets"], 1)
    out = {"loss": loss, "ppl": math.exp(min(loss, 50)), "acc": sums["correct"] / max(sums["targets"], 1)}
    if with_lengths:
        bits = sums["nll"] / math.log(2)
        out |= {"bpc": bits / max(sums["chars"], 1), "bpb": bits / max(sums["bytes"], 1)}
    return out


# ---------------------------------------------------------------------------------------
# the loop


def metric_key(val_set: str, metric: str) -> str:
    """metrics.jsonl's name for a validation figure: `val_loss` for the run's held-out split
    (val_set ""), `val/zh/loss` for the validation set named zh (data.val_sets)."""
    return f"val_{metric}" if not val_set else f"val/{val_set}/{metric}"


def data_fields(data: BatchSource) -> dict[str, Any]:
    """What a dataset reports in each training line of metrics.jsonl (a mixture: the share
    of blocks each source has given so far); most report nothing."""
    fields = getattr(data, "log_fields", None)
    return fields() if fields is not None else {}


def resume(plan: ResumePlan, state: steps.TrainState, data: BatchSource, dist: DistInfo) -> Path | None:
    """Load the planned step (if any) into `state` and `data`."""
    if plan.path is None:
        return None
    data.load_state_dict(steps.load(plan.path, state, dist))  # global: any number of ranks
    if dist.is_main:
        changed = f"; changed settings: {', '.join(plan.changed)}" if plan.changed else ""
        print(f"resumed from {plan.path} (step {state.progress.step}){changed}")
    return plan.path


def run(
    cfg: TrainConfig, built: Built, data: BatchSource, dist: DistInfo,
    val_sets: dict[str, BatchSource] | None = None, seq_len: int = 512,
    plan: ResumePlan = ResumePlan(None), fingerprint: str = "",
) -> RunReport:
    """Train `built.model` on `data` until cfg.optim.max_steps (or optim.epochs), starting
    from the step `plan` names (see train/resume.py). Says what it will do at the start and
    what it did at the end (train/summary.py), and returns the latter."""
    cfg = steps_for_epochs(cfg, data, dist)
    model, out, o = built.model, Path(cfg.output_dir), cfg.optim
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, o, built.stage.no_decay)
    scaler = LossScaler(cfg.parallel.precision == "fp16")
    state = steps.TrainState(model, optimizer, scaler)
    step_opts = step_options(cfg, built)
    # Dropout draws from the global generators: seeded per rank (each rank its own masks),
    # so a run is reproducible; a resumed run restores the saved states instead.
    torch.manual_seed(cfg.seed * 100_003 + dist.rank)
    steps.remove_partial(out, dist)
    guard = NonFiniteGuard(cfg.log.max_bad_steps, resume(plan, state, data, dist))
    log = MetricsLog(out / "metrics.jsonl", dist.is_main, state.progress.step,
                     tensorboard=cfg.log.tensorboard)
    picture = LossPicture(out, enabled=dist.is_main and cfg.log.plot)  # loss.png
    report = RunReport()
    config_yaml = dump(cfg)
    if dist.is_main:
        (out / "config.yaml").write_text(config_yaml)
    fpt = flops_per_token(model, seq_len)
    # bits per character and byte need the text each token stands for
    lengths = text_lengths(built.base.tokenizer) if val_sets and built.base.tokenizer else None
    batches = data.batches(o.micro_batch_size)
    if dist.is_main:
        print(start_block(cfg, model, optimizer, data, dist, state.progress.step), flush=True)
    started = time.perf_counter()
    bar = tqdm(total=o.max_steps, initial=state.progress.step, disable=not dist.is_main,
               desc=f"train ({cfg.stage})", unit="step")
    model.train()
    try:
        while state.progress.step < o.max_steps:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(o.grad_accum)]
            # every group's rate (optim.lr's returned) is a function of the step: resumes exactly
            lr = set_lr(optimizer, state.progress.step, o)
            loss, norm, n_targets = train_step(model, micro, params, step_opts, dist, scaler)
            finite = math.isfinite(loss) and math.isfinite(norm)
            if finite:
                optimizer.step()
            else:
                state.progress.skipped_steps += 1
            guard.step(math.isfinite(loss), math.isfinite(norm), overflow_expected=scaler.enabled)
            scaler.update(finite)
            optimizer.zero_grad(set_to_none=True)
            state.progress.step += 1
            state.progress.tokens += n_targets
            step = state.progress.step
            tokens = sum(b["tokens"].numel() for b in micro) * dist.world_size
            report.steps, report.tokens = report.steps + 1, report.tokens + tokens
            if step % cfg.log.every == 0 or step == o.max_steps or guard.should_stop:
                log.write({"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                           "tokens": state.progress.tokens,  # target tokens trained on so far
                           **throughput(tokens, time.perf_counter() - t0, fpt, cfg.log.peak_tflops, dist),
                           "skipped_steps": state.progress.skipped_steps, **data_fields(data)})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if guard.should_stop:
                raise guard.stop(out, step, dist)
            if val_sets and cfg.log.eval_every and step % cfg.log.eval_every == 0:
                metrics = {}
                for name, val in val_sets.items():
                    found = evaluate(model, val.batches(o.micro_batch_size), cfg.log.eval_batches,
                                     cfg.parallel.loss_chunk_size, dist, lengths)
                    metrics.update({metric_key(name, k): v for k, v in found.items()})
                log.write({"step": step, **metrics})
                report.evaluated(step, metrics)
                picture.redraw()
                if dist.is_main:
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            due = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == o.max_steps
            if due and guard.may_save:
                guard.saved(steps.save(out, state, data.state_dict(), config_yaml, dist,
                                         cfg.checkpoint.keep_last, protect=guard.good,
                                         base_fingerprint=fingerprint))
            bar.update(1)
    except KeyboardInterrupt:
        kept = steps.latest_complete(out, warn=False)
        where = f"the run resumes from {kept.name}" if kept else "no step was saved; a restart begins again"
        raise Interrupted(f"interrupted at step {state.progress.step}; {where}") from None
    finally:
        bar.close()  # also before an error line, which must start a line of its own
        log.close()
    picture.redraw()
    report.seconds = time.perf_counter() - started
    if dist.is_main:
        print(end_block(report), flush=True)
    return report


# ---------------------------------------------------------------------------------------
# what a run leaves behind


def export(cfg: TrainConfig, built: Built, dist: DistInfo) -> Path:
    """Write the adapter (stage lora) or a canonical model directory (embeddings, full).

    After SFT, the output records the data's prompt template (its meta.json), which a
    Hugging Face export then writes as the chat_template; after pretraining, none.
    """
    model, out = built.model, Path(cfg.output_dir)
    tokenizer = built.base.tokenizer
    template = None
    if dist.is_main:
        meta = read_meta(cfg.data.primary_path())
        template = meta["options"].get("template") if meta["kind"] == "sft" else None
        # an unknown name is warned about, not refused: the run has trained by now
        if template is not None and template not in TEMPLATES:
            print(f"warning: {cfg.data.primary_path()}: template {template!r} is not one of "
                  f"{', '.join(TEMPLATES)}; the output records none", file=sys.stderr)
            template = None
    if built.lora is not None:
        full = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        if dist.is_main:
            state = {k: v for k, v in full.items() if k in adapter_keys(full, built.lora)}
            origin = built.origin  # the base at model.path, before a continued adapter's rows
            save_adapter(state, built.lora, out / "adapter", base_vocab_size=origin.args.vocab_size,
                         vocab_size=built.base.args.vocab_size, overwrite=True, tokenizer=tokenizer,
                         tokenizer_sha256=sha256_file(tokenizer) if tokenizer else None,
                         base=origin, template=template)
        return out / "adapter"
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_main:
        dtype = parse_dtype(cfg.model.dtype)
        state = {k: v.to(dtype) for k, v in full.items()}
        trained = from_state_dict(state, built.base.args, tokenizer).replace(template=template)
        write_model_dir(trained, out / "model", overwrite=True, progress=False)
    return out / "model"
