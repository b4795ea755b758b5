"""Does extending the vocabulary help? A miniature reproduction, at equal compute.

    python experiments/vocab_extension.py --base MODEL --tokenizer TOK --zh_corpus FILES \\
        [--en_corpus FILES] --out DIR [--seeds 3] [--jobs 2] [--tiny] [--overwrite]

Chinese-LLaMA's central claim is that a base model learns Chinese better with Chinese
pieces added to its vocabulary than with byte fallback. This script tests it on a small
real LLaMA (e.g. llama2.c's stories260K, trained on English TinyStories, and its 512-piece
tokenizer with byte fallback), running every step as the `zhllama` command a user would
run, each in its own process (one thread each, --jobs at once; see Runner), and printing
each command line and each figure. The vocabulary is extended as Chinese-LLaMA did it:
`zhllama merge-tokenizer` with its defaults, the published merge. The arms, all trained
on the same Chinese text:
  a  no vocabulary extension: Chinese goes through the base's byte fallback
  b  extension (zhllama train-tokenizer + merge-tokenizer), new rows initialised to the
     mean of the old rows (zhllama resize --init mean)
  c  extension, sub-token initialisation (--init subtoken: each new row the mean of the
     rows of the pieces the old tokenizer splits its text into)
  d  extension, random initialisation (--init normal)
  e  the best of b–d, with stage 1 first (only the new embedding and output rows train,
     on the first quarter of the characters) and stage 2 on the rest
  f  the better of that best and e, with 20% of the training blocks English (replay,
     data.sources), as many steps as the arm it is built on
Stage 2 is LoRA on every projection plus the whole embedding and output (Chinese-LLaMA's
stage 2); configs/tiny/stage1.yaml and stage2.yaml give every setting not named here.
"Best" is the lowest mean bits per character on a Chinese development set, decided by
this rule, never by hand; the figures reported are on separate Chinese and English test
sets.

Equal compute: every arm reads the same number of characters of Chinese training text
(arm f: the same steps as its counterpart, a fifth of the blocks English). A byte-fallback
token holds less text than a merged piece, so each arm's steps are computed from its
tokens per character on the training text (with each document's <s> and </s>), printed
and recorded. Bits per character (`zhllama evaluate`: the summed NLL in bits over the
characters of the text) compare across tokenizers; loss per token does not.

Data, under --out only (the inputs are read, never written):
  * Chinese: the documents (lines) of --zh_corpus in order; every 10th (10th, 20th, …)
    is the test set, every 20th from the 5th (5th, 25th, …) the development set, the rest
    training text. The Chinese tokenizer is trained on the training part only.
  * English: the documents of --en_corpus (every 10th the test set, the rest replay text);
    without it, the base model's own text: continuations of fixed TinyStories-like prompts
    sampled from its distribution (`zhllama generate`, temperature 1, prompt i with seed
    i); every 4th prompt's text is the test set, the rest replay text. Bits/char on them
    are the base's cross-entropy on its own text, so a rise after Chinese training is what
    that training changed. (Greedy continuations would not do: they loop, and when a story
    ends each restarts the base's one favourite story, which would then sit verbatim in
    both the replay and the test text.)

Results: DIR/results.md (the table), DIR/results.json (every figure of every seed, the
commands' settings), DIR/vocab_extension.png (bits/char per arm, Chinese and English,
mean with min–max over seeds), DIR/logs/ (each command's output), DIR/runs/ (the training
runs). The default size is about 5,500 optimizer steps of 8 x 256 tokens in all (about
half an hour on 2 CPU cores of its own; an hour and more when they are shared); --tiny a
minute or two.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import itertools
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from tokenizer.cli import (INTERRUPTED_EXIT, ArgumentParser, CommandError, command_errors,
                           positive_int)
from tokenizer.files import atomic_output_file, check_output_against_inputs

T = TypeVar("T")
R = TypeVar("R")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
MARKER = "experiment.json"  # written first: what --overwrite may remove is ours
# TinyStories-like openings and names: prompt i is OPENINGS[i % 6] with NAMES[(i // 6 + i) % 6],
# so the first prompts vary in both and the 36 combinations are all distinct
OPENINGS = ("Once upon a time, {}", "One day, {}", "{} liked to", "{} and Mom went to the",
            "{} found a", "It was a sunny day. {}")
NAMES = ("Lily", "Tom", "Ben", "Mia", "Max", "Sue")
# each command on one thread (two commands at once on 2 cores), on the CPU whatever is there
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
# what the commands' server imports once (the rest each command imports itself)
PRELOAD = ["torch", "numpy", "sentencepiece", "train.cli", "train.pretrain", "train.evaluate",
           "model.generate", "model.resize", "model.convert", "data.prepare", "tokenizer.train",
           "tokenizer.merge"]


@dataclass(frozen=True)
class Size:
    """How big the experiment is: fixed before any run (the defaults fit about 30 minutes
    on 2 CPU cores), never adjusted to the results."""

    train_chars: int = 500_000  # characters of Chinese training text each arm reads
    block_size: int = 256  # tokens per training block and per evaluation window
    micro_batch: int = 8  # blocks per step (grad_accum 1)
    zh_vocab: int = 3000  # pieces of the Chinese tokenizer (BPE) merged into the base's
    char_coverage: float = 0.99  # of the Chinese tokenizer: rarer characters stay bytes
    zh_docs: int | None = None  # use only the first N documents of --zh_corpus
    en_prompts: int = 36  # generated English: prompts (at most 36), en_tokens new tokens each
    en_tokens: int = 384
    stage1_share: float = 0.25  # arm e: the share of the characters stage 1 reads
    replay: float = 0.2  # arm f: the share of the blocks that are English


DEFAULT = Size()
TINY = Size(train_chars=3000, block_size=64, micro_batch=4, zh_vocab=2000, char_coverage=0.98,
            zh_docs=80, en_prompts=4, en_tokens=48)


@dataclass(frozen=True)
class Options:
    """The whole experiment: inputs, output directory and size."""

    base: Path  # any checkpoint `zhllama convert` reads
    tokenizer: Path  # the base's sentencepiece model
    zh_corpus: tuple[Path, ...]
    out: Path
    en_corpus: tuple[Path, ...] = ()  # none: the base model's own samples
    seeds: int = 3
    jobs: int = 2  # commands at once, one thread each
    size: Size = DEFAULT
    overwrite: bool = False


@dataclass(frozen=True)
class Arm:
    """One way of teaching the base Chinese."""

    key: str
    init: str | None  # None: no vocabulary extension
    stage1: bool = False  # stage 1 (new rows only) before stage 2
    replay: float = 0.0  # share of English blocks
    counterpart: str | None = None  # the arm whose steps this one takes (replay)

    @property
    def label(self) -> str:
        text = "no extension (byte fallback)" if self.init is None else f"extension, {self.init} init"
        text += ", stage 1 + 2" if self.stage1 else ", stage 2"
        return text + (f", {self.replay:.0%} English replay" if self.replay else "")

    @property
    def short(self) -> str:
        """The arm in a few words, for the picture."""
        text = f"{self.key}: {self.init or 'bytes'}" + ("\nstage 1 + 2" if self.stage1 else "")
        return text + (f"\n{self.replay:.0%} en" if self.replay else "")


BASE_ARMS = (Arm("a", None), Arm("b", "mean"), Arm("c", "subtoken"), Arm("d", "normal"))


@dataclass(frozen=True)
class Layout:
    """Where everything goes under --out."""

    out: Path

    @property
    def corpus(self) -> Path:  # the splits of the Chinese and English text
        return self.out / "corpus"

    @property
    def models(self) -> Path:  # the converted base and the resized starting points
        return self.out / "models"

    @property
    def tokenizers(self) -> Path:  # the Chinese sentencepiece model and the merged one
        return self.out / "tokenizers"

    @property
    def tokens(self) -> Path:  # the training text's token shards
        return self.out / "tokens"

    @property
    def runs(self) -> Path:  # the training runs, ARM-seedN/stage1|stage2
        return self.out / "runs"

    @property
    def logs(self) -> Path:  # each command's output
        return self.out / "logs"


def run_command_here(argv: Sequence[str], stdout: Path, stderr: Path) -> None:
    """In the command's own process: `zhllama ARGV` on one thread, its output to files."""
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), fd)
    os.environ.update(CHILD_ENV)
    import torch

    torch.set_num_threads(1)
    from train.cli import main

    try:
        main(list(argv))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class Runner:
    """Runs `zhllama` commands, each in a process of its own on one thread, `jobs` at once;
    prints each command line, keeps each one's output in a log, and stops the others when
    one fails.

    A command's process is forked from a server that has imported torch and zhllama once
    (multiprocessing's forkserver, which has started no threads), and runs exactly what
    the `zhllama` console script runs, train.cli.main(ARGS): the same work, without paying
    seconds of imports for each of the experiment's many short commands.
    """

    def __init__(self, logs: Path, jobs: int) -> None:
        import multiprocessing

        self.logs, self.jobs = logs, jobs
        self._lock = threading.Lock()
        self._running: set[Any] = set()
        self._stopping = False
        self._count = itertools.count(1)
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD)

    def say(self, text: str) -> None:
        with self._lock:
            print(text, flush=True)

    def zhllama(self, tag: str, *args: str) -> str:
        """Run `zhllama ARGS`; return what it printed on stdout (its log holds both streams)."""
        with self._lock:
            if self._stopping:
                raise CommandError("stopped: another command failed")
            n = next(self._count)
            stem = self.logs / f"{n:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', tag)}-{args[0]}"
            line = shlex.join(["zhllama", *args])
            print(f"[{tag}] $ {line}", flush=True)
            out, err, log = (stem.with_suffix(s) for s in (".out", ".err", ".log"))
            proc = self._context.Process(target=run_command_here, args=(args, out, err))
            proc.start()
            self._running.add(proc)
        try:
            proc.join()
        finally:
            with self._lock:
                self._running.discard(proc)
        stdout, stderr = (p.read_text(encoding="utf-8", errors="replace") if p.exists() else ""
                          for p in (out, err))
        log.write_text(f"$ {line}\n{stdout}{stderr}", encoding="utf-8")
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        if proc.exitcode == INTERRUPTED_EXIT:
            raise KeyboardInterrupt
        if proc.exitcode:
            lines = [l.strip() for l in stderr.splitlines() if l.strip()]
            said = [l[len("error:"):].strip() for l in lines if l.startswith("error:")]
            detail = said[-1] if said else lines[-1] if lines else f"exit status {proc.exitcode}"
            raise CommandError(f"[{tag}] `zhllama {args[0]}` failed: {detail} (its output: {log})")
        return stdout

    def stop(self) -> None:
        """End the commands still running (after one failed)."""
        with self._lock:
            self._stopping = True
            for proc in self._running:
                proc.terminate()

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn over items, `jobs` at a time, in order; the first failure stops the rest."""
        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            futures = [pool.submit(fn, item) for item in items]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                self.stop()
                raise


# ---------------------------------------------------------------------------------------
# data


def read_documents(paths: Iterable[Path]) -> list[str]:
    """The documents of text files, one per line, as `zhllama prepare` reads them: the line
    without its "\\n" or "\\r\\n", blank lines skipped."""
    docs = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        docs += [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
    return docs


def split_chinese(docs: Sequence[str]) -> dict[str, list[str]]:
    """Every 10th document the test set, every 20th from the 5th the development set, the
    rest training text: fixed by position, spread over the whole corpus."""
    parts: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for i, doc in enumerate(docs):
        parts["test" if i % 10 == 9 else "dev" if i % 20 == 4 else "train"].append(doc)
    return parts


def split_english(docs: Sequence[str], every: int) -> dict[str, list[str]]:
    """Every `every`-th document the test set, the rest replay text."""
    return {"replay": [d for i, d in enumerate(docs) if i % every != every - 1],
            "test": [d for i, d in enumerate(docs) if i % every == every - 1]}


def prompts(n: int) -> list[str]:
    """The first n of the 36 fixed English prompts."""
    if not 0 < n <= len(OPENINGS) * len(NAMES):
        raise ValueError(f"en_prompts: between 1 and {len(OPENINGS) * len(NAMES)}, got {n}")
    return [OPENINGS[i % len(OPENINGS)].format(NAMES[(i // len(OPENINGS) + i) % len(NAMES)])
            for i in range(n)]


def write_documents(path: Path, docs: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    return path


def token_count(token_dir: Path) -> int:
    return int(json.loads((token_dir / "meta.json").read_text())["num_tokens"])


def pieces(tokenizer_file: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_file)).vocab_size()


# ---------------------------------------------------------------------------------------
# the figures


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def evaluation(runner: Runner, tag: str, lay: Layout, model: Path, adapter: Path | None,
               block_size: int) -> dict[str, float]:
    """Bits per character of a model (with an adapter) on the three held-out sets."""
    sets = {"zh": lay.corpus / "zh-test.txt", "zh_dev": lay.corpus / "zh-dev.txt",
            "en": lay.corpus / "en-test.txt"}
    args = ["evaluate", str(model), "--input", *map(str, sets.values()), "--block_size",
            str(block_size), "--device", "cpu", "--json"]
    if adapter is not None:
        args[2:2] = ["--lora_model", str(adapter)]
    rows = [json.loads(l) for l in runner.zhllama(tag, *args).splitlines() if l.startswith("{")]
    by_input = {r["input"]: r for r in rows}
    got = {name: float(by_input[str(path)]["bpc"]) for name, path in sets.items()}
    runner.say(f"[{tag}] bits/char: zh test {got['zh']:.4f}, zh dev {got['zh_dev']:.4f}, "
               f"en test {got['en']:.4f}")
    for name, value in got.items():
        if not (math.isfinite(value) and value > 0):
            raise CommandError(f"[{tag}] bits/char on {name} is {value}: the run diverged")
    return got


def final_loss(run_dir: Path) -> float:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r["loss"] for r in rows if "loss" in r][-1]


# ---------------------------------------------------------------------------------------
# the experiment


@dataclass
class Plan:
    """What the preparation found: token counts, tokenizer sizes, steps per arm."""

    tokens_per_char: dict[str, float] = field(default_factory=dict)  # zh-base, zh-merged, en
    pieces: dict[str, int] = field(default_factory=dict)  # base, merged
    steps: dict[str, list[int]] = field(default_factory=dict)  # arm → [stage 1, stage 2]
    chars: dict[str, dict[str, int]] = field(default_factory=dict)  # arm → {zh, en} read


def config(name: str) -> str:
    """configs/tiny/NAME, relative to the working directory when it lies below it (so the
    commands print as a user in the checkout would type them)."""
    path = CONFIGS / name
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else relative


def training_args(size: Size, seed: int, steps: int) -> list[str]:
    """What every training run shares (besides configs/tiny's settings)."""
    return [f"--seed={seed}", f"--optim.max_steps={steps}", f"--data.block_size={size.block_size}",
            f"--optim.micro_batch_size={size.micro_batch}", "--optim.grad_accum=1",
            "--optim.warmup_steps=null",  # warmup_ratio (5% of the steps), whatever the steps
            "--data.val_fraction=0", "--log.eval_every=0", f"--log.every={max(1, steps // 10)}",
            "--checkpoint.every=0", "--checkpoint.keep_last=1", "--log.plot=false",
            "--parallel.activation_checkpointing=none"]


class Experiment:
    """The steps in order: data, base, tokenizers, token shards, arms, results."""

    def __init__(self, opts: Options) -> None:
        self.opts, self.size, self.lay = opts, opts.size, Layout(opts.out)
        self.runner = Runner(self.lay.logs, opts.jobs)
        self.plan = Plan()
        self.results: dict[str, list[dict[str, Any]]] = {}  # arm → per seed
        self.start: dict[str, list[dict[str, float]]] = {}  # init (or "none") → per seed
        self.arms: list[Arm] = list(BASE_ARMS)
        self.selection: dict[str, Any] = {}
        self.zh_chars = 0  # of the Chinese training text

    # -- preparation --------------------------------------------------------------------

    def data(self) -> None:
        o, lay, say = self.opts, self.lay, self.runner.say
        docs = read_documents(o.zh_corpus)[: self.size.zh_docs]
        if len(docs) < 20:
            raise ValueError(f"--zh_corpus: {len(docs)} documents; at least 20 are needed "
                             "(one per line: every 10th for testing, every 20th for selection)")
        zh = split_chinese(docs)
        for name, part in zh.items():
            write_documents(lay.corpus / f"zh-{name}.txt", part)
        self.zh_chars = sum(map(len, zh["train"]))
        say(f"Chinese: {len(docs)} documents -> train {len(zh['train'])} ({self.zh_chars:,} "
            f"characters), dev {len(zh['dev'])}, test {len(zh['test'])} ({lay.corpus})")
        self.runner.zhllama("base", "convert", str(o.base), str(lay.models / "base"), "--to",
                            "zhllama", "--tokenizer", str(o.tokenizer), "--no_progress")
        if o.en_corpus:
            en = split_english(read_documents(o.en_corpus), 10)
            if not en["test"] or not en["replay"]:
                raise ValueError("--en_corpus: at least 10 documents are needed (every 10th for testing)")
            source = "--en_corpus"
        else:
            texts = self.runner.map(self.generate, list(enumerate(prompts(self.size.en_prompts))))
            en = split_english(texts, 4)
            source = f"the base's sampled continuations of {len(texts)} prompts"
        for name, part in en.items():
            write_documents(lay.corpus / f"en-{name}.txt", part)
        say(f"English ({source}): replay {len(en['replay'])} documents "
            f"({sum(map(len, en['replay'])):,} characters), test {len(en['test'])} "
            f"({sum(map(len, en['test'])):,} characters)")

    def generate(self, job: tuple[int, str]) -> str:
        """The base's continuation of prompt i, sampled with seed i from its distribution
        (temperature 1, no top-k or top-p)."""
        seed, prompt = job
        out = self.runner.zhllama("english", "generate", str(self.lay.models / "base"), "--prompt",
                                  prompt, "--temperature", "1", "--seed", str(seed), "--max_new_tokens",
                                  str(self.size.en_tokens), "--device", "cpu")
        return " ".join(out.split())  # one document per line

    def tokenizers(self) -> None:
        lay, s, run = self.lay, self.size, self.runner.zhllama
        run("tokenizer", "train-tokenizer", "--input", str(lay.corpus / "zh-train.txt"),
            "--model_prefix", str(lay.tokenizers / "zh" / "chinese_sp"), "--vocab_size",
            str(s.zh_vocab), "--model_type", "bpe", "--character_coverage", str(s.char_coverage),
            "--num_threads", "1")
        run("tokenizer", "merge-tokenizer", "--llama_tokenizer_dir", str(self.opts.tokenizer),
            "--chinese_sp_model_file", str(lay.tokenizers / "zh" / "chinese_sp.model"),
            "--output_dir", str(lay.tokenizers / "merged"))
        self.plan.pieces = {"base": pieces(lay.models / "base" / "tokenizer.model"),
                            "merged": pieces(lay.tokenizers / "merged" / "tokenizer.model")}
        self.runner.say(f"tokenizers: base {self.plan.pieces['base']} pieces, merged "
                        f"{self.plan.pieces['merged']} pieces")

    def models_and_tokens(self) -> None:
        lay, run = self.lay, self.runner.zhllama
        merged = str(lay.tokenizers / "merged")
        shards = ((str(lay.models / "base" / "tokenizer.model"), "zh-train.txt", "zh-base"),
                  (merged, "zh-train.txt", "zh-merged"), (merged, "en-replay.txt", "en-merged"))
        jobs = [("prepare", "--tokenizer", tokenizer, "--input", str(lay.corpus / text), "--output_dir",
                 str(lay.tokens / name), "--num_workers", "1") for tokenizer, text, name in shards]
        jobs += [("resize", str(lay.models / "base"), "--tokenizer", merged, "--output",
                  str(self.start_model(init, seed)), "--init", init, "--seed", str(seed), "--no_progress")
                 for init, seed in self.start_models() if init != "none"]
        self.runner.map(lambda args: run(args[0], *args), jobs)  # tagged by the command
        p, s = self.plan, self.size
        p.tokens_per_char = {"zh-base": token_count(lay.tokens / "zh-base") / self.zh_chars,
                             "zh-merged": token_count(lay.tokens / "zh-merged") / self.zh_chars,
                             "en": token_count(lay.tokens / "en-merged") /
                             sum(map(len, read_documents([lay.corpus / "en-replay.txt"])))}
        self.runner.say("tokens per character of the training text: " + ", ".join(
            f"{k} {v:.3f}" for k, v in p.tokens_per_char.items()))
        for arm in BASE_ARMS:
            p.steps[arm.key] = [0, self.steps_for(arm)]
            p.chars[arm.key] = {"zh": s.train_chars, "en": 0}

    def steps_for(self, arm: Arm) -> int:
        """Steps that read size.train_chars characters of Chinese training text."""
        tpc = self.plan.tokens_per_char["zh-base" if arm.init is None else "zh-merged"]
        return max(1, round(self.size.train_chars * tpc / (self.size.block_size * self.size.micro_batch)))

    def start_models(self) -> list[tuple[str, int]]:
        """(init, seed) of each distinct starting model: only normal depends on the seed."""
        return [("none", 0), ("mean", 0), ("subtoken", 0)] + [("normal", s) for s in range(self.opts.seeds)]

    def start_model(self, init: str | None, seed: int) -> Path:
        if init is None or init == "none":
            return self.lay.models / "base"
        return self.lay.models / (f"{init}-seed{seed}" if init == "normal" else init)

    def starting_points(self) -> None:
        """Bits per character before any training (the base, each initialisation)."""
        found = self.runner.map(lambda m: evaluation(self.runner, f"start {m[0]} seed {m[1]}", self.lay,
                                                     self.start_model(*m), None, self.size.block_size),
                                self.start_models())
        for (init, _), figures in zip(self.start_models(), found):
            self.start.setdefault(init, []).append(figures)

    # -- the arms -----------------------------------------------------------------------

    def train(self, job: tuple[Arm, int]) -> dict[str, Any]:
        arm, seed = job
        lay, s, run = self.lay, self.size, self.runner.zhllama
        tag = f"{arm.key} seed {seed}"
        model, run_dir = self.start_model(arm.init, seed), lay.runs / f"{arm.key}-seed{seed}"
        zh = lay.tokens / ("zh-base" if arm.init is None else "zh-merged")
        data = [f"--data.path={zh}"]
        if arm.replay:
            sources = [{"path": str(zh), "weight": 1 - arm.replay, "name": "zh"},
                       {"path": str(lay.tokens / "en-merged"), "weight": arm.replay, "name": "en"}]
            data = ["--data.path=", f"--data.sources={json.dumps(sources)}"]
        stage1_steps, stage2_steps = self.plan.steps[arm.key]
        losses = []
        if arm.stage1:
            out = run_dir / "stage1"
            run(tag, "pretrain", config("stage1.yaml"), f"--model.path={model}",
                f"--model.new_rows_from={self.plan.pieces['base']}", f"--output_dir={out}",
                *data, *training_args(s, seed, stage1_steps))
            model = out / "model"
            losses.append(final_loss(out))
        out = run_dir / "stage2"
        run(tag, "pretrain", config("stage2.yaml"), f"--model.path={model}",
            f"--output_dir={out}", *data, *training_args(s, seed, stage2_steps))
        losses.append(final_loss(out))
        self.runner.say(f"[{tag}] final training loss {' / '.join(f'{l:.4f}' for l in losses)} "
                        "(nats per token)")
        figures = evaluation(self.runner, tag, lay, model, out / "adapter", s.block_size)
        return {"seed": seed, **figures, "final_loss": losses,
                "model": str(model.relative_to(lay.out)),
                "adapter": str((out / "adapter").relative_to(lay.out))}

    def run_arms(self, arms: Sequence[Arm]) -> None:
        jobs = [(arm, seed) for arm in arms for seed in range(self.opts.seeds)]
        # the longest first (byte fallback takes the most steps), so the last ones end together
        jobs.sort(key=lambda j: -sum(self.plan.steps[j[0].key]))
        done = dict(zip(jobs, self.runner.map(self.train, jobs)))
        for arm in arms:
            self.results[arm.key] = [done[(arm, seed)] for seed in range(self.opts.seeds)]

    def dev(self, key: str) -> float:
        return statistics.fmean(r["zh_dev"] for r in self.results[key])

    def arm(self, key: str) -> Arm:
        return next(a for a in self.arms if a.key == key)

    def choose_stage1(self) -> Arm:
        best = min(BASE_ARMS[1:], key=lambda a: self.dev(a.key))  # ties: the first
        self.selection["best_init"] = {"arm": best.key, "init": best.init, "by": "mean zh dev bits/char",
                                       "dev": {a.key: self.dev(a.key) for a in BASE_ARMS[1:]}}
        self.runner.say(f"best initialisation by mean Chinese dev bits/char: {best.init} (arm {best.key}: "
                        + ", ".join(f"{a.key} {self.dev(a.key):.4f}" for a in BASE_ARMS[1:]) + ")")
        e = Arm("e", best.init, stage1=True)
        total = self.plan.steps[best.key][1]
        first = max(1, round(self.size.stage1_share * total))
        self.plan.steps["e"] = [first, max(1, total - first)]
        self.plan.chars["e"] = dict(self.plan.chars[best.key])
        return e

    def choose_replay(self, e: Arm) -> Arm:
        best = self.arm(self.selection["best_init"]["arm"])
        plan = e if self.dev(e.key) < self.dev(best.key) else best
        self.selection["replay_on"] = {"arm": plan.key, "by": "mean zh dev bits/char",
                                       "dev": {best.key: self.dev(best.key), e.key: self.dev(e.key)}}
        self.runner.say(f"replay on arm {plan.key} ({plan.label}): dev {best.key} {self.dev(best.key):.4f}, "
                        f"{e.key} {self.dev(e.key):.4f}")
        f = replace(plan, key="f", replay=self.size.replay, counterpart=plan.key)
        self.plan.steps["f"] = list(self.plan.steps[plan.key])
        blocks = sum(self.plan.steps["f"]) * self.size.micro_batch
        tokens = blocks * self.size.block_size
        self.plan.chars["f"] = {  # as the mixture draws them: within a block of the weights
            "zh": round((1 - f.replay) * tokens / self.plan.tokens_per_char["zh-merged"]),
            "en": round(f.replay * tokens / self.plan.tokens_per_char["en"])}
        return f

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        say = self.runner.say
        self.data()
        self.tokenizers()
        self.models_and_tokens()
        for arm in BASE_ARMS:
            say(f"arm {arm.key}: {arm.label}: {self.plan.steps[arm.key][1]} steps of "
                f"{self.size.micro_batch} x {self.size.block_size} tokens")
        self.starting_points()
        self.run_arms(BASE_ARMS)
        e = self.choose_stage1()
        self.arms.append(e)
        say(f"arm e: {e.label}: {self.plan.steps['e'][0]} + {self.plan.steps['e'][1]} steps")
        self.run_arms([e])
        f = self.choose_replay(e)
        self.arms.append(f)
        say(f"arm f: {f.label}: {self.plan.steps['f'][0]} + {self.plan.steps['f'][1]} steps, "
            f"~{self.plan.chars['f']['zh']:,} Chinese and ~{self.plan.chars['f']['en']:,} English characters")
        self.run_arms([f])
        return self.summary(time.perf_counter() - t0)

    def summary(self, wall_s: float) -> dict[str, Any]:
        arms = []
        for arm in self.arms:
            rows = self.results[arm.key]
            arms.append({**asdict(arm), "label": arm.label, "short": arm.short,
                         "tokenizer_pieces": self.plan.pieces["base" if arm.init is None else "merged"],
                         "steps": self.plan.steps[arm.key], "train_chars": self.plan.chars[arm.key],
                         **{k: spread([r[k] for r in rows]) for k in ("zh", "en", "zh_dev")},
                         "seeds": rows})
        return {"date": datetime.date.today().isoformat(), "wall_s": round(wall_s, 1),
                "cpu_cores": os.cpu_count(), "jobs": self.opts.jobs, "threads_per_job": 1,
                "size": asdict(self.size), "seeds": self.opts.seeds,
                "tokens_per_char": self.plan.tokens_per_char, "tokenizer_pieces": self.plan.pieces,
                "start": {k: {m: spread([r[m] for r in v]) for m in ("zh", "en", "zh_dev")}
                          for k, v in self.start.items()},
                "selection": self.selection, "arms": arms}


# ---------------------------------------------------------------------------------------
# the table and the picture


def fmt(s: dict[str, float]) -> str:
    """mean ± std (min–max): the figure the table and its tests read."""
    return f"{s['mean']:.3f} ± {s['std']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def table(results: dict[str, Any]) -> str:
    """results.md: one row per arm, bits per character as mean ± std (min–max) over seeds."""
    lines = ["| arm | what | pieces | steps (stage 1 + 2) | training text (characters) | "
             "zh test bits/char | en test bits/char | zh dev bits/char |",
             "| --- | --- | ---: | ---: | --- | --- | --- | --- |"]
    for a in results["arms"]:
        read = a["train_chars"]
        text = f"{read['zh']:,} zh" + (f" + {read['en']:,} en" if read["en"] else "")
        lines.append(f"| {a['key']} | {a['label']} | {a['tokenizer_pieces']} | {a['steps'][0]} + "
                     f"{a['steps'][1]} | {text} | {fmt(a['zh'])} | {fmt(a['en'])} | {fmt(a['zh_dev'])} |")
    start = results["start"]
    lines += ["", "Before training (the base, and each initialisation of the merged vocabulary):", "",
              "| start | zh test bits/char | en test bits/char |", "| --- | --- | --- |"]
    lines += [f"| {k} | {fmt(v['zh'])} | {fmt(v['en'])} |" for k, v in start.items()]
    sel = results["selection"]
    lines += ["", f"{results['seeds']} seeds; bits/char as mean ± std (min–max) over seeds. Best "
              f"initialisation (lowest mean zh dev bits/char): {sel['best_init']['init']} "
              f"(arm {sel['best_init']['arm']}); replay (arm f) on arm {sel['replay_on']['arm']}. "
              "Tokens per character of the training text: " + ", ".join(
                  f"{k} {v:.3f}" for k, v in results["tokens_per_char"].items()) + "."]
    return "\n".join(lines) + "\n"


def picture(results: dict[str, Any], output: Path, inputs: Sequence[Path]) -> Path:
    """Bits per character per arm on the Chinese and the English test sets: the mean (a
    diamond), min to max over seeds (a line) and each seed (dots); on English, the base's
    figure before any Chinese training (dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from train.plot import write_png

    arms = results["arms"]
    fig = Figure(figsize=(10, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    xs = list(range(len(arms)))
    for ax, key, title in zip(fig.subplots(1, 2), ("zh", "en"), ("Chinese test", "English test")):
        for i, a in enumerate(arms):
            ax.vlines(i, a[key]["min"], a[key]["max"], color=f"C{i}", linewidth=2)
            ax.plot([i] * len(a["seeds"]), [r[key] for r in a["seeds"]], ".", color=f"C{i}", markersize=6)
            ax.plot(i, a[key]["mean"], "D", color=f"C{i}", markersize=7, markeredgecolor="black")
        if key == "en":
            ax.axhline(results["start"]["none"]["en"]["mean"], color="0.4", linestyle="--",
                       label="the base, before Chinese training")
            ax.legend(fontsize="small")
        ax.set_xticks(xs, [a["short"] for a in arms], fontsize="small")
        ax.set_xlim(-0.6, len(arms) - 0.4)
        ax.set_title(f"{title} (lower is better)")
        ax.set_ylabel("bits per character")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{results['seeds']} seeds, {results['size']['train_chars']:,} Chinese training "
                 "characters per arm (mean, min–max, each seed)", fontsize="medium")
    return write_png(fig, output, inputs)


def write_results(results: dict[str, Any], out: Path, inputs: Sequence[Path]) -> None:
    with atomic_output_file(out / "results.json", overwrite=True, inputs=inputs) as tmp:
        tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    with atomic_output_file(out / "results.md", overwrite=True, inputs=inputs) as tmp:
        tmp.write_text(table(results), encoding="utf-8")
    picture(results, out / "vocab_extension.png", inputs)


# ---------------------------------------------------------------------------------------
# the command


def check_options(o: Options) -> list[Path]:
    """The inputs (each must exist) — refused as or around --out; and matplotlib, before
    half an hour of work that ends in a picture."""
    inputs = [o.base, o.tokenizer, *o.zh_corpus, *o.en_corpus]
    for flag, paths in (("--base", [o.base]), ("--tokenizer", [o.tokenizer]), ("--zh_corpus", o.zh_corpus),
                        ("--en_corpus", o.en_corpus)):
        for p in paths:
            if not p.exists():
                raise ValueError(f"{flag}: {p}: no such file or directory")
    check_output_against_inputs(o.out, inputs)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CommandError("matplotlib is not installed (the picture needs it): "
                           "pip install 'zhllama[plot]'") from None
    return inputs


def prepare_out(o: Options, argv: Sequence[str]) -> None:
    """A fresh --out: an existing non-empty one only with --overwrite, and only if it is
    this script's (it holds experiment.json)."""
    if o.out.exists() and (not o.out.is_dir() or any(o.out.iterdir())):
        if not o.overwrite:
            raise CommandError(f"--out {o.out} already exists (use --overwrite to replace it)")
        if not (o.out / MARKER).is_file():
            raise CommandError(f"--out {o.out} is not this script's output (no {MARKER}): not removing it")
        shutil.rmtree(o.out)
    Layout(o.out).logs.mkdir(parents=True, exist_ok=True)
    (o.out / MARKER).write_text(json.dumps({"argv": list(argv), "size": asdict(o.size),
                                            "seeds": o.seeds, "jobs": o.jobs}, indent=1) + "\n")


def run(o: Options, argv: Sequence[str] = ()) -> dict[str, Any]:
    """The whole experiment; returns results.json's content."""
    inputs = check_options(o)
    prepare_out(o, argv)
    experiment = Experiment(o)
    results = experiment.run()
    results["command"] = shlex.join(["python", "experiments/vocab_extension.py", *argv])
    write_results(results, o.out, inputs)
    print()
    print(table(results), end="")
    print(f"\nwrote {o.out / 'results.md'}, {o.out / 'results.json'}, {o.out / 'vocab_extension.png'} "
          f"in {results['wall_s']:.0f} s")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python experiments/vocab_extension.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, type=Path,
                   help="the base model: any checkpoint zhllama convert reads (e.g. stories260K.bin)")
    p.add_argument("--tokenizer", required=True, type=Path, help="the base's sentencepiece model")
    p.add_argument("--zh_corpus", required=True, nargs="+", type=Path,
                   help="Chinese text files, one document per line")
    p.add_argument("--en_corpus", nargs="+", type=Path, default=[],
                   help="English text files, one document per line (default: the base's "
                        "own sampled continuations of fixed prompts)")
    p.add_argument("--out", required=True, type=Path, help="where everything is written")
    p.add_argument("--seeds", type=positive_int, default=3, help="training seeds per arm (default 3)")
    p.add_argument("--jobs", type=positive_int, default=2,
                   help="commands at once, one thread each (default 2)")
    p.add_argument("--train_chars", type=positive_int,
                   help=f"Chinese characters each arm reads (default {DEFAULT.train_chars:,}; "
                        f"--tiny: {TINY.train_chars:,})")
    p.add_argument("--tiny", action="store_true", help="a minute or two: for tests")
    p.add_argument("--overwrite", action="store_true", help="replace --out (a previous run's)")
    return p


def options(a: argparse.Namespace) -> Options:
    size = TINY if a.tiny else DEFAULT
    if a.train_chars:
        size = replace(size, train_chars=a.train_chars)
    return Options(base=a.base, tokenizer=a.tokenizer, zh_corpus=tuple(a.zh_corpus), out=a.out,
                   en_corpus=tuple(a.en_corpus), seeds=a.seeds, jobs=a.jobs, size=size,
                   overwrite=a.overwrite)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = build_parser().parse_args(argv)
    with command_errors(output=a.out):
        run(options(a), argv)


if __name__ == "__main__":
    main()
