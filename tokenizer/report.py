"""Compare tokenizers on a corpus: how many tokens, how much byte fallback, how fast.

    python -m tokenizer.report --tokenizer llama.model --tokenizer merged/ [...] --input FILES..

Per tokenizer: tokens per 1,000 characters, characters per token, the share of tokens that
are byte-fallback pieces (<0xE4> …: characters the vocabulary lacks), unknown tokens, and
encode and decode speed in characters per second (one thread, whole lines, median of
three runs); then each figure as a ratio to the first tokenizer. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

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


def _best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(tokenizer: str, lines: list[str]) -> Stats:
    path = resolve_model_file(tokenizer)
    sp = load_sp(path)
    ids = sp.encode(lines, num_threads=1)
    flat = [i for row in ids for i in row]
    chars = sum(len(line) for line in lines)
    enc = _best_of(lambda: sp.encode(lines, num_threads=1))
    dec = _best_of(lambda: sp.decode(ids, num_threads=1))
    name = path.parent.name if path.name == "tokenizer.model" else path.name
    return Stats(name=name, vocab=sp.vocab_size(), chars=chars, tokens=len(flat),
                 byte_tokens=sum(1 for i in flat if sp.is_byte(i)),
                 unknown=sum(1 for i in flat if sp.is_unknown(i)),
                 encode_cps=chars / enc, decode_cps=chars / dec)


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tokenizer.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", action="append", required=True,
                   help="a sentencepiece model or a directory holding tokenizer.model (repeat)")
    p.add_argument("--input", nargs="+", required=True, help="UTF-8 text files")
    a = p.parse_args(argv)
    try:
        lines = read_lines(a.input)
        stats = [measure(t, lines) for t in a.tokenizer]
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{len(lines):,} lines, {stats[0].chars:,} characters from {', '.join(a.input)}\n")
    print(table(stats))


if __name__ == "__main__":
    main()
