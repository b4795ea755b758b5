"""ROUGE-L between short texts, for self-instruct's near-duplicate filter, on characters
for Chinese.

`rouge_tokens` splits a text into ROUGE's units: each CJK (or other non-Latin) character
on its own, each run of Latin letters or digits as one word, punctuation and spaces
dropped, after NFKC (full-width letters and digits are their ASCII selves) and
lowercasing. `CharTokenizer` hands the same split to the `rouge-score` package's scorer,
whose own tokenizer keeps only [a-z0-9] and so finds nothing in Chinese. `rouge_l` gives
that scorer's F-measure exactly (tested against it on real Chinese instructions), with
the longest common subsequence computed bit-parallel (Allison and Dix's recurrence on
Python integers: one addition and a few bit operations per token of the other text,
instead of a table of len(a) × len(b) cells), which keeps self-instruct's thousands of
comparisons per task fast.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

# a run of ASCII letters/digits, or any other single word character (CJK, kana, Cyrillic …)
_TOKEN = re.compile(r"[a-z0-9]+|[^\W_]")


def rouge_tokens(text: str) -> list[str]:
    """ROUGE's units of `text`: characters for Chinese, words for Latin script."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


class CharTokenizer:
    """`rouge_tokens` as a tokenizer for `rouge_score.rouge_scorer.RougeScorer(tokenizer=…)`."""

    def tokenize(self, text: str) -> list[str]:
        return rouge_tokens(text)


def _masks(tokens: Sequence[str]) -> dict[str, int]:
    """Bit i of masks[t] is set where tokens[i] == t."""
    masks: dict[str, int] = {}
    for i, t in enumerate(tokens):
        masks[t] = masks.get(t, 0) | (1 << i)
    return masks


def _lcs(masks: dict[str, int], n: int, other: Sequence[str]) -> int:
    """Length of the longest common subsequence of the n tokens behind `masks` and `other`.

    v starts as n ones; each token of `other` that occurs in the first text turns ones
    into zeros (u = v & mask; v = (v + u) | (v - u)); the zeros left count the LCS.
    """
    full = (1 << n) - 1
    v = full
    for t in other:
        m = masks.get(t)
        if m:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return n - v.bit_count()


def _fmeasure(lcs: int, target_len: int, prediction_len: int) -> float:
    # rouge-score's arithmetic, step for step, so the floats are its floats
    if not lcs:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    return 2 * precision * recall / (precision + recall)


def rouge_l(target: Sequence[str], prediction: Sequence[str]) -> float:
    """ROUGE-L F-measure of two token lists (rouge-score's `_score_lcs(...).fmeasure`)."""
    if not target or not prediction:
        return 0.0
    return _fmeasure(_lcs(_masks(target), len(target), prediction), len(target), len(prediction))


class RougeIndex:
    """Token lists kept so far, and the highest ROUGE-L of a new one against them."""

    def __init__(self) -> None:
        self._kept: list[list[str]] = []

    def __len__(self) -> int:
        return len(self._kept)

    def add(self, tokens: Sequence[str]) -> None:
        self._kept.append(list(tokens))

    def highest(self, tokens: Sequence[str], at_least: float = 0.0) -> tuple[float, int]:
        """(score, index) of the kept token list most like `tokens` (-1: none kept).

        Lists whose length alone keeps them below `at_least` (F ≤ 2·min/(n+m)) are not
        compared; when every list is below `at_least` the score returned is below it too.
        """
        n = len(tokens)
        best, where = 0.0, -1
        if not n:
            return best, where
        masks = _masks(tokens)
        for i, other in enumerate(self._kept):
            m = len(other)
            if not m or 2 * min(n, m) / (n + m) < max(at_least, best):
                continue
            score = _fmeasure(_lcs(masks, n, other), n, m)
            if score > best or where < 0:
                best, where = score, i
        return best, where
