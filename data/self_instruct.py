"""Make instruction data by self-instruct: ask a strong model, through any OpenAI-compatible
endpoint, for new tasks shown a few seed tasks, and keep those that pass the filters.

    python -m data.self_instruct --endpoint URL --model NAME --seed_tasks FILE --num N
        --output FILE.json [--api_key_env OPENAI_API_KEY] [--batch 20] [--examples 3]
        [--rouge_threshold 0.7] [--requests_per_minute R] [--temperature 1.0]
        [--language zh|en] [--concurrency 1] [--max_tokens 3072] [--timeout 120]
        [--retries 5] [--max_requests N] [--give_up_after 20] [--seed 0]
    python -m data.self_instruct --output FILE.json --finalize

Each request shows --examples seed tasks drawn at random (BELLE's 175 Chinese seed tasks,
Stanford Alpaca's seed_tasks.jsonl, or Alpaca records) and asks for --batch new ones, as
Stanford Alpaca's self-instruct and Chinese-LLaMA-Alpaca's crawl_prompt.py do, through the
official `openai` client's chat completions (OpenAI, vLLM, llama.cpp's server,
`model.serve`). A new task is kept if it parses, passes the filters (data.instruct_tasks)
and its instruction's ROUGE-L (on characters for Chinese) against every seed and every
task kept so far is below --rouge_threshold.

Crash-safe and resumable: every answered request is one line appended (and fsynced) to
FILE.json.progress.jsonl, with its kept tasks and its counts; the same command run again
continues from there (a line torn by a kill is dropped). When --num tasks are kept, the
Alpaca JSON list FILE.json is written at once (temp file + rename), ready for
`data.prepare --sft`; --finalize writes it from the progress file alone. Requests are
spaced to --requests_per_minute and retried with exponential backoff (or the server's
Retry-After) on 429, 5xx, timeouts and dropped connections; other refusals (a wrong
key, an unknown model) end the run with one error line.

The API key is read from the environment variable --api_key_env names; it is never
printed or written anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tokenizer.cli import (ArgumentParser, CommandError, command_errors, non_negative_float,
                           non_negative_int, positive_float, positive_int, probability)
from tokenizer.files import atomic_output_file, check_output_against_inputs, sha256_file

from .endpoint import RateLimiter, Reply, ask, make_client, redact
from .instruct_tasks import LANGUAGES, Task, build_prompt, check_task, parse_reply, read_seed_tasks
from .rouge import RougeIndex, rouge_tokens
from .shards import DataError

FORMAT = "zhllama-self-instruct"
# settings a resumed run must share with the run it continues: they decide what was kept
FIXED = ("seed_tasks_sha256", "language", "rouge_threshold")


@dataclass(frozen=True)
class SelfInstructOptions:
    """What one run asks for (the command line's options)."""

    output: Path
    endpoint: str | None = None
    model: str | None = None
    seed_tasks: Path | None = None
    num: int = 100
    api_key_env: str = "OPENAI_API_KEY"
    batch: int = 20
    examples: int = 3
    rouge_threshold: float = 0.7
    requests_per_minute: float | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 3072
    language: str = "zh"
    concurrency: int = 1
    timeout: float = 120.0
    retries: int = 5
    backoff: float = 1.0  # seconds before the first retry; doubled each time
    max_backoff: float = 60.0
    max_requests: int | None = None
    give_up_after: int = 20
    seed: int = 0
    finalize: bool = False
    progress: bool = True

    @property
    def log_path(self) -> Path:
        return progress_path(self.output)


def progress_path(output: Path) -> Path:
    """Where a run's progress is appended: beside the output."""
    return output.with_name(output.name + ".progress.jsonl")


# --------------------------------------------------------------------------------------
# the progress file

@dataclass
class Progress:
    """What the progress file holds: the run's settings, the kept tasks, the counts."""

    header: dict[str, Any]
    kept: list[Task] = field(default_factory=list)
    requests: int = 0
    next_index: int = 0
    parsed: int = 0
    duplicates: int = 0
    retries: int = 0
    rejected: Counter = field(default_factory=Counter)  # per task, by reason
    failed: Counter = field(default_factory=Counter)  # per request without tasks, by reason
    beyond_num: int = 0
    dry: int = 0  # requests in a row that kept nothing

    def add(self, line: dict[str, Any]) -> None:
        self.requests += 1
        self.next_index = max(self.next_index, line["request"] + 1)
        self.kept += [Task(t["instruction"], t["input"], t["output"]) for t in line["kept"]]
        self.parsed += line["parsed"]
        self.duplicates += line["duplicates"]
        self.retries += line["retries"]
        self.rejected.update(line["rejected"])
        self.beyond_num += line.get("beyond_num", 0)
        if line.get("failed"):
            self.failed[line["failed"]] += 1
        self.dry = 0 if line["kept"] else self.dry + 1


def read_progress(path: Path) -> tuple[Progress | None, str | None]:
    """The progress so far (None: no file), and a note when a torn last line was dropped.

    A run killed while appending leaves a last line without its newline (or cut short):
    it is cut off the file, and the request it recorded is asked again. A bad line
    elsewhere is a damaged file: one DataError.
    """
    if not path.exists():
        return None, None
    raw = path.read_bytes()
    good = raw.rfind(b"\n") + 1
    note = None
    if good < len(raw):
        note = f"note: {path}: dropped a torn last line (a run was killed while writing it)"
        with open(path, "r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())
    lines = raw[:good].decode("utf-8").split("\n")[:-1]
    if not lines:
        return None, note
    try:
        header = json.loads(lines[0])
        if header.get("format") != FORMAT:
            raise ValueError
    except ValueError:
        raise DataError(f"{path}:1: not a self-instruct progress file") from None
    progress = Progress(header)
    for n, line in enumerate(lines[1:], 2):
        try:
            progress.add(json.loads(line))
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path}:{n}: damaged line (not one request's record)") from None
    return progress, note


def append_line(path: Path, obj: dict[str, Any]) -> None:
    """One line, written whole and on disk before the call returns."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_output(tasks: list[Task], output: Path, inputs: list[Path | None]) -> None:
    """The Alpaca JSON list, whole or not at all."""
    with atomic_output_file(output, overwrite=True, inputs=inputs) as tmp:
        tmp.write_text(json.dumps([t.record() for t in tasks], ensure_ascii=False, indent=2) + "\n",
                       encoding="utf-8")


# --------------------------------------------------------------------------------------
# judging

def judge(reply: Reply, progress: Progress, index: RougeIndex, opts: SelfInstructOptions
          ) -> dict[str, Any]:
    """The progress line of one reply: its tasks kept (added to `index`), and the counts."""
    line: dict[str, Any] = {"request": reply.index, "kept": [], "parsed": 0, "duplicates": 0,
                            "rejected": {}, "retries": reply.retries}
    if reply.text is None:
        line["failed"] = reply.failed
        return line
    items, rejected = parse_reply(reply.text, truncated=reply.finish_reason == "length")
    counts = Counter(rejected)
    line["parsed"] = len(items) + sum(rejected.values())
    if not line["parsed"]:
        line["failed"] = "no_tasks"
    room = (opts.num or 0) - len(progress.kept)
    for item in items:
        task = check_task(item, opts.language)
        if isinstance(task, str):
            counts[task] += 1
            continue
        tokens = rouge_tokens(task.instruction)
        if index.highest(tokens, opts.rouge_threshold)[0] >= opts.rouge_threshold:
            line["duplicates"] += 1
        elif len(line["kept"]) >= room:
            line["beyond_num"] = line.get("beyond_num", 0) + 1
        else:
            index.add(tokens)
            line["kept"].append(task.record())
    line["rejected"] = dict(counts)
    return line


def summary(progress: Progress, opts: SelfInstructOptions) -> list[str]:
    """The lines printed at the end: tasks kept per request, and the share of each reason."""
    kept, requests, parsed = len(progress.kept), progress.requests, progress.parsed
    per_request = kept / requests if requests else 0.0
    rejected = sum(progress.rejected.values())

    def share(n: int) -> str:
        return f"{n} ({100 * n / parsed:.1f}%)" if parsed else str(n)

    lines = [f"self-instruct: {kept} tasks kept in {opts.output} from {requests} requests "
             f"({per_request:.2f} kept per request; {progress.retries} retries)",
             f"of {parsed} tasks in the replies: kept {share(kept)}, near-duplicates "
             f"(ROUGE-L >= {progress.header['rouge_threshold']}) {share(progress.duplicates)}, "
             f"rejected {share(rejected)}"]
    lines += [f"  {reason}: {share(n)}" for reason, n in progress.rejected.most_common()]
    if progress.beyond_num:
        lines.append(f"  beyond --num (not kept): {progress.beyond_num}")
    if progress.failed:
        lines.append("requests without tasks: " + ", ".join(
            f"{reason} {n}" for reason, n in progress.failed.most_common()))
    return lines


# --------------------------------------------------------------------------------------
# the run

def public_endpoint(url: str) -> str:
    """The endpoint as the progress file records it: without user:password@ or a query."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def start(opts: SelfInstructOptions) -> tuple[list[Task], Progress]:
    """The seeds and the progress to continue: the file's, or a new one with its header."""
    assert opts.seed_tasks is not None
    seeds = read_seed_tasks(opts.seed_tasks)
    if len(seeds) < opts.examples:
        raise DataError(f"{opts.seed_tasks}: {len(seeds)} seed tasks, fewer than --examples "
                        f"{opts.examples}")
    for out in (opts.output, opts.log_path):
        check_output_against_inputs(out, [opts.seed_tasks])
    header = {"format": FORMAT, "seed_tasks": opts.seed_tasks.name,
              "seed_tasks_sha256": sha256_file(opts.seed_tasks), "language": opts.language,
              "rouge_threshold": opts.rouge_threshold, "endpoint": public_endpoint(opts.endpoint or ""),
              "model": opts.model, "batch": opts.batch, "examples": opts.examples}
    progress, note = read_progress(opts.log_path)
    if note:
        print(note, file=sys.stderr)
    if progress is None:
        if opts.output.exists():
            raise FileExistsError(f"{opts.output} already exists and no progress file "
                                  f"({opts.log_path.name}) is beside it: not replacing it "
                                  "(choose another --output)")
        progress = Progress(header)  # written with the first answer: a refusal leaves nothing
    for key in FIXED:
        if progress.header.get(key) != header[key]:
            raise DataError(f"{opts.log_path}: this run was started with {key} "
                            f"{progress.header.get(key)!r}, not {header[key]!r}: continue it with "
                            "the same seed tasks, --language and --rouge_threshold, or choose "
                            "another --output")
    return seeds, progress


def generate(opts: SelfInstructOptions) -> Progress:
    """Ask until --num tasks are kept (or --max_requests are spent); write the output."""
    seeds, progress = start(opts)
    index = RougeIndex()
    for task in seeds + progress.kept:
        index.add(rouge_tokens(task.instruction))
    if len(progress.kept) < (opts.num or 0):
        _ask_until_done(opts, seeds, progress, index)
    write_output(progress.kept[:opts.num], opts.output, [opts.seed_tasks])
    return progress


def _ask_until_done(opts: SelfInstructOptions, seeds: list[Task], progress: Progress,
                    index: RougeIndex) -> None:
    import queue

    secret = os.environ.get(opts.api_key_env) or None
    client = make_client(opts, secret)
    limiter = RateLimiter(opts.requests_per_minute)
    results: queue.Queue = queue.Queue()
    inflight, next_index = 0, progress.next_index
    answered = 0  # replies of this run; an endpoint that never answers ends it at once

    def worker(i: int, prompt: str) -> None:
        try:
            results.put((ask(client, opts, i, prompt, limiter, secret), None))
        except BaseException as e:  # handed to the main thread, which ends the run with it
            results.put((None, e))

    bar = tqdm(total=opts.num, initial=len(progress.kept), unit="task", desc="self-instruct",
               disable=not opts.progress)
    try:
        while True:
            while (inflight < opts.concurrency and len(progress.kept) < opts.num
                   and (opts.max_requests is None or progress.requests + inflight < opts.max_requests)
                   and progress.dry < opts.give_up_after):
                rng = random.Random(f"{opts.seed}-{next_index}")
                prompt = build_prompt(rng.sample(seeds, opts.examples), opts.batch, opts.language)
                # daemon threads: a request in flight never holds up Ctrl-C or the exit
                threading.Thread(target=worker, args=(next_index, prompt), daemon=True).start()
                inflight, next_index = inflight + 1, next_index + 1
            if not inflight:
                break
            reply, error = _next_result(results)
            inflight -= 1
            if error is not None:
                raise error
            if reply.failed == "unavailable" and not answered:
                raise CommandError(redact(f"{opts.endpoint}: no answer after {reply.retries} "
                                          f"retries ({reply.error})", secret))
            answered += 1
            line = judge(reply, progress, index, opts)
            if not opts.log_path.exists():
                opts.log_path.parent.mkdir(parents=True, exist_ok=True)
                append_line(opts.log_path, progress.header)
            append_line(opts.log_path, line)
            progress.add(line)
            bar.update(len(line["kept"]))
            bar.set_postfix(kept=len(progress.kept), rejected=sum(progress.rejected.values()),
                            duplicates=progress.duplicates, requests=progress.requests)
    finally:
        bar.close()
    if progress.dry >= opts.give_up_after and len(progress.kept) < opts.num:
        for line in summary(progress, opts):
            print(line)
        reasons = progress.rejected + progress.failed
        common = ", ".join(f"{r} {n}" for r, n in reasons.most_common(3)) or "no replies"
        raise CommandError(f"{progress.dry} requests in a row kept no task ({common}); the "
                           f"{len(progress.kept)} kept so far are in {opts.log_path}: check the "
                           "endpoint and model, then run again (or --finalize)")


def _next_result(results: Any) -> tuple[Reply | None, BaseException | None]:
    import queue

    while True:  # short waits, so that Ctrl-C reaches the main thread at once
        try:
            return results.get(timeout=0.5)
        except queue.Empty:
            continue


def finalize(opts: SelfInstructOptions) -> Progress:
    """Write the output from the progress file alone (no requests)."""
    progress, note = read_progress(opts.log_path)
    if note:
        print(note, file=sys.stderr)
    if progress is None:
        raise DataError(f"{opts.log_path}: no progress file, nothing to finalize")
    write_output(progress.kept[:opts.num], opts.output, [])
    return progress


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m data.self_instruct", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, type=Path,
                   help="the Alpaca JSON list to write (progress goes to OUTPUT.progress.jsonl)")
    p.add_argument("--endpoint", help="the API's base URL, e.g. https://api.openai.com/v1 or "
                   "http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="the model to ask, as the endpoint names it")
    p.add_argument("--seed_tasks", type=Path, help="seed tasks: self-instruct's JSON Lines "
                   "(BELLE's zh_seed_tasks, Stanford's seed_tasks.jsonl) or Alpaca records")
    p.add_argument("--num", type=positive_int, help="how many tasks to keep")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", metavar="VAR",
                   help="the environment variable holding the API key (default: OPENAI_API_KEY; "
                        "unset: a placeholder is sent, as local servers need no key)")
    p.add_argument("--batch", type=positive_int, default=20, help="new tasks asked per request")
    p.add_argument("--examples", type=positive_int, default=3, help="seed tasks shown per request")
    p.add_argument("--rouge_threshold", type=probability, default=0.7,
                   help="drop a task whose instruction's ROUGE-L against a seed or a kept task "
                        "reaches this")
    p.add_argument("--requests_per_minute", type=positive_float, help="space requests to this rate")
    p.add_argument("--temperature", type=non_negative_float, default=1.0)
    p.add_argument("--top_p", type=probability, default=1.0)
    p.add_argument("--max_tokens", type=positive_int, default=3072, help="the reply's length limit")
    p.add_argument("--language", choices=tuple(LANGUAGES), default="zh",
                   help="of the prompt and of the tasks asked for")
    p.add_argument("--concurrency", type=positive_int, default=1, help="requests in flight at once")
    p.add_argument("--timeout", type=positive_float, default=120.0, help="seconds per request")
    p.add_argument("--retries", type=non_negative_int, default=5,
                   help="retries of a request on 429, 5xx, timeouts and dropped connections")
    p.add_argument("--backoff", type=positive_float, default=1.0,
                   help="seconds before the first retry, doubled for each next one")
    p.add_argument("--max_requests", type=positive_int,
                   help="stop after this many requests in all (earlier runs' included)")
    p.add_argument("--give_up_after", type=positive_int, default=20,
                   help="end with an error after this many requests in a row kept nothing")
    p.add_argument("--seed", type=int, default=0, help="of the choice of examples per request")
    p.add_argument("--finalize", action="store_true",
                   help="write OUTPUT from its progress file, asking nothing")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def options_from_args(a: argparse.Namespace) -> SelfInstructOptions:
    if not a.finalize:
        missing = [f"--{k}" for k in ("endpoint", "model", "seed_tasks", "num") if getattr(a, k) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} required (or --finalize)")
    if a.output.suffix != ".json":
        raise ValueError(f"--output {a.output}: expected a .json file (the Alpaca JSON list)")
    return SelfInstructOptions(
        a.output, a.endpoint, a.model, a.seed_tasks, a.num, a.api_key_env, a.batch, a.examples,
        a.rouge_threshold, a.requests_per_minute, a.temperature, a.top_p, a.max_tokens,
        a.language, a.concurrency, a.timeout, a.retries, a.backoff, max_requests=a.max_requests,
        give_up_after=a.give_up_after, seed=a.seed, finalize=a.finalize,
        progress=not a.no_progress)


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    with command_errors(output=a.output):
        opts = options_from_args(a)
        progress = finalize(opts) if opts.finalize else generate(opts)
        for line in summary(progress, opts):
            print(line)
        if opts.num and len(progress.kept) < opts.num:
            print(f"note: stopped at --max_requests {opts.max_requests} with {len(progress.kept)} "
                  f"of the {opts.num} tasks asked for; run again with a higher limit to go on",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
