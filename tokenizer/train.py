"""Train the Chinese sentencepiece model that `tokenizer.merge` adds to LLaMA's.

    python -m tokenizer.train --input zh1.txt zh2.txt --model_prefix out/chinese_sp \\
        [--vocab_size 20000] [--model_type unigram|bpe] [--character_coverage 0.9995] \\
        [--input_sentence_size 10000000] [--num_threads N] [--overwrite]

Defaults chosen for a model that is merged into LLaMA's tokenizer afterwards:
  * identity normalisation and no removal of extra whitespace — LLaMA's own settings. The
    merged tokenizer keeps LLaMA's (identity) normaliser, so pieces learnt on NFKC-folded
    text (sentencepiece's default) would not match the raw text they meet at encoding
    time; and llama.cpp tokenises without any normaliser, so identity keeps it equal
    to sentencepiece.
  * split_digits, as LLaMA: no piece holds a digit, so the merge cannot defeat LLaMA's
    digit splitting.
  * no byte fallback: the merged model inherits LLaMA's 256 byte pieces.
  * character_coverage 0.9995 (the usual choice for CJK): the rarest characters are left
    to LLaMA's byte fallback instead of taking vocabulary slots.
  * large corpora are sampled: --input_sentence_size lines drawn at random (shuffled).
`--model_type bpe` gives pieces that LLaMA's BPE encoder can always produce (every piece
is the merge of two others); unigram pieces may not be (see tokenizer.merge).
Writes P.model and P.vocab, atomically. sentencepiece's own log (its C++ trainer writes
to the process's stderr) is shown with --verbose; otherwise one status line says which
stage the trainer is at, and a failure prints only our `error:` line.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import sentencepiece as spm
from tqdm.auto import tqdm

from .cli import ArgumentParser, command_errors, non_negative_int, positive_int, probability
from .files import atomic_output_files


def default_threads() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class TrainTokenizerOptions:
    """What to train on and how (the command's options; see the module docstring)."""

    input: tuple[str, ...]  # text files or globs, one sentence or document per line
    model_prefix: Path  # writes PREFIX.model and PREFIX.vocab
    vocab_size: int = 20000
    model_type: str = "unigram"  # or "bpe"
    character_coverage: float = 0.9995
    input_sentence_size: int = 10_000_000  # lines sampled at most (0: all)
    max_sentence_length: int = 16384  # longest line used, in bytes
    num_threads: int = field(default_factory=default_threads)
    overwrite: bool = False
    verbose: bool = False  # show sentencepiece's own log instead of a status line

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> TrainTokenizerOptions:
        return cls(input=tuple(a.input), model_prefix=Path(a.model_prefix), vocab_size=a.vocab_size,
                   model_type=a.model_type, character_coverage=a.character_coverage,
                   input_sentence_size=a.input_sentence_size,
                   max_sentence_length=a.max_sentence_length, num_threads=a.num_threads,
                   overwrite=a.overwrite, verbose=a.verbose)


def expand_inputs(patterns: tuple[str, ...] | list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches or not all(Path(m).is_file() for m in matches):
            raise FileNotFoundError(f"{pattern}: no such input file")
        files += [Path(m) for m in matches]
    if not any(f.stat().st_size > 0 for f in files):
        raise ValueError(f"the corpus is empty: {', '.join(map(str, files))}")
    return files


def trainer_options(a: TrainTokenizerOptions, prefix: str, inputs: list[Path]) -> dict:
    return dict(
        input=",".join(map(str, inputs)), model_prefix=prefix, vocab_size=a.vocab_size,
        model_type=a.model_type, character_coverage=a.character_coverage,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, byte_fallback=False,
        input_sentence_size=a.input_sentence_size, shuffle_input_sentence=True,
        max_sentence_length=a.max_sentence_length, num_threads=a.num_threads,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # LLaMA's special ids
    )


def train(a: TrainTokenizerOptions) -> Path:
    """Train the sentencepiece model and write PREFIX.model and PREFIX.vocab atomically.

    Returns:
        The path of the .model written.

    Raises:
        FileNotFoundError: an input is missing; FileExistsError: an output exists (without
        `overwrite`); ValueError: an empty corpus, or settings sentencepiece refuses.
    """
    prefix = Path(a.model_prefix)
    outputs = [prefix.with_name(prefix.name + ext) for ext in (".model", ".vocab")]
    inputs = expand_inputs(a.input)
    # the trainer writes into a temporary directory beside the outputs, named with our pid
    # so that the next run removes it if this one is killed
    with atomic_output_files(outputs, a.overwrite, inputs=inputs) as tmp:
        with trainer_log(a.verbose):
            try:
                spm.SentencePieceTrainer.train(**trainer_options(a, str(tmp / prefix.name), inputs))
            except RuntimeError as e:
                raise ValueError(explain_trainer_error(e, a, inputs)) from None
    return outputs[0]


@contextlib.contextmanager
def native_stderr(on_line: Callable[[str], None]) -> Iterator[TextIO]:
    """Send what is written to file descriptor 2 (C++ code's stderr, and Python's) to
    `on_line`, a line at a time, until the block ends; yields a stream on the real stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)  # fd 2 is now the pipe's only writer: restoring it ends the pump

    def pump() -> None:
        with os.fdopen(read_end, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                on_line(line.rstrip("\n"))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    real = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        yield real
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        thread.join()
        real.close()


_LOG_LINE = re.compile(r"[IWEF]\d{4} \S+ +\d+ \S+:\d+\] (.*)")


@contextlib.contextmanager
def trainer_log(verbose: bool) -> Iterator[None]:
    """While sentencepiece trains: its log as it is (verbose), or a status line showing the
    stage its latest log line names. Nothing of it is left on the screen when it fails."""
    if verbose:
        yield
        return
    status: list[tqdm] = []

    def on_line(line: str) -> None:
        # the trainer's log lines, without absl's prefix ("I0000 00:00:… 123 file.cc:409] ");
        # the lines of the settings it prints first are not news
        if status and (m := _LOG_LINE.match(line)):
            status[0].set_postfix_str(m.group(1)[:60], refresh=True)

    with native_stderr(on_line) as real:
        # a status line belongs on a terminal; in a log file its redraws would be noise
        bar = tqdm(desc="training sentencepiece", file=real, bar_format="{desc}: {elapsed} {postfix}",
                   leave=False, disable=not real.isatty())
        status.append(bar)
        try:
            yield
        finally:
            bar.close()


def explain_trainer_error(e: RuntimeError, a: TrainTokenizerOptions, inputs: list[Path]) -> str:
    """sentencepiece's trainer errors, which quote its C++ checks, as the option to change.

    e.g. "Vocabulary size too high (5000). Please set it to a value <= 300." becomes
    "--vocab_size 5000 is too large for corpus.txt: …".
    """
    text, corpus = " ".join(str(e).split()), ", ".join(map(str, inputs))
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text):
        return (f"--vocab_size {m.group(1)} is too large for {corpus}: sentencepiece can make at most "
                f"{m.group(2)} pieces from it (lower --vocab_size, or give more text)")
    if m := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", text):
        return (f"--vocab_size {m.group(1)} is smaller than the {m.group(2)} characters and special pieces "
                f"that --character_coverage {a.character_coverage} keeps from {corpus} (raise "
                "--vocab_size or lower --character_coverage)")
    if m := re.search(r"\[(trainer_spec_?\.(\w+)\(\).*?)\]", text):
        # a range check on one of the trainer's settings, most of which are our options
        option = m.group(2)
        rule = re.sub(r"trainer_spec_?\.(\w+)\(\)", r"\1", m.group(1))
        if hasattr(a, option):
            return f"--{option} {getattr(a, option)}: sentencepiece requires {rule}"
    return f"sentencepiece could not train on {corpus}: {text}"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m tokenizer.train", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="text files (globs allowed), one sentence or document per line")
    p.add_argument("--model_prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab_size", type=positive_int, default=20000)
    p.add_argument("--model_type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument("--character_coverage", type=probability, default=0.9995)
    p.add_argument("--input_sentence_size", type=non_negative_int, default=10_000_000,
                   help="sample at most this many lines (0: all)")
    p.add_argument("--max_sentence_length", type=positive_int, default=16384, help="longest line used, in bytes")
    p.add_argument("--num_threads", type=positive_int, default=default_threads())
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")
    return p


def main(argv: list[str] | None = None) -> None:
    a = TrainTokenizerOptions.from_args(build_parser().parse_args(argv))
    with command_errors(output=a.model_prefix):
        model = train(a)
        sp = spm.SentencePieceProcessor(model_file=str(model))
        print(f"wrote {model} ({sp.vocab_size()} pieces)")


if __name__ == "__main__":
    main()
