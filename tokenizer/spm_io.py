"""Loading sentencepiece models with clear errors."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2


def resolve_model_file(path: str | Path) -> Path:
    """A sentencepiece model file: `path` itself, or `path/tokenizer.model` for a directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such sentencepiece model file")
    return path


def load_sp(path: str | Path) -> spm.SentencePieceProcessor:
    """Load a sentencepiece model (a file, or a directory holding `tokenizer.model`)."""
    path = resolve_model_file(path)
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
    return sp


def read_proto(path: str | Path) -> sp_pb2.ModelProto:
    """Parse a sentencepiece model file, with one clear error if it is not one."""
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(resolve_model_file(path).read_bytes())
    except Exception as e:  # protobuf's DecodeError, among others
        raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
    if not proto.pieces:
        raise ValueError(f"{path}: not a sentencepiece model (no pieces)")
    load_sp(path)  # sentencepiece's own validation
    return proto
