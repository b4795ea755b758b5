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
Writes P.model and P.vocab, atomically.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm

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

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> TrainTokenizerOptions:
        return cls(input=tuple(a.input), model_prefix=Path(a.model_prefix), vocab_size=a.vocab_size,
                   model_type=a.model_type, character_coverage=a.character_coverage,
                   input_sentence_size=a.input_sentence_size,
                   max_sentence_length=a.max_sentence_length, num_threads=a.num_threads,
                   overwrite=a.overwrite)


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
        try:
            spm.SentencePieceTrainer.train(**trainer_options(a, str(tmp / prefix.name), inputs))
        except RuntimeError as e:
            raise ValueError(explain_trainer_error(e, a, inputs)) from None
    return outputs[0]


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
    return p


def main(argv: list[str] | None = None) -> None:
    a = TrainTokenizerOptions.from_args(build_parser().parse_args(argv))
    with command_errors(output=a.model_prefix):
        model = train(a)
        sp = spm.SentencePieceProcessor(model_file=str(model))
        print(f"wrote {model} ({sp.vocab_size()} pieces)")


if __name__ == "__main__":
    main()
