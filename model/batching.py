"""Several prompts generated together on one model with one KV cache (static batching).

`generate_batch` runs a wave of sequences: their prompts, left-padded to one length, go
through the model in one call, then every unfinished sequence gets one token per step,
each with its own sampling settings and random generator. A finished sequence leaves
the batch (its rows are dropped from the cache), so the rest do not carry it. Each
sequence gets exactly the tokens `generate.generate_ids` gives for its prompt alone:
the same positions (padding is not counted), the same attention (padding is never
attended to), the same sampling code.

`WaveScheduler` is what a server puts in front of it: requests wait in a bounded queue;
whenever the model is free, everything waiting that fits `max_batch_size` becomes the
next wave. A request arriving during a wave waits for the wave's end (static batching,
not continuous batching, where sequences join a running batch between steps).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence as Seq
from dataclasses import dataclass, field

import torch

from .generate import SamplingConfig, next_token
from .llama import KVCache, Transformer


@dataclass(eq=False)
class Sequence:
    """One prompt's generation: what it asks for, and its state as the batch runs.

    Attributes:
        prompt: the prompt's ids (BOS first).
        max_new_tokens: at most this many new tokens (fewer where the model's
            max_seq_len ends first).
        cfg: how each token is chosen.
        generator: the random generator of its sampling (None: torch's default).
        tokens: the new tokens so far (never the stop token).
        finish_reason: None while it runs; "stop" (a stop token), "length" (its budget),
            or whatever the caller sets between steps to end it early (e.g. on a stop
            string, or when its client went away).
    """

    prompt: list[int]
    max_new_tokens: int
    cfg: SamplingConfig
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def token_budget(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> int:
    """How many new tokens a prompt may get: `max_new_tokens`, or what the model's
    context leaves (as `generate_ids` counts it)."""
    return max(min(prompt_len + max_new_tokens, max_seq_len) - prompt_len, 0)


@torch.inference_mode()
def generate_batch(
    model: Transformer,
    seqs: Seq[Sequence],
    *,
    stop_ids: tuple[int, ...] = (),
    allowed_vocab: int | None = None,
) -> Iterator[list[tuple[int, int]]]:
    """Run `seqs` to the end together; after each step yield the (index, token) pairs it
    produced. Between steps the caller may end a sequence by setting its finish_reason.

    Raises:
        ValueError: a prompt that is empty or fills the model's context.
    """
    max_seq_len = model.args.max_seq_len
    for s in seqs:
        if not s.prompt:
            raise ValueError("the prompt needs at least one token (BOS)")
        if len(s.prompt) >= max_seq_len:
            raise ValueError(f"the prompt has {len(s.prompt)} tokens; max_seq_len is {max_seq_len}")
    budgets = [token_budget(len(s.prompt), s.max_new_tokens, max_seq_len) for s in seqs]
    active = [i for i, s in enumerate(seqs) if s.finish_reason is None and budgets[i] > 0]
    for i, s in enumerate(seqs):
        if s.finish_reason is None and budgets[i] == 0:
            s.finish_reason = "length"
    if not active:
        return
    device = model.tok_embeddings.weight.device
    width = max(len(seqs[i].prompt) for i in active)
    pad = [width - len(seqs[i].prompt) for i in active]
    # the padding's id is never seen by a real token; the prompt's first id is as good as any
    tokens = torch.tensor([[seqs[i].prompt[0]] * p + seqs[i].prompt for i, p in zip(active, pad)],
                          device=device)
    left_pad = torch.tensor(pad, device=device) if any(pad) else None
    cache = KVCache(model.args, len(active), width + max(budgets[i] for i in active),
                    device=device, dtype=model.tok_embeddings.weight.dtype)
    start_pos = 0
    while True:
        logits = model(tokens, start_pos=start_pos, cache=cache, left_pad=left_pad)[:, -1]
        if allowed_vocab is not None and allowed_vocab < logits.shape[-1]:
            logits[:, allowed_vocab:] = float("-inf")
        step = []
        for row, i in enumerate(active):
            s = seqs[i]
            context = torch.tensor(s.prompt + s.tokens, device=device)
            token = next_token(logits[row], context, s.cfg, s.generator)
            if token in stop_ids:
                s.finish_reason = "stop"
                continue
            s.tokens.append(token)
            step.append((i, token))
            if len(s.tokens) >= budgets[i]:
                s.finish_reason = "length"
        yield step
        start_pos += tokens.shape[1]
        keep = [row for row, i in enumerate(active) if seqs[i].finish_reason is None]
        if not keep:
            return
        if len(keep) < len(active):  # the finished leave: their cache rows go with them
            index = torch.tensor(keep, device=device)
            cache.keys = [k.index_select(0, index) for k in cache.keys]
            cache.values = [v.index_select(0, index) for v in cache.values]
            left_pad = None if left_pad is None else left_pad.index_select(0, index)
            active = [active[row] for row in keep]
        tokens = torch.tensor([[seqs[i].tokens[-1]] for i in active], device=device)


# --------------------------------------------------------------------------------------
# the queue in front of the model


@dataclass(eq=False)
class Job:
    """One request's sequences, and where its events go.

    Events put on `events`, in order: ("tokens", [(k, token), ..]) after each step that
    gave this job's sequences tokens (k indexes `seqs`), ("done", k) when sequence k has
    finished (its finish_reason says why), ("error", message) if the wave failed.
    """

    seqs: list[Sequence]
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    def cancel(self, reason: str = "cancelled") -> None:
        """End every unfinished sequence of the job at the next step."""
        for s in self.seqs:
            if s.finish_reason is None:
                s.finish_reason = reason


class QueueFull(Exception):
    """No room in the scheduler's queue: the caller should answer "busy" (HTTP 503)."""


class WaveScheduler:
    """One worker thread that runs waves of jobs on a model, fed by a bounded queue.

    Args:
        run_wave: generates a list of sequences to the end, yielding after each step the
            (index, token) pairs produced (`generate_batch` with the model bound).
        max_batch_size: the most sequences in one wave (a job's sequences stay together).
        max_queue: the most jobs waiting; `submit` raises QueueFull beyond it.
        log: told of each wave as it starts (one line), if given.
    """

    def __init__(self, run_wave: Callable[[list[Sequence]], Iterator[list[tuple[int, int]]]],
                 max_batch_size: int, max_queue: int,
                 log: Callable[[str], None] | None = None) -> None:
        self.run_wave, self.log = run_wave, log
        self.max_batch_size = max_batch_size
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._held: Job | None = None  # taken from the queue, too big for the wave at hand
        self._thread = threading.Thread(target=self._work, name="waves", daemon=True)
        self.waves = 0  # how many waves have run, for the log

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Let the running wave end, then stop the worker."""
        self._queue.put(None)
        self._thread.join()

    def submit(self, job: Job) -> None:
        """Queue a job (its sequences are at most max_batch_size).

        Raises:
            QueueFull: the queue holds max_queue jobs already.
        """
        if len(job.seqs) > self.max_batch_size:
            raise ValueError(f"a job of {len(job.seqs)} sequences cannot fit a batch of "
                             f"{self.max_batch_size}")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def _next_wave(self) -> list[Job] | None:
        first = self._held if self._held is not None else self._queue.get()
        self._held = None
        if first is None:
            return None
        wave, size = [first], len(first.seqs)
        while size < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop after this wave
                self._queue.put(None)
                break
            if size + len(job.seqs) > self.max_batch_size:
                self._held = job  # first of the next wave: order is kept
                break
            wave.append(job)
            size += len(job.seqs)
        return wave

    def _work(self) -> None:
        while (wave := self._next_wave()) is not None:
            self.waves += 1
            if self.log is not None:
                self.log(f"wave {self.waves}: {len(wave)} requests, "
                         f"{sum(len(job.seqs) for job in wave)} sequences")
            run_jobs(self.run_wave, wave)


def run_jobs(run_wave: Callable[[list[Sequence]], Iterator[list[tuple[int, int]]]],
             jobs: list[Job]) -> None:
    """Run the sequences of `jobs` as one wave, telling each job what happens to its own."""
    seqs = [s for job in jobs for s in job.seqs]
    owner = [(job, k) for job in jobs for k in range(len(job.seqs))]
    told = [False] * len(seqs)
    try:
        for step in run_wave(seqs):
            by_job: dict[int, tuple[Job, list[tuple[int, int]]]] = {}
            for i, token in step:
                job, k = owner[i]
                by_job.setdefault(id(job), (job, []))[1].append((k, token))
            for job, pairs in by_job.values():
                job.events.put(("tokens", pairs))
            _tell_finished(seqs, owner, told)
        _tell_finished(seqs, owner, told, final=True)
    except Exception as e:  # the wave's requests get the error; the server keeps serving
        for job in jobs:
            job.events.put(("error", f"{type(e).__name__}: {e}"))


def _tell_finished(seqs: list[Sequence], owner: list[tuple[Job, int]], told: list[bool],
                   final: bool = False) -> None:
    for i, s in enumerate(seqs):
        if not told[i] and (s.finish_reason is not None or final):
            if s.finish_reason is None:
                s.finish_reason = "length"
            told[i] = True
            job, k = owner[i]
            job.events.put(("done", k))
