"""Merge a Chinese sentencepiece model into the LLaMA tokenizer, as Chinese-LLaMA did.

    python -m tokenizer.merge --llama_tokenizer_dir DIR_OR_FILE --chinese_sp_model_file FILE \\
        --output_dir DIR [--new_piece_scores zero|ranked] [--add_pad_token] \\
        [--drop_digit_pieces] [--drop_ascii_pieces] [--drop_unreachable_pieces] [--overwrite]

The published algorithm (the default): walk the Chinese model's pieces in order and
append every piece the LLaMA model does not already have, as a normal piece with score 0;
the LLaMA model's trainer and normaliser specs stay as they are. With Meta's tokenizer
and Chinese-LLaMA's chinese_sp.model this gives 49,953 pieces, ids 0–31,999 unchanged.

What that merge does that users do not expect, and what the options change:
  * Appended pieces that contain digits ("10", "2023", "5.") defeat LLaMA's split_digits:
    "2023" stops being four tokens, so English text with numbers no longer tokenizes as
    it did. --drop_digit_pieces leaves them out (English then tokenizes exactly as before).
  * Appended ASCII-only pieces ("eo", "ple", "iPhone") change how English words split:
    appended pieces score 0, above every LLaMA merge, so "people" becomes "▁p eo ple"
    (1.2% of LLaMA's English word pieces change). --drop_ascii_pieces leaves them out;
    with both drops English tokenizes exactly as before.
  * All appended pieces tie at score 0. sentencepiece (and llama.cpp) break ties by
    position, transformers' fast tokenizer by merge rank, so the two segment most Chinese
    lines differently (88% of the CMRC lines) — a model trained with one and served with
    the other sees unfamiliar splits. --new_piece_scores ranked gives the appended pieces
    distinct scores below all of LLaMA's, in the Chinese model's order: the ids are the
    same as the published merge (so its embeddings and adapters still fit), Chinese text
    takes as few tokens, English words are never re-split, and transformers agrees with
    sentencepiece on ~98% of lines. The default stays the published algorithm.
  * LLaMA's tokenizer is BPE: encoding only ever merges two adjacent pieces into one that
    is in the vocabulary. An appended piece that cannot be split into two pieces that can
    themselves be produced is never output: its embedding row is dead weight. Unigram
    models (like chinese_sp.model) have many such pieces. --drop_unreachable_pieces leaves
    them out; training the Chinese model as BPE instead avoids them by construction.
  * --add_pad_token appends `<pad>` for instruction tuning (49,954 entries), see below.

Output: DIR/tokenizer.model, the Hugging Face tokenizer files, and DIR/merge_manifest.json
(sha256 of inputs and output, the counts above, the options), written atomically.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from .cli import ArgumentParser, command_errors
from .hf_files import write_hf_tokenizer_files
from .files import atomic_output_dir, check_output_against_inputs, sha256_file
from .spm_io import load_sp, read_proto, resolve_model_file

PAD_PIECE = "<pad>"
NEW_PIECE_SCORES = ("zero", "ranked")
Piece = sp_pb2.ModelProto.SentencePiece
# sentencepiece's split_digits treats ASCII and full-width digits as digits
_DIGIT = re.compile(r"[0-9\uff10-\uff19]")
_SPACE = "\u2581"


@dataclass(frozen=True)
class MergeOptions:
    """What to merge and which of the published merge's surprises to avoid (the command's
    options; see the module docstring). The defaults give the published merge."""

    llama_tokenizer_dir: Path  # LLaMA's tokenizer.model, or a directory holding it
    chinese_sp_model_file: Path
    output_dir: Path
    new_piece_scores: str = "zero"  # or "ranked"
    add_pad_token: bool = False
    drop_digit_pieces: bool = False
    drop_ascii_pieces: bool = False
    drop_unreachable_pieces: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.new_piece_scores not in NEW_PIECE_SCORES:
            raise ValueError(f"new_piece_scores {self.new_piece_scores!r}: choose from "
                             f"{', '.join(NEW_PIECE_SCORES)}")

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> MergeOptions:
        return cls(llama_tokenizer_dir=Path(a.llama_tokenizer_dir),
                   chinese_sp_model_file=Path(a.chinese_sp_model_file),
                   output_dir=Path(a.output_dir), new_piece_scores=a.new_piece_scores,
                   add_pad_token=a.add_pad_token, drop_digit_pieces=a.drop_digit_pieces,
                   drop_ascii_pieces=a.drop_ascii_pieces,
                   drop_unreachable_pieces=a.drop_unreachable_pieces, overwrite=a.overwrite)


@dataclass
class MergeReport:
    """What the merge did; saved in merge_manifest.json and printed."""

    base_pieces: int = 0
    chinese_pieces: int = 0
    already_present: int = 0
    appended: int = 0
    with_digits: int = 0
    ascii_only: int = 0
    unreachable: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    new_piece_scores: str = "zero"
    pad_id: int | None = None
    total: int = 0
    english_words: int = 0  # LLaMA's own English word pieces, encoded with both tokenizers
    english_words_changed: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)


def has_digit(piece: str) -> bool:
    return bool(_DIGIT.search(piece))


def is_ascii_only(piece: str) -> bool:
    text = piece.replace(_SPACE, "")
    return bool(text) and text.isascii()


def reachable_pieces(pieces: list[str]) -> set[str]:
    """Pieces that sentencepiece's BPE encoder can output.

    Encoding starts from single characters (each in the vocabulary, or byte fallback) and
    only merges two adjacent symbols into a piece of the vocabulary. So a piece can be
    output only if it is one character, or splits into two parts that can both be output.
    (Necessary, not sufficient: merge order may still prevent it in every context.)
    """
    vocab = set(pieces)
    ok: set[str] = set()
    for piece in sorted(vocab, key=len):
        if len(piece) == 1 or any(piece[:i] in ok and piece[i:] in ok for i in range(1, len(piece))):
            ok.add(piece)
    return ok


def _keep(piece: str, opts: MergeOptions, reachable: set[str], report: MergeReport) -> bool:
    for flag, test, label in ((opts.drop_digit_pieces, has_digit, "digits"),
                              (opts.drop_ascii_pieces, is_ascii_only, "ascii_only"),
                              (opts.drop_unreachable_pieces, lambda p: p not in reachable, "unreachable")):
        if flag and test(piece):
            report.dropped[label] = report.dropped.get(label, 0) + 1
            return False
    return True


def merge_protos(base: sp_pb2.ModelProto, chinese: sp_pb2.ModelProto, opts: MergeOptions
                 ) -> tuple[sp_pb2.ModelProto, MergeReport]:
    """The merged ModelProto and what happened (see the module docstring)."""
    merged = sp_pb2.ModelProto()
    merged.CopyFrom(base)
    report = MergeReport(base_pieces=len(base.pieces), chinese_pieces=len(chinese.pieces))
    present = {p.piece for p in base.pieces}
    candidates = []
    for p in chinese.pieces:
        if p.piece in present:
            report.already_present += 1
        else:
            candidates.append(p.piece)
            present.add(p.piece)
    # reachability is judged in the vocabulary as it would be with every candidate in it
    reachable = reachable_pieces([p.piece for p in base.pieces] + candidates)
    lowest = min((p.score for p in base.pieces if p.type == Piece.NORMAL), default=0.0)
    report.new_piece_scores = opts.new_piece_scores
    for piece in candidates:
        report.with_digits += has_digit(piece)
        report.ascii_only += is_ascii_only(piece)
        report.unreachable += piece not in reachable
        if _keep(piece, opts, reachable, report):
            # "zero": the published merge; "ranked": below every base merge, in order
            score = 0.0 if report.new_piece_scores == "zero" else lowest - 1.0 - report.appended
            # Set piece and score only, as the published script does: proto2 serialises
            # every field set explicitly, so type=NORMAL (the default) would add 2 bytes a
            # piece and the file would no longer be the published one, byte for byte.
            merged.pieces.append(Piece(piece=piece, score=score))
            report.appended += 1
    report.examples = {
        "with_digits": [p for p in candidates if has_digit(p)][:10],
        "ascii_only": [p for p in candidates if is_ascii_only(p) and not has_digit(p)][:10],
        "unreachable": [p for p in candidates if p not in reachable][:10],
    }
    if opts.add_pad_token:
        report.pad_id = add_pad_piece(merged)
    report.total = len(merged.pieces)
    return merged, report


def add_pad_piece(proto: sp_pb2.ModelProto) -> int:
    """Append `<pad>` as a CONTROL piece and make it the model's pad_id; return its id.

    Why a control piece inside the sentencepiece model (rather than a token added on the
    Hugging Face side, as Chinese-Alpaca's scripts did): every consumer — data prep,
    training, the HF export, GGUF — reads the pad id from the one file with `sp.pad_id()`;
    a control piece is never produced from text (the string "<pad>" in a document stays
    text) and decoding drops it; sentencepiece only honours pad_id for a control piece.
    """
    if any(p.piece == PAD_PIECE for p in proto.pieces):
        raise ValueError(f"the tokenizer already has a {PAD_PIECE} piece")
    proto.pieces.append(Piece(piece=PAD_PIECE, score=0.0, type=Piece.CONTROL))
    proto.trainer_spec.pad_id = len(proto.pieces) - 1
    return proto.trainer_spec.pad_id


def check_merged(base_file: Path, merged: sp_pb2.ModelProto, report: MergeReport) -> None:
    """Load the result with sentencepiece, check the base's ids did not move, and count the
    English words (LLaMA's own word pieces) that no longer tokenize as before."""
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(merged.SerializeToString())
    base = load_sp(base_file)
    for i in range(base.vocab_size()):
        if sp.id_to_piece(i) != base.id_to_piece(i):
            raise AssertionError(f"id {i} moved: {base.id_to_piece(i)!r} → {sp.id_to_piece(i)!r}")
    words = [p[1:] for p in (base.id_to_piece(i) for i in range(base.vocab_size()))
             if p.startswith(_SPACE) and p[1:].isascii() and p[1:].isalpha()]
    changed = [w for w, a, b in zip(words, base.encode(words), sp.encode(words)) if a != b]
    report.english_words, report.english_words_changed = len(words), len(changed)
    report.examples["english_words_changed"] = changed[:10]


def format_report(r: MergeReport) -> str:
    lines = [
        f"base pieces {r.base_pieces:,}; Chinese pieces {r.chinese_pieces:,}, of which "
        f"{r.already_present:,} already in the base",
        f"appended {r.appended:,} → {r.total:,} pieces" + (f" (pad id {r.pad_id})" if r.pad_id is not None else ""),
        f"among the candidates: {r.with_digits:,} contain digits (they defeat split_digits: "
        f"'2023' stops being four tokens; --drop_digit_pieces), e.g. {r.examples.get('with_digits', [])[:5]}",
        f"  {r.ascii_only:,} are ASCII-only (they can change how English splits; "
        f"--drop_ascii_pieces), e.g. {r.examples.get('ascii_only', [])[:5]}",
        f"  {r.unreachable:,} can never be produced by BPE (no two producible parts): dead "
        f"rows (--drop_unreachable_pieces, or train the Chinese model as BPE), e.g. "
        f"{r.examples.get('unreachable', [])[:5]}",
    ]
    lines.append(
        f"English words (LLaMA's {r.english_words:,} word pieces) that tokenize differently "
        f"now: {r.english_words_changed:,}, e.g. {r.examples.get('english_words_changed', [])[:5]}"
        + ("" if not r.english_words_changed else
           " — appended pieces (score 0) outrank LLaMA's merges; --drop_ascii_pieces and "
           "--drop_digit_pieces keep English exactly as before"))
    if r.dropped:
        lines.append(f"dropped: {r.dropped}")
    return "\n".join(lines)


def merge(opts: MergeOptions) -> MergeReport:
    """Merge the Chinese model into LLaMA's and write the output directory atomically.

    Returns:
        What the merge did (also saved in merge_manifest.json).

    Raises:
        ValueError: an input is not a sentencepiece model; FileExistsError: the output
        exists (without `overwrite`); OSError: an input cannot be read.
    """
    base_file = resolve_model_file(opts.llama_tokenizer_dir)
    chinese_file = resolve_model_file(opts.chinese_sp_model_file)
    out = Path(opts.output_dir)
    inputs = [opts.llama_tokenizer_dir, base_file, opts.chinese_sp_model_file, chinese_file]
    check_output_against_inputs(out, inputs)  # before the exists check: --overwrite cannot help
    if out.exists() and not opts.overwrite:
        raise FileExistsError(f"{out} already exists (use --overwrite to replace it)")
    base, chinese = read_proto(base_file), read_proto(chinese_file)
    merged, report = merge_protos(base, chinese, opts)
    check_merged(base_file, merged, report)
    with atomic_output_dir(out, opts.overwrite, inputs=inputs) as tmp:
        (tmp / "tokenizer.model").write_bytes(merged.SerializeToString())
        write_hf_tokenizer_files(tmp / "tokenizer.model", tmp)
        manifest = {
            "inputs": {"llama_tokenizer": {"file": base_file.name, "sha256": sha256_file(base_file)},
                       "chinese_sp_model": {"file": chinese_file.name, "sha256": sha256_file(chinese_file)}},
            "output": {"file": "tokenizer.model", "sha256": sha256_file(tmp / "tokenizer.model")},
            "options": {k: getattr(opts, k) for k in (
                "new_piece_scores", "add_pad_token", "drop_digit_pieces", "drop_ascii_pieces",
                "drop_unreachable_pieces")},
            "report": report.__dict__,
        }
        (tmp / "merge_manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m tokenizer.merge", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama_tokenizer_dir", required=True,
                   help="LLaMA's tokenizer.model, or a directory holding it")
    p.add_argument("--chinese_sp_model_file", required=True, help="the Chinese sentencepiece model")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--new_piece_scores", choices=NEW_PIECE_SCORES, default="zero",
                   help="zero: the published merge (all appended pieces score 0); ranked: below "
                        "LLaMA's merges, in order (same ids; English never re-split; transformers "
                        "agrees with sentencepiece)")
    p.add_argument("--add_pad_token", action="store_true",
                   help="append <pad> (a control piece, the model's pad_id) for instruction tuning")
    p.add_argument("--drop_digit_pieces", action="store_true",
                   help="do not append pieces containing digits (keeps split_digits working)")
    p.add_argument("--drop_ascii_pieces", action="store_true",
                   help="do not append ASCII-only pieces (keeps English splits)")
    p.add_argument("--drop_unreachable_pieces", action="store_true",
                   help="do not append pieces BPE can never produce (no dead embedding rows)")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    opts = MergeOptions.from_args(build_parser().parse_args(argv))
    with command_errors(output=opts.output_dir):
        report = merge(opts)
        print(format_report(report))
        print(f"wrote {opts.output_dir}")


if __name__ == "__main__":
    main()
