"""The training loop shared by `train/pretrain.py` and `train/sft.py`.

Read top to bottom: build the model for a stage (LoRA or not, what is frozen), shard it,
load the weights, then step: micro-batches → summed token losses divided by the global
number of target tokens → clip → AdamW → schedule, with evaluation, logging and
checkpoints on the way, and the adapter or model written at the end.
"""

from __future__ import annotations

import json
import math
from argparse import RawDescriptionHelpFormatter
import os
import signal
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm.auto import tqdm

from data.shards import read_meta
from model.checkpoint import Checkpoint, from_state_dict
from model.formats import read_checkpoint, write_model_dir
from model.llama import Transformer, build_model
from model.lora import LoRAConfig, apply_lora, mark_trainable, save_adapter
from model.tensor_io import parse_dtype
from tokenizer.cli import TRACEBACK_ENV, ArgumentParser, CommandError, describe_error
from tokenizer.files import sha256_file
from tokenizer.templates import TEMPLATES

from . import checkpoint as ckpt_io
from .config import ConfigError, TrainConfig, dump, load_config
from .distributed import DistInfo, all_reduce_sum, setup, teardown
from .lock import RunLock
from .lora_setup import plan_lora
from .optim import LossScaler, build_optimizer, lr_at, set_lr
from .resume import ResumePlan, base_fingerprint, check_model_outside_output, plan_resume
from .parallelize import clean_name, parallelize

IGNORE_INDEX = -100


class BatchSource(Protocol):
    """What the loop needs from a dataset: batches, and a position it can save and restore."""

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Built:
    model: nn.Module
    base: Checkpoint  # the checkpoint the frozen weights come from
    lora: LoRAConfig | None
    origin: Checkpoint | None = None  # model.path, when `base` grew an adapter's embeddings


# ---------------------------------------------------------------------------------------
# the model for a stage


def build_for_stage(cfg: TrainConfig, dist: DistInfo) -> Built:
    """Meta-device model → LoRA (stage lora) → trainable marks → shard → load weights."""
    origin = base = read_checkpoint(cfg.model.path, progress=False)
    lora, init = None, {}
    if cfg.stage == "lora":
        plan = plan_lora(cfg.lora, base)  # continues lora.init_from when set
        lora, base, init = plan.config, plan.base, plan.init
    elif cfg.lora.init_from is not None:
        raise ConfigError(f"lora.init_from: only for stage lora (stage is {cfg.stage!r})")
    model = build_model(base.args, init=False)
    if lora is not None:
        apply_lora(model, lora)
        mark_trainable(model, lora.modules_to_save)
    elif cfg.stage == "embeddings":
        mark_trainable(model, ("tok_embeddings", "output"))
        if cfg.model.new_rows_from is not None and cfg.model.new_rows_from >= base.args.vocab_size:
            raise ConfigError(f"model.new_rows_from: {cfg.model.new_rows_from} is not below the "
                              f"model's vocabulary size {base.args.vocab_size}: no row would train")
    # stage "full": everything stays trainable
    frozen_dtype = parse_dtype(cfg.model.dtype)
    for p in model.parameters():
        if not p.requires_grad:  # frozen weights may be stored narrower; trained ones stay fp32
            p.data = p.data.to(frozen_dtype)
    parallelize(model, cfg.parallel, dist.mesh)
    model.to_empty(device=dist.device)
    load_weights(model, base, cfg.seed, init)
    return Built(model, base, lora, origin)


def initial_tensor(name: str, shape: torch.Size, base: Checkpoint, seed: int,
                   init: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The starting value of a parameter: from `init` (a continued adapter's factors), the
    checkpoint, or LoRA's initialisation.

    LoRA's A is drawn from a generator seeded by the parameter's name, so its value does
    not depend on the number of ranks or on the order parameters are visited in.
    """
    if init and name in init:
        return init[name]
    if name in base.specs:
        return base.get(name)
    if name.endswith(".lora_b"):
        return torch.zeros(shape)
    if name.endswith(".lora_a"):  # kaiming-uniform with a = √5, as nn.Linear: U(±1/√fan_in)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        bound = 1 / math.sqrt(shape[1])
        return (torch.rand(shape, generator=g) * 2 - 1) * bound
    raise KeyError(f"no initial value for parameter {name}")


@torch.no_grad()
def load_weights(model: nn.Module, base: Checkpoint, seed: int,
                 init: dict[str, torch.Tensor] | None = None) -> None:
    """Fill every (possibly sharded) parameter, one full tensor at a time."""
    for raw_name, p in model.named_parameters():
        full = initial_tensor(clean_name(raw_name), p.shape, base, seed, init).to(p.device, p.dtype)
        if isinstance(p, DTensor):  # each rank keeps its own slice; no communication needed
            full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        p.copy_(full)


def mask_old_rows(model: nn.Module, new_rows_from: int) -> None:
    """Zero the gradient rows of old tokens in tok_embeddings and output (stage 1 option).

    With no gradient and no weight decay (those tensors get none in this mode), AdamW
    leaves the rows exactly as they were. Under FSDP each rank masks its own rows: a
    (vocab, 1) column is sharded like the gradient, so no full-size mask is ever built.
    """
    for raw_name, p in model.named_parameters():
        if clean_name(raw_name) in ("tok_embeddings.weight", "output.weight") and p.grad is not None:
            keep = torch.ones(p.shape[0], 1, device=p.device, dtype=p.grad.dtype)
            keep[:new_rows_from] = 0
            if isinstance(p.grad, DTensor):
                keep = distribute_tensor(keep, p.grad.device_mesh, p.grad.placements,
                                         src_data_rank=None).to_local()
                p.grad.to_local().mul_(keep)
            else:
                p.grad.mul_(keep)


# ---------------------------------------------------------------------------------------
# measuring


def flops_per_token(model: Transformer, seq_len: int) -> float:
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
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    from pathlib import Path as _P
    for line in _P("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------
# one optimizer step


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int, device) -> torch.Tensor:
    """Summed token loss of a micro-batch."""
    kwargs = {"segment_ids": batch["segment_ids"].to(device)} if "segment_ids" in batch else {}
    return model.loss(batch["tokens"].to(device), batch["labels"].to(device),
                      chunk_size=chunk or None, **kwargs)


def train_step(
    model: nn.Module, micro_batches: list[dict[str, torch.Tensor]], params: list[nn.Parameter],
    cfg: TrainConfig, dist: DistInfo, scaler: LossScaler,
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
        loss = forward_loss(model, batch, cfg.parallel.loss_chunk_size, dist.device)
        (loss * (dist.world_size / n_global * scaler.scale)).backward()
        loss_sum += loss.detach()
    loss_mean = all_reduce_sum(float(loss_sum), dist.device) / n_global
    scaler.unscale_(params)
    if cfg.stage == "embeddings" and cfg.model.new_rows_from is not None:
        mask_old_rows(model, cfg.model.new_rows_from)
    max_norm = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    return loss_mean, float(norm), int(n_global)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]], n_batches: int,
             chunk: int, dist: DistInfo) -> dict[str, float]:
    """Validation loss, perplexity and next-token accuracy over `n_batches` per rank.

    The output layer runs in chunks of `chunk` tokens, as in training, so evaluation never
    holds a batch's whole logits either.
    """
    model.eval()
    loss_sum = correct = count = 0.0
    for _, batch in zip(range(n_batches), batches):
        labels = batch["labels"].to(dist.device)
        kwargs = {"segment_ids": batch["segment_ids"].to(dist.device)} if "segment_ids" in batch else {}
        loss, right = model.eval_stats(batch["tokens"].to(dist.device), labels, chunk_size=chunk or None,
                                       **kwargs)
        loss_sum += float(loss)
        correct += float(right)
        count += float((labels != IGNORE_INDEX).sum())
    if isinstance(model, FSDPModule):
        # The root keeps its parameters unsharded after a forward with no backward; reshard
        # so the module holds the very parameters the optimizer steps (and checkpoints name).
        model.reshard()
    model.train()
    loss_sum, correct, count = (all_reduce_sum(v, dist.device) for v in (loss_sum, correct, count))
    loss = loss_sum / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_acc": correct / max(count, 1)}


# ---------------------------------------------------------------------------------------
# the loop


class NonFiniteLoss(CommandError):
    """Training stopped after too many non-finite losses in a row."""


def stop_message(out: Path, bad: int, step: int, good: Path | None, dist: DistInfo) -> str:
    """Set aside the checkpoints newer than the last good one (so a restart does not resume
    from them) and say what happened."""
    suspect = [p for n, p in ckpt_io.step_dirs(out) if good is None or n > ckpt_io.step_of(good)]
    ckpt_io.set_aside(suspect, dist)
    where = (f"the last checkpoint followed by a finite loss is {good}" if good is not None
             else "no checkpoint was followed by a finite loss")
    moved = f" (newer ones renamed *.nonfinite: {', '.join(p.name for p in suspect)})" if suspect else ""
    return (f"{bad} non-finite losses in a row at step {step}; stopping: {where}{moved}. "
            f"Lower the learning rate and run the same command again with --optim.lr=<lower "
            f"rate>: it resumes from {good.name if good else 'the start'} at the new rate "
            "(or use bf16).")


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


def resume(plan: ResumePlan, state: ckpt_io.TrainState, data: BatchSource, dist: DistInfo) -> Path | None:
    """Load the planned step (if any) into `state` and `data`."""
    if plan.path is None:
        return None
    data_state = ckpt_io.load(plan.path, state, dist)
    if data_state is not None:
        data.load_state_dict(data_state)
    elif dist.is_main:
        print(f"warning: {plan.path} was saved by another number of ranks; the data order starts "
              "again from the beginning", file=sys.stderr)
    if dist.is_main:
        changed = f"; changed settings: {', '.join(plan.changed)}" if plan.changed else ""
        print(f"resumed from {plan.path} (step {state.progress.step}){changed}")
    return plan.path


class Interrupted(CommandError):
    """The run was stopped by Ctrl-C or SIGTERM; the message says what was kept."""


def throughput(tokens: int, seconds: float, flops_per_tok: float, peak_tflops: float,
               dist: DistInfo) -> dict[str, float]:
    """tokens/s over all ranks, this rank's memory, and MFU when the peak is known."""
    record = {"tokens_per_s": tokens / seconds, "memory_gb": memory_bytes(dist.device) / 1e9}
    if peak_tflops:
        record["mfu"] = flops_per_tok * tokens / seconds / (peak_tflops * 1e12 * dist.world_size)
    return record


def run(
    cfg: TrainConfig, built: Built, data: BatchSource, dist: DistInfo,
    val_data: BatchSource | None = None, seq_len: int = 512,
    plan: ResumePlan = ResumePlan(None), fingerprint: str = "",
) -> nn.Module:
    """Train `built.model` on `data` until cfg.optim.max_steps, starting from the step
    `plan` names (see train/resume.py). Returns the model."""
    model, out = built.model, Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    no_decay = ("tok_embeddings", "output") if cfg.model.new_rows_from is not None else ()
    optimizer = build_optimizer(model, cfg.optim, no_decay)
    scaler = LossScaler(cfg.parallel.precision == "fp16")
    state = ckpt_io.TrainState(model, optimizer, scaler)
    # Dropout draws from the global generators: seeded per rank (each rank its own masks),
    # so a run is reproducible; a resumed run restores the saved states instead.
    torch.manual_seed(cfg.seed * 100_003 + dist.rank)
    ckpt_io.remove_partial(out, dist)
    resume_from = resume(plan, state, data, dist)
    log = MetricsLog(out / "metrics.jsonl", dist.is_main, state.progress.step)
    config_yaml = dump(cfg)
    if dist.is_main:
        (out / "config.yaml").write_text(config_yaml)
    fpt = flops_per_token(model, seq_len)
    batches = data.batches(cfg.optim.micro_batch_size)
    bad_in_a_row = 0
    # A checkpoint counts as good once a finite step has followed it: the weights it holds
    # gave a usable loss. The one resumed from is taken as good.
    good, pending = resume_from, None
    bar = tqdm(total=cfg.optim.max_steps, initial=state.progress.step, disable=not dist.is_main,
               desc=f"train ({cfg.stage})", unit="step")
    model.train()
    try:
        while state.progress.step < cfg.optim.max_steps:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.optim.grad_accum)]
            lr = lr_at(state.progress.step, cfg.optim)  # a function of the step: resumes exactly
            set_lr(optimizer, lr)
            loss, norm, n_targets = train_step(model, micro, params, cfg, dist, scaler)
            loss_ok, norm_ok = math.isfinite(loss), math.isfinite(norm)
            if loss_ok and norm_ok:
                optimizer.step()
                bad_in_a_row = 0
            else:
                state.progress.skipped_steps += 1
                overflow = loss_ok and scaler.enabled  # fp16 scale too high: normal, not a failure
                bad_in_a_row = 0 if overflow else bad_in_a_row + 1
            if loss_ok and pending is not None:
                good, pending = pending, None
            scaler.update(loss_ok and norm_ok)
            optimizer.zero_grad(set_to_none=True)
            state.progress.step += 1
            state.progress.tokens += n_targets
            step = state.progress.step
            elapsed = time.perf_counter() - t0
            tokens = sum(b["tokens"].numel() for b in micro) * dist.world_size
            stop = bad_in_a_row >= cfg.log.max_bad_steps
            if step % cfg.log.every == 0 or step == cfg.optim.max_steps or stop:
                log.write({"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                           **throughput(tokens, elapsed, fpt, cfg.log.peak_tflops, dist),
                           "skipped_steps": state.progress.skipped_steps})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if stop:
                raise NonFiniteLoss(stop_message(out, bad_in_a_row, step, good, dist))
            if val_data is not None and cfg.log.eval_every and step % cfg.log.eval_every == 0:
                metrics = evaluate(model, val_data.batches(cfg.optim.micro_batch_size),
                                   cfg.log.eval_batches, cfg.parallel.loss_chunk_size, dist)
                log.write({"step": step, **metrics})
                if dist.is_main:
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            due = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.optim.max_steps
            if due and bad_in_a_row == 0:  # never save weights whose last loss was not finite
                pending = ckpt_io.save(out, state, data.state_dict(), config_yaml, dist,
                                       cfg.checkpoint.keep_last, protect=good,
                                       base_fingerprint=fingerprint)
            bar.update(1)
    except KeyboardInterrupt:
        kept = ckpt_io.latest_complete(out, warn=False)
        where = f"the run resumes from {kept.name}" if kept else "no step was saved; a restart begins again"
        raise Interrupted(f"interrupted at step {state.progress.step}; {where}") from None
    finally:
        bar.close()  # also before an error line, which must start a line of its own
    return model


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
        meta = read_meta(cfg.data.path)
        template = meta["options"].get("template") if meta["kind"] == "sft" else None
        # an unknown name is warned about, not refused: the run has trained by now
        if template is not None and template not in TEMPLATES:
            print(f"warning: {cfg.data.path}: template {template!r} is not one of "
                  f"{', '.join(TEMPLATES)}; the output records none", file=sys.stderr)
            template = None
    if built.lora is not None:
        full = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        if dist.is_main:
            state = {k: v for k, v in full.items() if k in adapter_keys(full, built.lora)}
            origin = built.origin or built.base  # the base at model.path, before any adapter
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


def adapter_keys(state: dict[str, torch.Tensor], lora: LoRAConfig) -> set[str]:
    return {k for k in state if k.endswith((".lora_a", ".lora_b"))
            or any(k.startswith(m + ".") for m in lora.modules_to_save)}


# ---------------------------------------------------------------------------------------
# the command line shared by train/pretrain.py and train/sft.py

DataFactory = Callable[[TrainConfig, DistInfo, Built], tuple[BatchSource, BatchSource | None, int]]


def script_main(argv: list[str] | None, prog: str, doc: str, make_data: DataFactory,
                stages: tuple[str, ...] = ("embeddings", "lora", "full")) -> None:
    """Parse `config.yaml [--key=value ..]`, then build, train and export; errors in one line.

    `make_data(cfg, dist, built)` returns (training batches, validation batches or None,
    sequence length for the FLOP count). Under torchrun a failure the ranks share (a bad
    config, data or checkpoint, a non-finite stop, Ctrl-C) is said once, by rank 0; one a
    rank meets alone is said by that rank, tagged with it. Exit 1, or 130 when interrupted.
    """
    p = ArgumentParser(prog=prog, description=doc, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (see configs/)")
    a, overrides = p.parse_known_args(argv)
    # Ctrl-C reaches every rank at once (and torchrun forwards SIGINT or SIGTERM); after
    # it, whatever a rank hits — often a peer's closed connection — is part of the stop.
    stopped: list[int] = []

    def interrupt(signum: int, frame: Any) -> None:
        stopped.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    dist, shared = None, True
    try:
        # read-only checks first, alike on every rank: nothing is written if they fail
        cfg = load_config(a.config, overrides)
        if cfg.stage not in stages:
            raise ConfigError(f"stage: {prog} runs {', '.join(stages)}, not {cfg.stage!r}")
        check_model_outside_output(cfg)
        fingerprint = base_fingerprint(read_checkpoint(cfg.model.path, progress=False))
        plan = plan_resume(cfg, fingerprint)  # refuses before anything is written
        dist = setup(cfg.parallel.backend)
        RunLock(Path(cfg.output_dir), dist).acquire()
        built, (train, val, seq_len) = _agree(dist, lambda: _build_and_data(cfg, dist, make_data))
        shared = False  # from here a rank may fail alone (a full disk, a lost GPU)
        run(cfg, built, train, dist, val, seq_len=seq_len, plan=plan, fingerprint=fingerprint)
        path = export(cfg, built, dist)
        if dist.is_main:
            print(f"done: {path}")
        teardown()
    except (Interrupted, KeyboardInterrupt) as e:
        _fail(str(e) if isinstance(e, Interrupted) else "interrupted", 130, dist, shared=True)
    except Exception as e:  # the same words as every other command (tokenizer/cli.py)
        if stopped:
            _fail("interrupted", 130, dist, shared=True)
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        _fail(describe_error(e, a.config), 1, dist, shared=shared or isinstance(e, CommandError))


def _build_and_data(cfg: TrainConfig, dist: DistInfo, make_data: DataFactory) -> tuple[Built, Any]:
    built = build_for_stage(cfg, dist)
    return built, make_data(cfg, dist, built)


class _Agreed(CommandError):
    """A failure of one or more ranks, agreed on by all (the message of the lowest rank)."""


def _agree(dist: DistInfo, fn: Callable[[], Any]) -> Any:
    """Run `fn` on every rank; if any rank fails, every rank raises the first failure's
    message, so that rank 0 can say it and no rank is left waiting in a collective."""
    result, message = None, None
    try:
        result = fn()
    except Exception as e:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        message = describe_error(e)
    messages: list[str | None] = [None] * dist.world_size
    torch.distributed.all_gather_object(messages, message)  # our own strings: nothing foreign
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        rank, first = failed[0]
        raise _Agreed(first if rank == 0 or len(failed) == dist.world_size else f"rank {rank}: {first}")
    return result


def _fail(message: str, code: int, dist: DistInfo | None, shared: bool) -> None:
    """One `error:` line, then exit without waiting for other ranks.

    A shared failure is said by rank 0 only; the other ranks wait a moment first, so that
    the launcher does not stop rank 0 (for their exit) before it has said it.
    """
    rank = dist.rank if dist is not None else int(os.environ.get("RANK", "0"))
    if rank == 0 or not shared:
        tag = f"rank {rank}: " if rank else ""
        print(f"error: {tag}{message}", file=sys.stderr, flush=True)
    elif code != 130:
        for sig in (signal.SIGINT, signal.SIGTERM):  # the launcher may stop us now: quietly
            signal.signal(sig, signal.SIG_DFL)
        time.sleep(2)
    sys.stdout.flush()
    os._exit(code)  # a collective teardown could wait forever for a rank that already left
