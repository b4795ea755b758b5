"""Grow `tok_embeddings` and `output` to a larger vocabulary.

    python -m model.resize MODEL --tokenizer NEW_TOKENIZER --output DIR
        [--init subtoken|mean|normal] [--pad_to_multiple_of N]

Old rows are kept bit for bit; new rows are initialised by `init`:
  mean      the mean of the old rows (Stanford Alpaca's choice);
  subtoken  for each new piece, the mean of the old rows of the pieces the old tokenizer
            splits its text into — so a new piece starts where the model already
            understood its text to be (embedding and output rows alike); pieces with no
            text (control, user-defined such as a pad token) get the mean;
  normal    N(0, std of the old rows).
The new tokenizer must extend the old one: its first pieces identical, in order. Padding
rows past the old tokenizer's pieces (e.g. from --pad_vocab_to_multiple_of) are dropped
first, since the new pieces take their ids.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import sentencepiece as spm
import torch
from torch import nn

from tokenizer.cli import ArgumentParser, command_errors, positive_int
from tokenizer.files import check_output_against_inputs
from tokenizer.spm_io import load_sp, read_proto, resolve_model_file

from .formats import read_checkpoint, write_model_dir
from .llama import Transformer
from .source import Checkpoint, check_tokenizer_rows, pad_vocab
from .tensor_io import FormatError, TensorSpec, return_freed_memory_promptly

INITS = ("subtoken", "mean", "normal")
_RESIZED = ("tok_embeddings.weight", "output.weight")


def check_extends(old: spm.SentencePieceProcessor, new: spm.SentencePieceProcessor) -> None:
    """Refuse a tokenizer whose first pieces are not the old tokenizer's, in order."""
    if new.vocab_size() < old.vocab_size():
        raise ValueError(f"the new tokenizer has {new.vocab_size()} pieces, fewer than the "
                         f"model's {old.vocab_size()}: it cannot be an extension")
    for i in range(old.vocab_size()):
        if old.id_to_piece(i) != new.id_to_piece(i):
            raise ValueError(f"the new tokenizer does not extend the model's: id {i} is "
                             f"{new.id_to_piece(i)!r}, was {old.id_to_piece(i)!r}")


def _without_dummy_prefix(sp_file: Path) -> spm.SentencePieceProcessor:
    """The same tokenizer, but not adding "▁" in front of the text.

    A piece's text is encoded exactly as it is (a leading "▁" is a real space), so a
    piece that does not start a word is split into pieces that do not start a word either.
    """
    proto = read_proto(sp_file)
    proto.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    return sp


def subtoken_ids(old_sp_file: Path, new: spm.SentencePieceProcessor, start: int) -> list[list[int]]:
    """For each new id from `start` on, the old ids its text encodes to ([] if no text)."""
    old = _without_dummy_prefix(old_sp_file)
    out = []
    for i in range(start, new.vocab_size()):
        if new.is_control(i) or new.is_unknown(i) or new.is_unused(i) or new.is_byte(i):
            out.append([])
            continue
        piece = new.id_to_piece(i)
        out.append(old.encode(piece.replace("\u2581", " ")) if piece else [])
    return out


def new_rows(
    weight: torch.Tensor,
    n_new: int,
    init: str,
    subtokens: list[list[int]] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rows to append to `weight` (old_vocab, dim), computed in float32, returned in its dtype."""
    old = weight.float()
    mean = old.mean(dim=0)
    if init == "mean":
        rows = mean.expand(n_new, -1).clone()
    elif init == "normal":
        rows = torch.randn(n_new, old.shape[1], generator=generator) * old.std()
    elif init == "subtoken":
        if subtokens is None or len(subtokens) != n_new:
            raise ValueError("init='subtoken' needs the old ids of every new piece")
        rows = torch.stack([old[ids].mean(dim=0) if ids else mean for ids in subtokens])
    else:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
    return rows.to(weight.dtype)


def resize_token_embeddings(
    model: Transformer,
    new_vocab_size: int,
    init: str = "mean",
    *,
    subtokens: list[list[int]] | None = None,
    generator: torch.Generator | None = None,
) -> Transformer:
    """Grow a model's `tok_embeddings` and `output` in place (old rows untouched)."""
    old_vocab = model.args.vocab_size
    n_new = new_vocab_size - old_vocab
    if n_new < 0:
        raise ValueError(f"cannot shrink the vocabulary from {old_vocab} to {new_vocab_size}")
    with torch.no_grad():
        for module in (model.tok_embeddings, model.output):
            w = module.weight
            grown = torch.cat([w, new_rows(w, n_new, init, subtokens, generator).to(w.device)])
            module.weight = nn.Parameter(grown, requires_grad=w.requires_grad)
    model.tok_embeddings.num_embeddings = new_vocab_size
    model.output.out_features = new_vocab_size
    model.args = model.args.replace(vocab_size=new_vocab_size)
    return model


def resize_checkpoint(
    ckpt: Checkpoint,
    new_tokenizer: str | Path,
    init: str = "subtoken",
    *,
    pad_to_multiple_of: int | None = None,
    seed: int = 0,
) -> Checkpoint:
    """The checkpoint with its vocabulary grown to `new_tokenizer`'s, streamed like the rest."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
    if ckpt.tokenizer is None:
        raise FormatError(f"{ckpt.path}: the model has no tokenizer.model; the old tokenizer is "
                          "needed to check the new one extends it")
    new_file = resolve_model_file(new_tokenizer)
    # refuses a tokenizer larger than the rows, or smaller by more than padding
    padded = check_tokenizer_rows(ckpt)
    old_sp, new_sp = load_sp(ckpt.tokenizer), load_sp(new_file)
    check_extends(old_sp, new_sp)
    old_vocab, new_vocab = old_sp.vocab_size(), new_sp.vocab_size()
    if padded:  # the new pieces take the ids the padding rows had: those rows go first
        print(f"{padded}; they are dropped before growing to {new_vocab}", file=sys.stderr)
    subtokens = subtoken_ids(ckpt.tokenizer, new_sp, old_vocab) if init == "subtoken" else None
    specs = dict(ckpt.specs)
    for name in _RESIZED:
        specs[name] = TensorSpec((new_vocab, ckpt.args.dim), specs[name].dtype)
    get = ckpt.get

    def get_resized(name: str) -> torch.Tensor:
        t = get(name)
        if name not in _RESIZED:
            return t
        t = t[:old_vocab]
        generator = torch.Generator().manual_seed(seed + _RESIZED.index(name))
        return torch.cat([t, new_rows(t, new_vocab - old_vocab, init, subtokens, generator)])

    resized = ckpt.replace(args=ckpt.args.replace(vocab_size=new_vocab), specs=specs,
                           get=get_resized, tokenizer=new_file)
    return pad_vocab(resized, pad_to_multiple_of)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m model.resize", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model directory, or any checkpoint model.convert reads "
                   "(its tokenizer.model is the old tokenizer)")
    p.add_argument("--tokenizer", required=True, help="the new tokenizer (file or directory)")
    p.add_argument("--output", required=True, help="model directory to write")
    p.add_argument("--init", choices=INITS, default="subtoken", help="how new rows start")
    p.add_argument("--pad_to_multiple_of", type=positive_int, metavar="N",
                   help="add zero rows so the row count divides by N (e.g. 64 for GPUs, or the "
                        "number of Meta shards)")
    p.add_argument("--seed", type=int, default=0, help="for --init normal")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    return_freed_memory_promptly()
    with command_errors(output=a.output):
        check_output_against_inputs(a.output, (a.model, a.tokenizer))  # --overwrite cannot help
        if Path(a.output).exists() and not a.overwrite:  # fail before the work, not after
            raise FileExistsError(f"{a.output} already exists (use --overwrite to replace it)")
        ckpt = read_checkpoint(a.model, progress=not a.no_progress)
        old_vocab = ckpt.args.vocab_size
        ckpt = resize_checkpoint(ckpt, a.tokenizer, a.init,
                                 pad_to_multiple_of=a.pad_to_multiple_of, seed=a.seed)
        write_model_dir(ckpt, a.output, overwrite=a.overwrite, progress=not a.no_progress,
                        inputs=(a.model, a.tokenizer))
        print(f"wrote {a.output}: vocabulary {old_vocab} -> {ckpt.args.vocab_size} rows "
              f"(init {a.init})")


if __name__ == "__main__":
    main()
