"""One training step's memory, counted on fake tensors, and the same step measured for real.

`trace_step` builds the model of a config as `build_for_stage` does (LoRA, what trains,
frozen dtype, NF4, activation checkpointing, FSDP2 over a fake process group of
`world_size` ranks), but under torch's `FakeTensorMode`: every tensor has its shape, dtype
and storage size and none has data, so a 65B-wide layer costs what a tiny one does. It
then runs one optimizer step — `forward_loss` and backward of a micro-batch, the stage's
gradient mask, clipping, the optimizer — with `StepMemory` watching: a dispatch mode that
sees every tensor the step creates, keeps the bytes of each live storage (weak references
tell it when one dies; FSDP2 frees and refills its gathered parameters by resizing
storages, which the mode follows too) and records each phase's peak by category.

`trainer.train_step` itself cannot run on fake tensors: it reads token counts, the loss
and the norm as Python numbers, which a tensor without data does not have. The traced
step calls the same pieces in the same order and leaves those readings out (they hold no
memory).

Why not torch's own `MemTracker` (torch.distributed._tools): it registers a gradient hook
on every parameter and fails on frozen ones (LoRA's base, stage 1's blocks), and it
attributes memory by module calls, which never see `Transformer.loss` (the trainer calls a
method, not the module).

`measure_step` runs the real thing for comparison: the model built by `build_for_stage`
from a checkpoint, two real `train_step`s and optimizer steps, the second measured. On
CUDA the number is `torch.cuda.max_memory_allocated`; on the CPU it is the CPU
allocator's own count of live bytes, from torch's profiler (`profile_memory`: every
allocation and free with its size and time). The CPU's resident set (`VmHWM`) would count
the allocator's cached pages, the libraries and Python's own objects too; the allocator's
count is the quantity `max_memory_allocated` is on a GPU, which is what a plan predicts.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass, \
    is_traceable_wrapper_subclass_type
from torch.utils.weak import WeakIdKeyDictionary

from model.llama import ModelArgs, resolve_packed_attention
from model.source import Checkpoint, expected_shapes
from model.tensor_io import TensorSpec, parse_dtype

from .config import TrainConfig
from .distributed import make_mesh
from .optim import build_optimizer
from .stages import STAGES, Stage, check_quantize, load_weights, sharded_meta_model
from .trainer import StepOptions, forward_loss

PHASES = ("forward", "backward", "optimizer")
CATEGORIES = ("parameters", "gradients", "optimizer state", "activations", "loss", "temporary")
# Ops whose outputs are FSDP's gathering and reducing buffers, not what a model computes.
_COMMUNICATION = ("fsdp", "c10d", "_c10d_functional")
# FSDP2 also makes such buffers with plain torch.empty; the code that calls an op tells
# them apart, found past the decorators torch wraps FSDP's functions in.
_FSDP_CODE = f"{os.sep}distributed{os.sep}fsdp{os.sep}"
_WRAPPERS = tuple(os.path.join("torch", *p) for p in (("_compile.py",), ("_dynamo", "eval_frame.py"),
                                                       ("utils", "_contextlib.py")))


def called_by_fsdp(frame: Any, depth: int = 6) -> bool:
    """Whether the code that called an op (from `frame` outwards, decorators skipped) is
    FSDP's own."""
    for _ in range(depth):
        if frame is None:
            return False
        name = frame.f_code.co_filename
        if _FSDP_CODE in name:
            return True
        if not name.endswith(_WRAPPERS):
            return False
        frame = frame.f_back
    return False
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to this


def storages(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """The storages holding a tensor's data: its own, or those of the plain tensors inside a
    wrapper subclass (a DTensor's shard; an NF4 weight's codes, scales and table)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from storages(inner)
    else:
        yield t.untyped_storage()


@dataclass
class _Stored:
    category: str
    nbytes: int
    ref: Any = None  # the weak reference whose callback drops it


class StepMemory(TorchDispatchMode):
    """Bytes of every live storage the step made or was given, and each phase's peak.

    Storages are counted when an op returns them (or `add` is given them); a storage made
    in the forward is an activation (after the final norm, the loss's), one made later is
    temporary, one of FSDP's buffers (made by its gathering ops or its own code, or a
    storage it resizes) is temporary wherever it is made, and so are FSDP's unsharded
    parameters (`gathered()`).
    At every new peak of a phase, the gradients then alive (`grads()`) are moved into
    their own category.

    Args:
        grads: the trainable parameters' gradients at this moment.
        gathered: the parameters the modules hold at this moment that are not the sharded
            ones (FSDP swaps in the unsharded ones while a module runs).
        block: allocations are rounded up to a multiple of this (CUDA's allocator: 512).
    """

    def __init__(self, grads: Callable[[], Iterable[torch.Tensor | None]],
                 gathered: Callable[[], Iterable[torch.Tensor]], block: int = 1) -> None:
        super().__init__()
        self._grads, self._gathered, self._block = grads, gathered, block
        self._stored: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.phase = "forward"
        self.category = "activations"  # of what the forward makes now (see `loss_begins`)
        self.peaks: dict[str, dict[str, int]] = {}

    def _size(self, st: torch.UntypedStorage) -> int:
        n = st.nbytes()
        return -(-n // self._block) * self._block

    def add(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Count tensors made before the step (parameters, optimizer state)."""
        for t in tensors:
            for st in storages(t):
                self._see(st, category)

    def _see(self, st: torch.UntypedStorage, category: str) -> None:
        known = self._stored.get(st)
        if known is None:
            entry = _Stored(category, self._size(st))
            entry.ref = weakref.ref(st, functools.partial(self._dropped, entry))
            self._stored[st] = entry
            self._count(entry, entry.nbytes)
        elif known.nbytes != self._size(st):  # grown in place (resize_ as an op)
            self._count(known, self._size(st) - known.nbytes)
            known.nbytes = self._size(st)

    def _count(self, entry: _Stored, delta: int) -> None:
        self.live[entry.category] += delta
        self.total += delta

    def _dropped(self, entry: _Stored, _ref: Any) -> None:
        self._count(entry, -entry.nbytes)
        entry.nbytes = 0

    def resized(self, st: torch.UntypedStorage) -> None:
        """FSDP2 frees and refills its gathered parameters by resizing their storages."""
        entry = self._stored.get(st)
        if entry is None:
            self._see(st, "temporary")
            return
        if entry.category != "temporary":
            self.live[entry.category] -= entry.nbytes
            self.live["temporary"] += entry.nbytes
            entry.category = "temporary"
        self._count(entry, self._size(st) - entry.nbytes)
        entry.nbytes = self._size(st)
        self._peak()

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.category = "activations" if phase == "forward" else "temporary"

    def loss_begins(self, *_: Any) -> None:
        """A forward hook on the final norm: what follows it in the forward is the loss's."""
        if self.phase == "forward":
            self.category = "loss"

    def _peak(self) -> None:
        if self.total <= sum(self.peaks.get(self.phase, {}).values()):
            return
        for p in self._gathered():  # FSDP's unsharded parameters, first made by plain ops
            for st in storages(p):
                entry = self._stored.get(st)
                if entry is not None and entry.category in ("activations", "loss"):
                    self.live[entry.category] -= entry.nbytes
                    self.live["temporary"] += entry.nbytes
                    entry.category = "temporary"
        snap = dict(self.live)
        counted: set[int] = set()
        for g in self._grads():
            for st in storages(g) if g is not None else ():
                entry = self._stored.get(st)
                if entry is not None and id(entry) not in counted:
                    counted.add(id(entry))
                    snap[entry.category] -= entry.nbytes
                    snap["gradients"] += entry.nbytes
        self.peaks[self.phase] = snap

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        # A wrapper subclass (DTensor, NF4) first runs its own dispatch, whose ops on the
        # plain tensors inside come back here.
        if any(is_traceable_wrapper_subclass_type(t) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        fsdp = func.namespace in _COMMUNICATION or (
            self.category != "temporary" and called_by_fsdp(sys._getframe(1)))
        category = "temporary" if fsdp else self.category
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._see(t.untyped_storage(), category)
        self._peak()
        return out

    @contextlib.contextmanager
    def watching_resizes(self) -> Iterator[None]:
        """Follow `UntypedStorage.resize_`, which no dispatch mode sees (restored after)."""
        original = torch.UntypedStorage.resize_

        def resize_(st: torch.UntypedStorage, size: int) -> Any:
            out = original(st, size)
            self.resized(st)
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        try:
            yield
        finally:
            torch.UntypedStorage.resize_ = original  # type: ignore[method-assign]


@contextlib.contextmanager
def fake_ranks(world_size: int, replicate: int = 1) -> Iterator[Any]:
    """The device mesh a run of `world_size` ranks makes (HSDP's 2-D one with `replicate`
    > 1: `distributed.make_mesh`), over torch's fake process group (collectives that move
    nothing), this process being rank 0; the group is destroyed after.

    Raises:
        RuntimeError: this process already has a process group (a training run's).
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a memory plan needs a process without a process group of its own "
                           "(it makes a fake one of the planned ranks)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield make_mesh(torch.device("cpu"), world_size, replicate)
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class StepShape:
    """What one traced step runs: the batches and how the step treats them."""

    micro_batch_size: int
    seq_len: int
    micro_batches: int  # per optimizer step (grad_accum)
    segments: bool  # packed rows / document masks: segment ids go with the tokens
    target: str  # "cuda" or "cpu": the device whose kernels and allocator the trace follows


def planning_checkpoint(args: ModelArgs, dtype: torch.dtype) -> Checkpoint:
    """A checkpoint of `args` whose tensors are made when asked for: fake ones (no values)
    under the trace's FakeTensorMode, for `load_weights` to fill the model from."""
    shapes = expected_shapes(args)
    return Checkpoint("plan", None, args, {n: TensorSpec(s, dtype) for n, s in shapes.items()},
                      lambda name: torch.empty(shapes[name], dtype=dtype))


def build_traced_model(cfg: TrainConfig, stage: Stage, mesh: Any) -> nn.Module:
    """The model `build_for_stage` makes, on the meta device: LoRA, what trains, frozen
    weights in model.dtype (NF4 with model.quantize), checkpointing, FSDP2 over `mesh`.
    `to_empty` and `load_weights` under a FakeTensorMode then give it fake storage."""
    check_quantize(cfg)
    return sharded_meta_model(cfg, stage, mesh)


def as_on_cuda(optimizer: torch.optim.Optimizer) -> None:
    """torch's AdamW as `build_optimizer` makes it on CUDA: fused (one kernel, no
    temporaries) instead of the CPU's foreach."""
    for group in optimizer.param_groups:
        group["foreach"], group["fused"] = False, True


def adamw8bit_state_bytes(params: Iterable[torch.Tensor], block: int = 256) -> int:
    """torchao's AdamW8bit state for these (local) parameters: each moment of a tensor of
    at least 4,096 elements (a multiple of `block`) as 8-bit codes, a float32 scale per
    block and its 256-entry table; smaller tensors' moments in float32; a step counter."""
    total = 0
    for p in params:
        n = p.to_local().numel() if hasattr(p, "to_local") else p.numel()
        moment = n + n // block * 4 + 256 * 4 if n >= 4096 and n % block == 0 else 4 * n
        total += 2 * moment + 4
    return total


def micro_batch(shape: StepShape) -> dict[str, torch.Tensor]:
    size = (shape.micro_batch_size, shape.seq_len)
    batch = {"tokens": torch.zeros(size, dtype=torch.long), "labels": torch.zeros(size, dtype=torch.long)}
    if shape.segments:
        batch["segment_ids"] = torch.zeros(size, dtype=torch.long)
    return batch


def trace_step(cfg: TrainConfig, args: ModelArgs, shape: StepShape,
               world_size: int) -> dict[str, dict[str, int]]:
    """Each phase's peak bytes by category (`CATEGORIES`) on one rank, for one optimizer
    step of `cfg` on a model of `args` (any number of layers) over `world_size` ranks
    (sharded over all of them, or with parallel.replicate over each shard group).

    One micro-batch is traced; with grad_accum >= 2 the later ones run as it did, but with
    the whole step's gradients held (accumulated into, not made anew).
    torchao's AdamW8bit compiles its step (which fake tensors cannot go through): it is
    traced as a fused AdamW (no temporaries either) with its own state's bytes. Packed rows
    on CUDA attend through flex attention (whose backward has no CPU kernel, fake or not)
    or varlen flash attention (CUDA-only): they are traced as causal rows, which keep what
    those fused kernels keep (the output and the log-sum-exp); the block mask or offsets
    and the rows' positions take a few MB more. With model.packed_attention: sdpa they
    keep the dense mask, as on the CPU.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if shape.segments and resolve_packed_attention(cfg.model.packed_attention, shape.target) in ("flex", "varlen"):
        shape = replace(shape, segments=False)  # see the docstring
    eight_bit = cfg.optim.name == "adamw8bit"
    if eight_bit:
        cfg = replace(cfg, optim=replace(cfg.optim, name="adamw"))
    stage = STAGES[cfg.stage](cfg, planning_checkpoint(args, parse_dtype(cfg.model.dtype)))
    with fake_ranks(world_size, cfg.parallel.replicate) as mesh:
        model = build_traced_model(cfg, stage, mesh)
        # the meta model's tensors become fake ones (meta tensors cannot compute on "cpu")
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            load_weights(model, stage.base, cfg.seed, stage.init)  # NF4 weights are put in here
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = build_optimizer(model, cfg.optim, stage.no_decay)
            if shape.target == "cuda" or eight_bit:
                as_on_cuda(optimizer)
            for p in params:  # the optimizer's state, as after the first step
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            opts = StepOptions(cfg.parallel.loss_chunk_size, cfg.optim.clip_grad_norm, stage.mask_grads)
            memory = StepMemory(lambda: [p.grad for p in params],
                                lambda: [p for p in model.parameters() if not isinstance(p, DTensor)],
                                CUDA_BLOCK if shape.target == "cuda" else 1)
            memory.add([*model.parameters(), *model.buffers()], "parameters")
            moments = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
            memory.add(moments, "optimizer state")
            hook = model.norm.register_forward_hook(memory.loss_begins)
            try:
                with memory.watching_resizes(), memory:
                    traced_step(model, micro_batch(shape), params, opts, optimizer, memory)
            finally:
                hook.remove()
    peaks = {phase: memory.peaks.get(phase, dict.fromkeys(CATEGORIES, 0)) for phase in PHASES}
    if shape.micro_batches > 1:  # the step's gradients are whole from the second on
        held = peaks["optimizer"]["gradients"]
        for phase in ("forward", "backward"):
            peaks[phase]["gradients"] = max(peaks[phase]["gradients"], held)
    if eight_bit:
        state = adamw8bit_state_bytes(params)
        for phase in PHASES:
            peaks[phase]["optimizer state"] = state
    return peaks


def traced_step(model: nn.Module, batch: dict[str, torch.Tensor], params: list[nn.Parameter],
                opts: StepOptions, optimizer: torch.optim.Optimizer, memory: StepMemory) -> None:
    """`train_step` of one micro-batch and the optimizer step, as the loop runs them, minus
    the Python numbers."""
    memory.set_phase("forward")
    loss = forward_loss(model, batch, opts.chunk_size, "cpu")
    memory.set_phase("backward")
    loss.backward()
    del loss
    memory.set_phase("optimizer")
    if opts.mask_grads is not None:
        opts.mask_grads(model)
    torch.nn.utils.clip_grad_norm_(params, opts.clip_grad_norm or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def real_batch(shape: StepShape, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tokens of the planned shape (two documents a row when segments are on)."""
    g = torch.Generator().manual_seed(seed)
    size = (shape.micro_batch_size, shape.seq_len)
    tokens = torch.randint(0, vocab_size, size, generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    batch = {"tokens": tokens, "labels": labels}
    if shape.segments:
        batch["segment_ids"] = (torch.arange(shape.seq_len) >= shape.seq_len // 2).long().expand(size).clone()
    return batch


def allocator_peak(events: Iterable[Any], start_ns: int, end_ns: int) -> int:
    """The most bytes the CPU allocator held between two times, from the profiler's memory
    events (each an allocation or, negative, a free, made while profiling)."""
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.start_ns() > end_ns:
            break
        live += e.nbytes()
        if e.start_ns() >= start_ns:
            peak = max(peak, live)
    return peak


def measure_step(cfg: TrainConfig, shape: StepShape) -> int:
    """The peak bytes of the real second step of `cfg` in this process (one rank): see the
    module docstring for what is counted on CUDA and on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    from .distributed import setup, teardown

    cuda = shape.target == "cuda"
    own_group = not dist.is_initialized()
    info = setup("nccl" if cuda else "gloo", cfg.parallel.replicate)
    try:
        if cuda:
            return two_steps(cfg, shape, info)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            two_steps(cfg, shape, info)
            # Everything made while profiling is freed while profiling: the allocator's
            # reporter remembers the sizes of live blocks across sessions, and a block
            # freed later would be counted, wrongly, as freed in the next one.
            gc.collect()
        results = prof.profiler.kineto_results
        mark = next(e for e in results.events() if e.name() == MEASURED)
        memory = [e for e in results.events() if e.name() == "[memory]"]
        return allocator_peak(memory, mark.start_ns(), mark.end_ns())
    finally:
        if own_group:
            teardown()


MEASURED = "zhllama.measured_step"


def two_steps(cfg: TrainConfig, shape: StepShape, info: Any) -> int:
    """Build the model from its checkpoint and run two real steps, the second inside a
    profiler mark; returns CUDA's peak allocated bytes of the second (0 on the CPU). All
    it makes is freed when it returns."""
    from torch.profiler import record_function

    from .optim import LossScaler
    from .stages import build_for_stage
    from .trainer import step_options, train_step

    cuda = shape.target == "cuda"
    built = build_for_stage(cfg, info)
    model, vocab_size = built.model, built.base.args.vocab_size
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.optim, built.stage.no_decay)
    opts, scaler = step_options(cfg, built), LossScaler(cfg.parallel.precision == "fp16")
    del built  # the checkpoint read (host memory, whatever the device) is no part of the step
    gc.collect()
    # the third and later micro-batches of a step repeat the second
    batches = [real_batch(shape, vocab_size, cfg.seed + i) for i in range(min(shape.micro_batches, 2))]
    for step in range(2):
        if step == 1 and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with record_function(MEASURED) if step == 1 else contextlib.nullcontext():
            train_step(model, batches, params, opts, info, scaler)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() if cuda else 0
