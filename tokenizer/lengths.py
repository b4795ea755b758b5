"""How much text each token stands for: characters and UTF-8 bytes per token id.

Loss per token cannot compare two tokenizers (the merged Chinese vocabulary needs about half
the tokens of LLaMA's for the same text), but loss per character or per byte of the text
can: bits per character = summed token NLL in bits ÷ characters of the decoded text.

The decoded text of a document is what sentencepiece's decode gives for its tokens. Token by
token that is: a normal piece is its text with "▁" as a space; a byte piece (<0xE4>, byte
fallback) is one byte, and one character when it starts a UTF-8 sequence (a continuation
byte 0b10xxxxxx adds no character); control pieces (<s>, </s>) are nothing; and, with
add_dummy_prefix, the space that begins the first piece of a document (the one after <s>)
is the prefix sentencepiece added, not text. `tests/test_lengths.py` checks these rules
against sentencepiece's own decode on the real corpora.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .labels import IGNORE_INDEX
from .spm_io import load_sp, read_proto

SPACE = "\u2581"  # sentencepiece's "▁"


@dataclass(frozen=True)
class TextLengths:
    """Characters and bytes of text per token id of one tokenizer."""

    chars: torch.Tensor  # (vocab,) int64
    bytes: torch.Tensor  # (vocab,) int64
    # the piece begins with "▁", which after <s> is the dummy prefix rather than text
    leading_space: torch.Tensor  # (vocab,) bool
    bos_id: int  # -1: none
    dummy_prefix: bool  # the tokenizer adds a "▁" before each text it encodes

    def of_targets(self, tokens: torch.Tensor, labels: torch.Tensor,
                   starts: torch.Tensor | None = None) -> tuple[int, int]:
        """(characters, bytes) of the text the targets of a batch stand for.

        labels[:, j] is the token that follows tokens[:, j] (-100: no target), as the
        training batches hold them. A target that begins an encoded text loses the dummy
        prefix: `starts` marks those targets (the same shape as labels), or by default
        `text_starts` finds them.
        """
        keep = labels != IGNORE_INDEX
        targets = labels[keep].long().cpu()
        chars, nbytes = self.chars[targets], self.bytes[targets]
        if self.dummy_prefix:
            starts = self.text_starts(tokens, labels) if starts is None else starts
            prefix = starts[keep].cpu() & self.leading_space[targets]
            chars, nbytes = chars - prefix.long(), nbytes - prefix.long()
        return int(chars.sum()), int(nbytes.sum())

    def text_starts(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Which targets begin a text that was encoded on its own: the first token after
        <s> (a pretraining document, an instruction prompt), and the first target after
        unscored positions in a row (a response, which `data.sft.encode_sample` encodes
        alone). (batch, length) bool."""
        scored = labels != IGNORE_INDEX
        after_unscored = torch.zeros_like(scored)
        after_unscored[:, 1:] = scored[:, 1:] & ~scored[:, :-1]
        return scored & ((tokens == self.bos_id) | after_unscored)

    def of_document(self, ids: list[int] | np.ndarray) -> tuple[int, int]:
        """(characters, bytes) of a whole document's decoded text, <s> and </s> included
        or not."""
        t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        if len(t) == 0:
            return 0, 0
        # every token is a target of the one before it; the first one begins the text
        before = torch.cat([torch.tensor([self.bos_id]), t[:-1]])
        starts = before == self.bos_id
        starts[0] = True
        return self.of_targets(before[None], t[None], starts[None])


def text_lengths(tokenizer: str | Path) -> TextLengths:
    """The table for a sentencepiece model file."""
    sp = load_sp(Path(tokenizer))
    proto = read_proto(tokenizer)
    n = sp.vocab_size()
    chars, nbytes, leading = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool)
    for i in range(n):
        if sp.is_control(i):
            continue
        if sp.is_byte(i):
            value = int(sp.id_to_piece(i)[3:5], 16)  # <0xAB>
            nbytes[i] = 1
            chars[i] = 0 if 0x80 <= value < 0xC0 else 1
            continue
        text = sp.decode_pieces([sp.id_to_piece(i)]) if sp.is_unknown(i) else \
            sp.id_to_piece(i).replace(SPACE, " ")
        chars[i], nbytes[i] = len(text), len(text.encode("utf-8"))
        leading[i] = sp.id_to_piece(i).startswith(SPACE)
    return TextLengths(torch.from_numpy(chars), torch.from_numpy(nbytes), torch.from_numpy(leading),
                       sp.bos_id(), bool(proto.normalizer_spec.add_dummy_prefix))
