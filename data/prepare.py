"""Tokenize once, in parallel, into memory-mapped token shards (see data/shards.py).

Pretraining text — each line of a .txt, or the text field of each .jsonl line, is one
document, stored as <s> + tokens + </s>:

    python -m data.prepare --tokenizer T --input 'corpus/*.txt' --output_dir D \\
        [--text_key text] [--num_workers N] [--no_bos] [--no_eos] [--errors strict|replace|skip]

Instruction data — Alpaca JSON (a list) or JSON Lines, formatted with a prompt template;
the loss mask covers the response (and its </s>) only:

    python -m data.prepare --sft --template cla_v1 --tokenizer T --input alpaca.json \\
        --output_dir D [--max_seq_length 512] [--field_map instruction=question,output=std_answer]

Inputs are cut into units of about --chunk_mb (at line or record boundaries); each unit is
tokenized by a worker into its own shard, so the output is byte-identical whatever
--num_workers. Everything is written to a temporary directory renamed at the end, with
meta.json last: an interrupted run never leaves a directory that looks complete.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tokenizer.cli import (ArgumentParser, command_errors, interrupts_to_parent_only,
                           positive_float, positive_int)
from tokenizer.files import atomic_output_dir, check_output_against_inputs, sha256_file
from tokenizer.spm_io import load_sp, resolve_model_file
from tokenizer.templates import TEMPLATES

from .preparer import ERRORS, Preparer, WorkUnit, Worker
from .sft import SFTPreparer
from .shards import FORMAT, FORMAT_VERSION, META, DataError, dtype_for_vocab, read_meta
from .text import TextPreparer


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class PrepareOptions:
    """One data-preparation job: the shared settings, and the kind of input with its own
    (`TextPreparer()` for pretraining text, `SFTPreparer(...)` for instruction data)."""

    tokenizer: Path  # sentencepiece model, or a directory holding tokenizer.model
    input: tuple[str, ...]  # files or globs, in order
    output_dir: Path  # the token directory to write
    preparer: Preparer = field(default_factory=TextPreparer)
    num_workers: int = field(default_factory=default_workers)  # any number: the same output
    overwrite: bool = False

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> PrepareOptions:
        preparer: Preparer
        if a.sft:
            preparer = SFTPreparer(template=a.template, max_seq_length=a.max_seq_length,
                                   field_map=a.field_map, system_prompt=a.system_prompt,
                                   errors=a.errors)
        else:
            preparer = TextPreparer(text_key=a.text_key, bos=not a.no_bos, eos=not a.no_eos,
                                    errors=a.errors, chunk_mb=a.chunk_mb)
        return cls(tokenizer=Path(a.tokenizer), input=tuple(a.input), output_dir=Path(a.output_dir),
                   preparer=preparer, num_workers=a.num_workers, overwrite=a.overwrite)


def expand_inputs(patterns: tuple[str, ...] | list[str], suffixes: tuple[str, ...]) -> list[Path]:
    """Files named or matched by the patterns, in order; each glob's matches sorted."""
    files = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = [m for m in sorted(glob.glob(pattern)) if Path(m).is_file()]
            if not matches:
                raise DataError(f"{pattern}: matches no file")
        elif Path(pattern).is_dir():
            raise DataError(f"{pattern}: is a directory (give files, or a glob such as {pattern}/*.txt)")
        elif not Path(pattern).is_file():
            raise DataError(f"{pattern}: no such input file")
        else:
            matches = [pattern]
        for m in matches:
            if not m.endswith(suffixes):
                raise DataError(f"{m}: unsupported input type (expected {', '.join(suffixes)})")
            files.append(Path(m))
    return files


def check_existing(out: Path, tokenizer_sha: str, overwrite: bool) -> None:
    """Refuse to replace an output silently, and say so when it used another tokenizer."""
    if not out.exists() or overwrite:
        return
    try:
        meta = read_meta(out)
    except DataError:
        meta = None
    if meta is not None and meta["tokenizer"]["sha256"] != tokenizer_sha:
        raise DataError(f"{out} already exists and was made with another tokenizer ("
                        f"{meta['tokenizer']['file']}, sha256 {meta['tokenizer']['sha256'][:12]}…); "
                        "use another --output_dir, or --overwrite to replace it")
    raise FileExistsError(f"{out} already exists (use --overwrite to replace it)")


def run_units(worker: Worker, units: list[WorkUnit], num_workers: int, total_bytes: int,
              desc: str) -> list[dict[str, Any]]:
    """Run worker(unit) for every unit (in parallel), results in unit order, with progress.

    The first failing unit in unit order is reported (the same one whatever the number of
    workers), and units not yet started are cancelled rather than run for nothing.
    """
    with tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True,
              disable=total_bytes < (1 << 22)) as bar:
        if num_workers <= 1 or len(units) <= 1:  # no process start-up for nothing
            results = []
            for unit in units:
                results.append(worker(unit))
                bar.update(unit.nbytes)
            return results
        ctx = multiprocessing.get_context("spawn")  # no inherited state, same on every OS
        pool = ProcessPoolExecutor(max_workers=min(num_workers, len(units)), mp_context=ctx)
        try:
            with interrupts_to_parent_only():  # the workers start here; Ctrl-C is ours to handle
                futures = [pool.submit(worker, unit) for unit in units]
            for future, unit in zip(futures, units):
                future.result()  # a worker's DataError surfaces here, in unit order
                bar.update(unit.nbytes)
            return [f.result() for f in futures]
        except BrokenProcessPool:
            raise DataError("a worker process died (out of memory? try fewer --num_workers "
                            "or a smaller --chunk_mb)") from None
        except KeyboardInterrupt:
            # Workers do not see Ctrl-C and would finish their units first: stop them, so
            # that the output's temporary directory is removed after their last write.
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def base_meta(kind: str, tokenizer: Path, sp, options: dict[str, Any]) -> dict[str, Any]:
    specials = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
        "dtype": str(dtype_for_vocab(sp.vocab_size()).name), "vocab_size": sp.vocab_size(),
        "tokenizer": {"file": tokenizer.name, "sha256": sha256_file(tokenizer)},
        "special_ids": specials, "options": options,
    }


def finish(meta: dict[str, Any], results: list[dict[str, Any]], skipped: dict[str, int],
           sources: list[Path], tmp: Path) -> None:
    """Fill in counts and files, check there is something, write meta.json (last)."""
    meta["files"] = [r["file"] for r in results]
    meta["num_tokens"] = sum(r["file"]["num_tokens"] for r in results)
    meta["num_documents"] = sum(r["file"]["num_documents"] for r in results)
    ids = [r["file"]["max_token_id"] for r in results if r["file"]["max_token_id"] is not None]
    meta["max_token_id"] = max(ids) if ids else None
    skipped = dict(skipped)
    for r in results:
        for k, v in r["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    meta["skipped"] = dict(sorted(skipped.items()))
    if meta["kind"] == "sft":
        meta["truncated"] = sum(r["truncated"] for r in results)
    meta["sources"] = [{"path": str(p), "bytes": p.stat().st_size} for p in sources]
    if meta["num_documents"] == 0:
        what = f" (skipped: {', '.join(f'{v} {k}' for k, v in skipped.items())})" if skipped else ""
        raise DataError(f"no documents in {', '.join(map(str, sources))}{what}")
    (tmp / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def prepare(opts: PrepareOptions) -> dict[str, Any]:
    """Tokenize the inputs into a token directory, as `opts` says.

    Returns:
        The content of the meta.json written.

    Raises:
        DataError: bad input or options; FileExistsError: the output exists.
    """
    if opts.num_workers < 1:
        raise DataError(f"--num_workers must be at least 1, got {opts.num_workers}")
    prep = opts.preparer
    prep.check()
    tokenizer = resolve_model_file(opts.tokenizer)
    sp = load_sp(tokenizer)
    out = Path(opts.output_dir)
    sources = expand_inputs(opts.input, prep.suffixes)
    inputs = [opts.tokenizer, tokenizer, *sources]
    check_output_against_inputs(out, inputs)  # before the exists check: --overwrite cannot help
    check_existing(out, sha256_file(tokenizer), opts.overwrite)
    units, skipped = prep.plan_units(sources)
    if not units and not skipped:
        raise DataError(f"the input is empty: {', '.join(map(str, sources))}")
    with atomic_output_dir(out, opts.overwrite, inputs=inputs) as tmp:
        results = run_units(prep.worker(tokenizer, tmp), units, opts.num_workers,
                            sum(u.nbytes for u in units), desc="tokenizing")
        meta = base_meta(prep.kind, tokenizer, sp, prep.recorded_options())
        finish(meta, results, skipped, sources, tmp)
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m data.prepare", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="sentencepiece model (file or directory)")
    p.add_argument("--input", nargs="+", required=True,
                   help="files or globs (quoted), in order: .txt/.jsonl, or .json/.jsonl with --sft")
    p.add_argument("--output_dir", required=True, help="token directory to write (must not exist)")
    p.add_argument("--num_workers", type=positive_int, default=default_workers(),
                   help="tokenizing processes (default: CPU count, at most 8); the output is the "
                        "same for any number")
    p.add_argument("--chunk_mb", type=positive_float, default=64.0,
                   help="input per work unit and token file, in MB (default 64)")
    p.add_argument("--overwrite", action="store_true", help="replace --output_dir if it exists")
    g = p.add_argument_group("pretraining text")
    g.add_argument("--text_key", default="text", help="the text field of .jsonl lines (default text)")
    g.add_argument("--no_bos", action="store_true", help="do not start documents with <s>")
    g.add_argument("--no_eos", action="store_true", help="do not end documents with </s>")
    g.add_argument("--errors", choices=ERRORS, default="strict",
                   help="undecodable UTF-8: stop (naming file and line), replace with U+FFFD, or "
                        "skip the line (with --sft too; a .json list takes only replace); counts "
                        "go to meta.json")
    g = p.add_argument_group("instruction data (--sft)")
    g.add_argument("--sft", action="store_true", help="prepare instruction data")
    g.add_argument("--template", default="cla_v1", choices=tuple(TEMPLATES),
                   help="prompt template (default cla_v1, Chinese-Alpaca's)")
    g.add_argument("--max_seq_length", type=positive_int, default=512,
                   help="longest sample in tokens; longer ones are shortened, keeping EOS (default 512)")
    g.add_argument("--field_map", default="",
                   help="our=theirs pairs, e.g. instruction=question,output=std_answer; dotted "
                        "paths reach nested fields (input=instances.0.input)")
    g.add_argument("--system_prompt", help="for templates with a system prompt (default: the template's)")
    return p


def parse_options(argv: list[str] | None = None) -> PrepareOptions:
    """The job a command line describes (argparse's usage errors exit with status 2)."""
    return PrepareOptions.from_args(build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    opts = parse_options(argv)
    with command_errors(output=opts.output_dir):
        meta = prepare(opts)
        sft = meta["kind"] == "sft"
        skipped = ", ".join(f"{v:,} {k}" for k, v in meta["skipped"].items()) or "none"
        extra = f"; {meta['truncated']:,} truncated" if sft else ""
        print(f"wrote {opts.output_dir}: {meta['num_documents']:,} {'samples' if sft else 'documents'}, "
              f"{meta['num_tokens']:,} tokens ({meta['dtype']}) in {len(meta['files'])} file(s); "
              f"skipped: {skipped}{extra}")


if __name__ == "__main__":
    main()
