"""Compare tokenizers on a corpus: how many tokens, how much byte fallback, how fast.

    python -m tokenizer.report --tokenizer llama.model --tokenizer merged/ [...] --input FILES..

Per tokenizer: tokens per 1,000 characters, characters per token, the share of tokens that
are byte-fallback pieces (<0xE4> …: characters the vocabulary lacks), unknown tokens, and
encode and decode speed in characters per second (one thread, whole lines; the tokenizers
take turns over several rounds and the medians are kept); then each figure as a ratio to
the first tokenizer. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from .cli import ArgumentParser, command_errors, positive_int
from .spm_io import load_sp, resolve_model_file


@dataclass
class Stats:
    name: str
    vocab: int
    chars: int
    tokens: int
    byte_tokens: int
    unknown: int
    encode_cps: float
    decode_cps: float

    @property
    def tokens_per_kchar(self) -> float:
        return 1000 * self.tokens / self.chars

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens


def read_lines(paths: list[str]) -> list[str]:
    lines = []
    for p in paths:
        path = Path(p)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such input file") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None
        lines += [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"no text in {', '.join(paths)}")
    return lines


def count(sp, lines: list[str]) -> tuple[int, int, int, int]:
    """(characters, tokens, byte-fallback tokens, unknown tokens) of `lines` under `sp`."""
    ids = sp.encode(lines, num_threads=1)
    flat = [i for row in ids for i in row]
    return (sum(len(line) for line in lines), len(flat),
            sum(1 for i in flat if sp.is_byte(i)), sum(1 for i in flat if sp.is_unknown(i)))


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timings(sps: list, lines: list[str], repeats: int) -> list[tuple[float, float]]:
    """Median (encode, decode) seconds per tokenizer over `repeats` rounds.

    The tokenizers take turns within each round, so a slow moment of a busy machine falls
    on all of them rather than on whichever happened to run then.
    """
    ids = [sp.encode(lines, num_threads=1) for sp in sps]
    rounds = [[(_seconds(lambda: sp.encode(lines, num_threads=1)),
                _seconds(lambda: sp.decode(row_ids, num_threads=1)))
               for sp, row_ids in zip(sps, ids)] for _ in range(repeats)]
    return [(statistics.median(r[k][0] for r in rounds), statistics.median(r[k][1] for r in rounds))
            for k in range(len(sps))]


def measure(tokenizers: list[str], lines: list[str], repeats: int = 5) -> list[Stats]:
    """Counts and speeds of each tokenizer (a model file or a directory holding one)."""
    paths = [resolve_model_file(t) for t in tokenizers]
    sps = [load_sp(p) for p in paths]
    out = []
    for path, sp, (enc, dec) in zip(paths, sps, timings(sps, lines, repeats)):
        chars, tokens, byte_tokens, unknown = count(sp, lines)
        name = path.parent.name if path.name == "tokenizer.model" else path.name
        out.append(Stats(name=name, vocab=sp.vocab_size(), chars=chars, tokens=tokens,
                         byte_tokens=byte_tokens, unknown=unknown,
                         encode_cps=chars / enc, decode_cps=chars / dec))
    return out


def table(stats: list[Stats]) -> str:
    ref = stats[0]
    head = ("| tokenizer | vocab | tokens / 1k chars | chars / token | byte fallback | unknown | "
            "encode (k chars/s) | decode (k chars/s) | tokens vs first | encode speed vs first | "
            "decode speed vs first |")
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    for s in stats:
        rows.append(
            f"| {s.name} | {s.vocab:,} | {s.tokens_per_kchar:.1f} | {s.chars_per_token:.2f} | "
            f"{s.byte_tokens / s.tokens:.1%} | {s.unknown} | {s.encode_cps / 1e3:,.0f} | "
            f"{s.decode_cps / 1e3:,.0f} | {s.tokens / ref.tokens:.3f}× | "
            f"{s.encode_cps / ref.encode_cps:.2f}× | {s.decode_cps / ref.decode_cps:.2f}× |")
    return "\n".join(rows)


@dataclass(frozen=True)
class ReportOptions:
    """Which tokenizers to compare (the first is the reference) on which text."""

    tokenizers: tuple[str, ...]  # sentencepiece models, or directories holding tokenizer.model
    input: tuple[str, ...]  # UTF-8 text files
    repeats: int = 5  # timing rounds; medians reported


def report(opts: ReportOptions) -> str:
    """The comparison as printed: what was read, then the markdown table.

    Raises:
        FileNotFoundError: a tokenizer or input is missing; ValueError: no text, or a file
        that is not UTF-8 or not a sentencepiece model.
    """
    lines = read_lines(list(opts.input))
    stats = measure(list(opts.tokenizers), lines, opts.repeats)
    return (f"{len(lines):,} lines, {stats[0].chars:,} characters from {', '.join(opts.input)}\n\n"
            + table(stats))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m tokenizer.report", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", action="append", required=True,
                   help="a sentencepiece model or a directory holding tokenizer.model (repeat)")
    p.add_argument("--input", nargs="+", required=True, help="UTF-8 text files")
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="timing rounds, tokenizers taking turns in each; medians reported (default 5)")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    opts = ReportOptions(tokenizers=tuple(a.tokenizer), input=tuple(a.input), repeats=a.repeats)
    with command_errors():
        print(report(opts))


if __name__ == "__main__":
    main()
