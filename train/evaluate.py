"""Evaluate a model on text or instruction data: loss, perplexity, accuracy, and bits per
character and per UTF-8 byte, which compare across tokenizers as loss cannot.

    python -m train.evaluate MODEL [--lora_model A[,B,..]] --input FILE_OR_DIR [..]
        [--template cla_v1] [--block_size 512] [--batch_size 8] [--json]

Each input is evaluated on its own:
  * a .txt/.jsonl text file: documents as pretraining stores them (<s>text</s>, one per
    line; a .jsonl line's --text_key field), every token after <s> scored;
  * with --template, a .json/.jsonl instruction file: samples in the template, as
    `data.prepare --sft` makes them, scored on the response (and its </s>) only;
  * a token directory made by `data.prepare` (either kind), as it is.
Files are tokenized exactly as `data.prepare` would (with the model's tokenizer). A
document longer than --block_size is scored in consecutive windows of that many tokens,
each token once; each window sees only its own tokens. bits/char = the summed NLL of the
scored tokens in bits ÷ the characters of the text they decode to (tokenizer/lengths.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from data.datasets import TokenStream, shift_labels
from data.prepare import PrepareOptions, prepare
from data.sft import SFTPreparer
from data.shards import DataError, read_meta
from data.text import TextPreparer
from model.generate import add_model_arguments, adapter_dirs, model_dtype, open_model, pick_device
from model.source import Checkpoint, load_model
from tokenizer.cli import ArgumentParser, command_errors, positive_int
from tokenizer.labels import IGNORE_INDEX
from tokenizer.lengths import TextLengths, text_lengths
from tokenizer.templates import TEMPLATES

from .data_checks import check_data_for_model
from .distributed import DistInfo
from .trainer import evaluate

# What one scored window holds: its tokens, their labels (-100: not scored), and which
# targets begin an encoded text (TextLengths.text_starts).
Window = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class EvalOptions:
    """How inputs are read and scored."""

    template: str | None = None  # instruction data in this SFT template; None: plain text
    block_size: int = 512  # tokens per window
    batch_size: int = 8  # rows per forward
    text_key: str = "text"  # the text field of .jsonl lines
    max_seq_length: int = 512  # instruction data: the longest sample, as data.prepare's
    chunk_size: int = 4096  # tokens per chunk of the output layer


def documents(path: Path) -> Iterator[tuple[np.ndarray, int]]:
    """(tokens, first target) of every document of a token directory: pretraining
    documents are scored from their second token, instruction samples from the response."""
    stream = TokenStream(path)
    starts = stream.document_starts()
    ends = np.append(starts[1:], len(stream))
    if stream.meta["kind"] == "sft":
        firsts = np.concatenate([np.fromfile(path / f["plen"], dtype="<u4") for f in stream.files])
    else:
        firsts = np.ones(len(starts), dtype=np.int64)
    for start, end, first in zip(starts, ends, firsts):
        yield stream.read(int(start), int(end - start)).astype(np.int64), int(first)


def windows(tokens: np.ndarray, first_target: int, block_size: int, lengths: TextLengths
            ) -> Iterator[Window]:
    """A document cut into windows of at most block_size tokens that score each of its
    targets once: window k starts at k·(block_size − 1), so its first token is the
    previous window's last, whose successor it predicts. Which targets begin a text is
    decided on the whole document (a window may begin at a response's first token)."""
    labels = shift_labels(tokens, first_target)
    starts = lengths.text_starts(torch.from_numpy(tokens)[None], torch.from_numpy(labels)[None])[0].numpy()
    step = block_size - 1
    for start in range(0, max(len(tokens) - 1, 1), step):
        piece = slice(start, start + block_size)
        w_labels = labels[piece].copy()
        w_labels[-1] = IGNORE_INDEX  # predicted by the next window, which begins here
        if (w_labels != IGNORE_INDEX).any():
            yield tokens[piece], w_labels, starts[piece]


def packed_batches(items: Iterator[Window], block_size: int, batch_size: int
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """Windows packed several to a row of block_size tokens, each its own segment (its own
    attention and positions, as if run alone); batch_size rows per batch."""
    rows: list[list[Window]] = [[]]
    used = 0
    for w in items:
        if rows[-1] and used + len(w[0]) > block_size:
            if len(rows) == batch_size:
                yield collate(rows)
                rows = []
            rows.append([])
            used = 0
        rows[-1].append(w)
        used += len(w[0])
    if rows[-1]:
        yield collate(rows)


def collate(rows: list[list[Window]]) -> dict[str, torch.Tensor]:
    width = max(sum(len(w[0]) for w in row) for row in rows)
    tokens = np.zeros((len(rows), width), dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    starts = np.zeros((len(rows), width), dtype=bool)
    segments = np.full((len(rows), width), max(len(r) for r in rows), dtype=np.int64)  # padding: its own
    for r, row in enumerate(rows):
        pos = 0
        for s, (t, l, first) in enumerate(row):
            span = slice(pos, pos + len(t))
            tokens[r, span], labels[r, span], starts[r, span], segments[r, span] = t, l, first, s
            pos += len(t)
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "segment_ids": torch.from_numpy(segments), "text_starts": torch.from_numpy(starts)}


def token_dir(source: Path, base: Checkpoint, opts: EvalOptions, scratch: Path) -> Path:
    """`source` as a token directory: itself, or its tokenization by data.prepare's rules."""
    if source.is_dir():
        check_data_for_model(source, base, read_meta(source)["kind"], note=False)
        return source
    if not source.is_file():
        raise DataError(f"{source}: no such input file or token directory")
    preparer = (SFTPreparer(template=opts.template, max_seq_length=opts.max_seq_length)
                if opts.template else TextPreparer(text_key=opts.text_key))
    out = scratch / "tokens"
    prepare(PrepareOptions(tokenizer=base.tokenizer, input=(str(source),), output_dir=out,
                           preparer=preparer, num_workers=1, overwrite=True))
    return out


def evaluate_input(model: torch.nn.Module, base: Checkpoint, source: Path, opts: EvalOptions,
                   dist: DistInfo) -> dict[str, float | int | str]:
    """The figures of one input file or token directory."""
    with tempfile.TemporaryDirectory(prefix="zhllama-eval-") as scratch:
        path = token_dir(source, base, opts, Path(scratch))
        meta = read_meta(path)
        lengths = text_lengths(base.tokenizer)
        counted = {"documents": 0, "characters": 0, "tokens": 0}

        def scored() -> Iterator[Window]:
            for tokens, first in documents(path):
                counted["documents"] += 1
                for w in windows(tokens, first, opts.block_size, lengths):
                    chars, _ = lengths.of_targets(*(torch.from_numpy(a)[None] for a in w))
                    counted["characters"] += chars
                    counted["tokens"] += int((w[1] != IGNORE_INDEX).sum())
                    yield w

        batches = tqdm(packed_batches(scored(), opts.block_size, opts.batch_size),
                       desc=f"evaluating {source.name}", unit="batch", leave=False)
        found = evaluate(model, iter(batches), None, opts.chunk_size, dist, lengths)
    return {"input": str(source), "kind": meta["kind"], **counted, **found}


def format_row(r: dict) -> str:
    return (f"{r['input']}: {r['documents']:,} {'samples' if r['kind'] == 'sft' else 'documents'}, "
            f"{r['characters']:,} characters, {r['tokens']:,} tokens scored; loss {r['loss']:.4f}, "
            f"ppl {r['ppl']:.3f}, bits/char {r['bpc']:.4f}, bits/byte {r['bpb']:.4f}, "
            f"accuracy {r['acc']:.4f}")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--input", nargs="+", required=True,
                   help="text files (.txt, .jsonl), instruction files with --template (.json, "
                        ".jsonl), or token directories made by data.prepare; each evaluated alone")
    p.add_argument("--template", choices=tuple(TEMPLATES),
                   help="the inputs are instruction data in this template: score the responses")
    p.add_argument("--block_size", type=positive_int, default=512,
                   help="tokens per window (default 512; at most the model's max_seq_len)")
    p.add_argument("--batch_size", type=positive_int, default=8, help="rows per forward (default 8)")
    p.add_argument("--max_seq_length", type=positive_int, default=512,
                   help="instruction data: the longest sample, shortened as data.prepare does (default 512)")
    p.add_argument("--text_key", default="text", help="the text field of .jsonl lines (default text)")
    p.add_argument("--json", action="store_true", help="one JSON line per input instead of text")
    return p


def run(model_path: str, adapters: Sequence[str], inputs: Sequence[str], opts: EvalOptions, *,
        tokenizer: str | None = None, force_base: bool = False, device: str | None = None,
        dtype: str | None = None) -> list[dict]:
    """Open the model (adapters applied in memory) and evaluate each input."""
    base = open_model(model_path, adapters, tokenizer=tokenizer, force_base=force_base)
    if opts.block_size < 2:
        raise ValueError(f"--block_size {opts.block_size}: a window needs at least 2 tokens")
    if opts.block_size > base.args.max_seq_len:
        raise ValueError(f"--block_size {opts.block_size} is above the model's max_seq_len "
                         f"{base.args.max_seq_len}")
    dev = pick_device(device)
    model = load_model(base, device=dev, dtype=model_dtype(dtype, dev))
    return [evaluate_input(model, base, Path(i), opts, DistInfo.alone(dev)) for i in inputs]


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    with command_errors():
        adapters = adapter_dirs(a.lora_model)
        opts = EvalOptions(template=a.template, block_size=a.block_size, batch_size=a.batch_size,
                           text_key=a.text_key, max_seq_length=a.max_seq_length)
        for row in run(a.model, adapters, a.input, opts, tokenizer=a.tokenizer,
                       force_base=a.force_base, device=a.device, dtype=a.dtype):
            print(json.dumps(row, ensure_ascii=False) if a.json else format_row(row), flush=True)


if __name__ == "__main__":
    main()
