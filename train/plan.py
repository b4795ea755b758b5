"""Will it fit? The memory one GPU needs to train a config, before anything runs.

    zhllama plan configs/llama-7b-stage2.yaml --gpu_memory 24GiB
    zhllama plan configs/llama-7b-stage2.yaml --size 7b --vocab 49954 --nproc 8
    python -m train.plan CFG.yaml [--key=value ..] [--nproc N] [--gpu_memory 80GiB]

Prints, per GPU, the parameters, gradients, optimizer state, activations, the output
layer and loss, temporary buffers and the total at the step's peak; whether that (with an
allowance for the CUDA context and the allocator's fragmentation) fits in --gpu_memory;
and if not, one change that makes it fit, itself planned.

How it counts (train/plan_trace.py): the model of the config, as `build_for_stage` makes it
(LoRA, what the stage trains, frozen dtype, NF4, activation checkpointing, FSDP2 over
--nproc fake ranks), runs one real optimizer step on fake tensors — shapes and sizes, no
data — while a dispatch mode counts the bytes of every live storage and each phase's
peak. The model has the real width and vocabulary but only 2 and 3 blocks (2p and 3p for
checkpointing every p-th block): each phase's peak, by category, is affine in the number
of blocks (every block adds the same parameters, gradients, state and saved activations;
FSDP's prefetch of the next block's parameters appears from 2 blocks on), so the two
traces give the per-block slope and the full depth follows. A 65B plan costs what a
tiny one does. Counted, not traced:
- with grad_accum >= 2, the later micro-batches hold the step's gradients throughout
  (plan_trace.trace_step);
- torchao's AdamW8bit compiles its step: traced as a fused AdamW with 8-bit state's bytes;
- on CUDA, activation offload (parallel.activation_offload): the checkpointed blocks'
  inputs leave the GPU for pinned host memory (the trace runs on the CPU, where both are
  the same memory), all but the block being recomputed;
- on CUDA, packed rows (flex attention, whose backward has no CPU kernel to trace): traced
  as causal rows, whose kernel keeps what flex attention's keeps (output, log-sum-exp);
- parallel.compile: planned as run eagerly.
On CUDA, AdamW is fused and every allocation rounded up to 512 bytes, as on the GPU.
--device cpu plans the CPU's own step (dense masks, foreach AdamW), which --measure checks
against the real step run in this process.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from data.shards import read_meta
from model.convert import size_option
from model.formats import read_checkpoint
from model.formats.hf import args_from_config
from model.llama import MODEL_SIZES, ModelArgs, named_args
from model.lora import LoRASettings, SettingsConflict
from model.tensor_io import parse_dtype, read_json
from tokenizer.cli import ArgumentParser, command_errors, positive_int

from .config import ConfigError, TrainConfig, dump, load_config, to_dict
from .data_checks import check_length
from .summary import loss_phrase
from .plan_trace import CATEGORIES, CUDA_BLOCK, PHASES, StepShape, measure_step, planning_checkpoint, \
    trace_step

GIB = 2**30
# What a GPU needs beyond the step's tensors (an allowance, not counted): the CUDA
# context and cuBLAS/NCCL workspaces, and the caching allocator's fragmentation.
CUDA_CONTEXT = 1 * GIB
FRAGMENTATION = 0.05
LABELS = {"parameters": "parameters", "gradients": "gradients", "optimizer state": "optimizer state",
          "activations": "activations", "loss": "output layer and loss", "temporary": "temporary buffers"}
SHORT_SIZES = "7b, 13b, 33b, 65b (LLaMA-1) and 70b (Llama-2)"


@dataclass(frozen=True)
class PlanOptions:
    """What `zhllama plan` is asked."""

    config: str
    overrides: tuple[str, ...] = ()
    nproc: int = 1
    gpu_memory: int = 80 * GIB
    size: str | None = None  # a named size instead of model.path's checkpoint
    vocab: int | None = None
    device: str = "cuda"  # the device planned for
    measure: bool = False


@dataclass(frozen=True)
class Setting:
    """Everything a plan depends on."""

    cfg: TrainConfig
    args: ModelArgs
    shape: StepShape
    nproc: int


@dataclass
class Plan:
    """Per-GPU bytes at each phase's peak, by category; `peak` is the phase of the step's."""

    setting: Setting
    phases: dict[str, dict[str, int]]
    host_bytes: int = 0  # offloaded activations, in (pinned) host memory
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> str:
        return max(PHASES, key=lambda p: sum(self.phases[p].values()))

    @property
    def total(self) -> int:
        return sum(self.phases[self.peak].values())

    @property
    def allowance(self) -> int:
        cuda = self.setting.shape.target == "cuda"
        return round(CUDA_CONTEXT + FRAGMENTATION * self.total) if cuda else 0

    @property
    def needed(self) -> int:
        return self.total + self.allowance


# ---------------------------------------------------------------------------------------
# what is planned


def size_name(name: str) -> str:
    """A named size (model/llama.py MODEL_SIZES), or its short form: 7b is LLaMA-1's."""
    for candidate in (name, f"llama-{name}", f"llama2-{name}"):
        if candidate in MODEL_SIZES:
            return candidate
    raise ConfigError(f"--size: unknown size {name!r}; known: {', '.join(MODEL_SIZES)} "
                      f"(or {SHORT_SIZES})")


def model_args(cfg: TrainConfig, size: str | None, vocab: int | None) -> ModelArgs:
    """The model planned: a named size, or model.path's hyper-parameters (params.json or
    config.json alone; other formats through their reader, which reads no weights)."""
    if vocab is not None and vocab <= 0:
        raise ConfigError(f"--vocab: must be positive, got {vocab}")
    if size is not None:
        args = named_args(size_name(size))
        return args.replace(vocab_size=vocab) if vocab else args
    path = Path(cfg.model.path)
    if not path.exists():
        raise ConfigError(f"model.path: {path} does not exist; to plan before downloading, give "
                          f"--size ({SHORT_SIZES}) and --vocab")
    try:
        if (path / "params.json").is_file():
            args = ModelArgs.from_params(read_json(path / "params.json"), vocab_size=vocab)
        elif (path / "config.json").is_file():
            args = args_from_config(read_json(path / "config.json"), path / "config.json")
        else:
            args = read_checkpoint(path, progress=False).args
    except ValueError as e:
        raise ConfigError(f"model.path: {path}: {e}") from None
    return args.replace(vocab_size=vocab) if vocab else args


def adapter_lora(cfg: TrainConfig, args: ModelArgs) -> tuple[TrainConfig, ModelArgs]:
    """With lora.init_from, the continued adapter's LoRA (and vocabulary), read from its
    config and tensor shapes; the plan then needs no more of it."""
    if cfg.stage != "lora" or cfg.lora.init_from is None:
        return cfg, args
    from model.adapters import read_adapter_weights

    from .lora_setup import adapter_settings

    adapter = read_adapter_weights(cfg.lora.init_from, args.n_heads, args.kv_heads)
    try:
        resolved = cfg.lora.resolve(adapter_settings(adapter))
    except SettingsConflict as e:
        raise ConfigError(f"lora.{e.key}: {e}") from None
    lora = LoRASettings(r=resolved.r, alpha=resolved.alpha, dropout=cfg.lora.dropout,
                        targets=resolved.targets, modules_to_save=resolved.modules_to_save)
    return replace(cfg, lora=lora), args.replace(vocab_size=adapter.vocab_size or args.vocab_size)


def rows(cfg: TrainConfig) -> tuple[int, bool, str]:
    """(tokens per row, packed, where the length comes from): SFT rows of
    data.max_seq_length (or the data's own) or pretraining blocks of data.block_size. The
    kind is the data's (meta.json) when it is there, else SFT when max_seq_length or
    pack is set."""
    d = cfg.data
    path = Path(d.primary_path())
    meta = read_meta(path) if (path / "meta.json").is_file() else None
    sft = meta["kind"] == "sft" if meta else (d.max_seq_length is not None or d.pack)
    if not sft:
        return d.block_size, d.document_mask, "data.block_size"
    if d.max_seq_length is not None:
        return d.max_seq_length, d.pack, "data.max_seq_length"
    if meta is None:
        raise ConfigError(f"data.max_seq_length: set it to plan SFT rows ({path} is not there to say)")
    return int(meta["options"]["max_seq_length"]), d.pack, f"{path}'s max_seq_length"


def setting_for(cfg: TrainConfig, args: ModelArgs, nproc: int, device: str) -> Setting:
    seq_len, packed, key = rows(cfg)
    check_length(key, seq_len, planning_checkpoint(args, parse_dtype(cfg.model.dtype)))
    shape = StepShape(cfg.optim.micro_batch_size, seq_len, cfg.optim.grad_accum, packed, device)
    return Setting(cfg, args, shape, nproc)


# ---------------------------------------------------------------------------------------
# counting


class Planner:
    """Plans settings, tracing each distinct (config, depth, shape, ranks) once."""

    def __init__(self) -> None:
        self._traces: dict[tuple, dict[str, dict[str, int]]] = {}

    def _trace(self, cfg: TrainConfig, args: ModelArgs, shape: StepShape, nproc: int) -> dict:
        key = (dump(cfg), args, shape, nproc)
        if key not in self._traces:
            self._traces[key] = trace_step(cfg, args, shape, nproc)
        return self._traces[key]

    def plan(self, s: Setting) -> Plan:
        """The per-GPU memory of `s`: traced at two depths, extrapolated to the real one."""
        cfg, p = s.cfg, s.cfg.parallel
        offload_on_cuda = p.activation_offload and s.shape.target == "cuda"
        traced = replace(cfg, parallel=replace(p, activation_offload=False)) if offload_on_cuda else cfg
        period = p.selective_every if p.activation_checkpointing == "selective" else 1
        n = s.args.n_layers
        depths = (n,) if n <= 3 * period else (2 * period, 3 * period)
        traces = {d: self._trace(traced, s.args.replace(n_layers=d), s.shape, s.nproc) for d in depths}
        plan = Plan(s, extrapolate(traces, n))
        if offload_on_cuda:
            offload(plan)
        if p.activation_checkpointing == "selective" and n % period:
            plan.notes.append(f"{n} blocks, every {period}th checkpointed: extrapolated from whole periods")
        if cfg.optim.name == "adamw8bit":
            plan.notes.append("optim.name adamw8bit: torchao's 8-bit state counted from its layout; its "
                              "compiled step traced as fused AdamW's (no temporaries)")
        if s.shape.segments and s.shape.target == "cuda":
            plan.notes.append("packed rows: attention traced as causal rows, whose flash kernel keeps what flex "
                              "attention's does; its block mask and the rows' positions (a few MB) not counted")
        if p.compile:
            plan.notes.append("parallel.compile: planned as run eagerly")
        return plan


def extrapolate(traces: dict[int, dict[str, dict[str, int]]], n_layers: int) -> dict[str, dict[str, int]]:
    """Each phase's peak by category at `n_layers` blocks, from traces at one depth (the
    real one) or two (affine in the number of blocks)."""
    if len(traces) == 1:
        return next(iter(traces.values()))
    (a, low), (b, high) = sorted(traces.items())

    def at_depth(phase: str, c: str) -> int:
        per_block = (high[phase][c] - low[phase][c]) / (b - a)
        return max(0, round(high[phase][c] + (n_layers - b) * per_block))

    return {phase: {c: at_depth(phase, c) for c in CATEGORIES} for phase in PHASES}


def offload(plan: Plan) -> None:
    """Move the checkpointed blocks' inputs (but the one being recomputed) to host memory."""
    s = plan.setting
    p = s.cfg.parallel
    itemsize = 4 if p.precision == "fp32" else 2
    block_input = s.shape.micro_batch_size * s.shape.seq_len * s.args.dim * itemsize
    block_input = -(-block_input // CUDA_BLOCK) * CUDA_BLOCK
    every = p.selective_every if p.activation_checkpointing == "selective" else 1
    checkpointed = -(-s.args.n_layers // every)
    for phase in ("forward", "backward"):
        moved = min((checkpointed - 1) * block_input, plan.phases[phase]["activations"])
        plan.phases[phase]["activations"] -= moved
    plan.host_bytes = checkpointed * block_input
    plan.notes.append(f"activation offload (counted, not traced): the {checkpointed} checkpointed blocks' "
                      f"inputs, {gib(plan.host_bytes)} GiB, wait in pinned host memory")


# ---------------------------------------------------------------------------------------
# what would make it fit


@dataclass
class Change:
    """One change to a setting: what to pass on the command line, and the setting."""

    flags: str
    setting: Setting
    note: str = ""


def with_cfg(s: Setting, **sections: dict[str, Any]) -> Setting:
    cfg = s.cfg
    for name, values in sections.items():
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), **values)})
    return setting_for(cfg, s.args, s.nproc, s.shape.target)


def families(s: Setting) -> list[tuple[str, list[Change]]]:
    """The single changes worth planning, family by family, each family's mildest first;
    the families in the order they disturb training: none changes what is computed, then
    micro-batches (the same global batch), then the optimizer's and the base's precision,
    then the hardware."""
    cfg, p, o = s.cfg, s.cfg.parallel, s.cfg.optim
    out: list[tuple[str, list[Change]]] = []
    if p.activation_checkpointing != "full":
        full = with_cfg(s, parallel={"activation_checkpointing": "full"})
        out.append(("activation checkpointing", [Change("--parallel.activation_checkpointing=full", full)]))
    if p.activation_checkpointing != "none" and not p.activation_offload:
        out.append(("activation offload", [Change(
            "--parallel.activation_offload=true", with_cfg(s, parallel={"activation_offload": True}))]))
    if p.loss_chunk_size == 0 or p.loss_chunk_size > 1024:
        out.append(("loss chunks", [Change(
            "--parallel.loss_chunk_size=1024", with_cfg(s, parallel={"loss_chunk_size": 1024}))]))
    smaller = [m for m in range(o.micro_batch_size - 1, 0, -1) if o.micro_batch_size % m == 0]
    if smaller:
        out.append(("smaller micro-batches", [Change(
            f"--optim.micro_batch_size={m} --optim.grad_accum={o.grad_accum * o.micro_batch_size // m}",
            with_cfg(s, optim={"micro_batch_size": m, "grad_accum": o.grad_accum * o.micro_batch_size // m}),
            "the same global batch") for m in smaller]))
    if o.name == "adamw":
        out.append(("8-bit AdamW", [Change("--optim.name=adamw8bit", with_cfg(s, optim={"name": "adamw8bit"}),
                                           "torchao's")]))
    if cfg.stage == "lora" and cfg.model.quantize == "none":
        out.append(("QLoRA", [Change("--model.quantize=nf4", with_cfg(s, model={"quantize": "nf4"}),
                                     "NF4 base weights; torchao's")]))
    more = [s.nproc * 2**k for k in range(1, 9) if s.nproc * 2**k <= 512]
    out.append(("more GPUs", [Change(f"--nproc {n}", replace(s, nproc=n),
                                     f"{n} GPUs: the global batch grows {n // s.nproc}×") for n in more]))
    return out


@dataclass
class Tried:
    family: str
    change: Change
    needed: int
    fits: bool


def advise(planner: Planner, s: Setting, budget: int, bar: Any = None) -> list[Tried]:
    """Families in order until one fits: its strongest change first (if even that does
    not fit, neither does a milder one), then the mildest that fits, by bisection."""
    tried: list[Tried] = []

    def attempt(family: str, change: Change) -> Tried | None:
        try:
            plan = planner.plan(change.setting)
        except ConfigError:  # a change this setting cannot take (NF4 rows over these ranks)
            return None
        finally:
            if bar is not None:
                bar.update(1)
        return Tried(family, change, plan.needed, plan.needed <= budget)

    for family, changes in families(s):
        strongest = attempt(family, changes[-1])
        if strongest is None:
            continue
        if not strongest.fits:
            tried.append(strongest)
            continue
        lo, hi, best = 0, len(changes) - 1, strongest  # changes[hi] fits
        while lo < hi:
            mid = (lo + hi) // 2
            t = attempt(family, changes[mid])
            if t is not None and t.fits:
                hi, best = mid, t
            else:
                lo = mid + 1
        tried.append(best)
        break
    return tried


# ---------------------------------------------------------------------------------------
# the command


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def amount(n: int, unit: int) -> str:
    return f"{n / unit:.2f}"


def describe(s: Setting, where: str) -> list[str]:
    """The lines above the table: the model, the step, the devices."""
    a, cfg, p = s.args, s.cfg, s.cfg.parallel
    heads = f"{a.n_heads} heads" + (f", {a.kv_heads} kv heads" if a.kv_heads != a.n_heads else "")
    chunk = loss_phrase(p)
    extra = [f"model.quantize {cfg.model.quantize}"] if cfg.model.quantize != "none" else []
    extra += [f"optim {cfg.optim.name}"] + (["packed rows"] if s.shape.segments else [])
    extra += ["activation offload"] if p.activation_offload else []
    device = "GPU" if s.shape.target == "cuda" else "CPU process"
    devices = f"{s.nproc} {device}" + ("" if s.nproc == 1 else "es" if device.endswith("s") else "s")
    sharding = "" if s.nproc == 1 else (f", HSDP: {p.replicate} copies sharded over {s.nproc // p.replicate}"
                                       if p.replicate > 1 else " (FSDP2 shards over all of them)")
    return [f"model: {where} (dim {a.dim:,}, {a.n_layers} layers, {heads}, vocab {a.vocab_size:,})",
            f"stage {cfg.stage}: micro-batch {s.shape.micro_batch_size} × {s.shape.seq_len:,} tokens, "
            f"grad_accum {cfg.optim.grad_accum}, {p.precision}, checkpointing {p.activation_checkpointing}, "
            f"{chunk}; {', '.join(extra)}",
            f"on {devices}{sharding}"]


def render(plan: Plan, where: str, budget: int, tried: list[Tried], measured: int | None) -> str:
    """The plan as the command prints it: the setting, a table per GPU, the verdict, and
    the change that makes it fit."""
    s, snap = plan.setting, plan.phases[plan.peak]
    unit, name = (GIB, "GiB") if plan.needed >= GIB else (2**20, "MiB")
    per = "GPU" if s.shape.target == "cuda" else "process"
    lines = describe(s, where) + ["", f"{'per ' + per:<30}{name:>8}"]
    lines += [f"  {LABELS[c]:<28}{amount(snap[c], unit):>8}" for c in CATEGORIES]
    others = ", ".join(f"{p} {amount(sum(plan.phases[p].values()), unit)}" for p in PHASES if p != plan.peak)
    lines.append(f"  {'total (peak: ' + plan.peak + ')':<28}{amount(plan.total, unit):>8}   ({others})")
    if plan.allowance:
        lines.append(f"  {'+ CUDA context, allocator':<28}{amount(plan.allowance, unit):>8}   "
                     "(an allowance, not counted)")
    fits = plan.needed <= budget
    lines.append(f"  {'needed':<28}{amount(plan.needed, unit):>8}   of {gib(budget)} GiB: "
                 f"{'fits' if fits else 'does not fit'}")
    if measured is not None:
        error = (plan.total - measured) / measured
        lines.append(f"  {'measured (the real step)':<28}{amount(measured, unit):>8}   the plan's total is "
                     f"{error:+.1%} off")
    lines += [f"note: {n}" for n in plan.notes]
    if not fits:
        lines.append("")
        found = [t for t in tried if t.fits]
        for t in found:
            note = f" ({t.change.note})" if t.change.note else ""
            lines.append(f"It fits with one change, {t.family}: {t.change.flags}{note}: "
                         f"{gib(t.needed)} GiB needed")
        if not found:
            lines.append("No single change makes it fit; combine some of these:")
        lines += [f"  not enough alone: {t.change.flags}: {gib(t.needed)} GiB needed"
                  for t in tried if not t.fits]
    return "\n".join(lines)


def as_json(plan: Plan, budget: int, tried: list[Tried], measured: int | None) -> dict[str, Any]:
    s = plan.setting
    return {"config": to_dict(s.cfg), "args": s.args.to_params(), "nproc": s.nproc,
            "device": s.shape.target, "seq_len": s.shape.seq_len, "peak_phase": plan.peak,
            "phases": plan.phases, "total": plan.total, "allowance": plan.allowance, "needed": plan.needed,
            "gpu_memory": budget, "fits": plan.needed <= budget, "host_bytes": plan.host_bytes,
            "notes": plan.notes, "measured": measured,
            "advice": [{"family": t.family, "flags": t.change.flags, "needed": t.needed, "fits": t.fits}
                       for t in tried]}


def run_plan(opts: PlanOptions) -> tuple[Plan, list[Tried], int | None, str]:
    """Plan `opts` (and advise, and measure when asked): (plan, advice, measured bytes,
    what the model is)."""
    if opts.device not in ("cuda", "cpu"):
        raise ConfigError(f"--device: {opts.device!r} is not one of 'cuda', 'cpu'")
    ranks = int(os.environ.get("WORLD_SIZE", 1))  # under torchrun, each process is a rank
    if opts.measure and (opts.size is not None or opts.nproc != ranks):
        raise ConfigError(f"--measure runs the real step of model.path's checkpoint on the {ranks} "
                          f"process{'es' if ranks > 1 else ''} started (torchrun for more): leave out "
                          f"--size, and give --nproc {ranks}")
    cfg = load_config(opts.config, list(opts.overrides))
    args = model_args(cfg, opts.size, opts.vocab)
    cfg, args = adapter_lora(cfg, args)
    where = size_name(opts.size) if opts.size else cfg.model.path
    planner = Planner()
    plan = planner.plan(setting_for(cfg, args, opts.nproc, opts.device))
    tried: list[Tried] = []
    if plan.needed > opts.gpu_memory:
        with tqdm(desc="planning changes", unit="plan", leave=False) as bar:
            tried = advise(planner, plan.setting, opts.gpu_memory, bar)
    measured = measure_step(cfg, plan.setting.shape) if opts.measure else None
    return plan, tried, measured, where


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m train.plan", description=__doc__.split("\n\n")[0],
                       epilog="The rest of the command line is the config's overrides, "
                              "--section.key=value, as for training.")
    p.add_argument("config", help="the training config (YAML) to plan")
    p.add_argument("--nproc", type=positive_int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="GPUs the model is sharded over (default 1; under torchrun, its processes)")
    p.add_argument("--gpu_memory", type=size_option, default="80GiB",
                   help="memory of one GPU, e.g. 24GiB (a '24 GB' RTX 4090) or 80GiB (default)")
    p.add_argument("--size", help=f"plan this named size instead of model.path's checkpoint: {SHORT_SIZES}, "
                                  f"or one of {', '.join(MODEL_SIZES)}")
    p.add_argument("--vocab", type=positive_int, help="vocabulary size (e.g. 32000, 49953, 49954, 55296)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="the device planned for (default cuda; cpu: the CPU's own step)")
    p.add_argument("--measure", action="store_true",
                   help="also run the real step in this process and print its measured peak")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    args, overrides = build_parser().parse_known_args(argv)
    with command_errors():
        for o in overrides:
            if not o.startswith("--") or "=" not in o:
                raise ConfigError(f"{o}: not an option of plan nor a --section.key=value override")
        opts = PlanOptions(args.config, tuple(overrides), args.nproc, args.gpu_memory, args.size,
                           args.vocab, args.device, args.measure)
        plan, tried, measured, where = run_plan(opts)
        if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 speaks for all
            return
        if args.json:
            print(json.dumps(as_json(plan, opts.gpu_memory, tried, measured)))
        else:
            print(render(plan, where, opts.gpu_memory, tried, measured))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
