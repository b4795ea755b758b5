"""The checkpoint formats users own, behind one table.

Each format is one file here with up to three functions — `detect(path) -> bool`,
`read(path, ReadOptions) -> Checkpoint`, `write(ckpt, dst, WriteOptions) -> Checkpoint`
(the checkpoint as written: cast and padded as asked) — and one row in `FORMATS`. Readers
return a `model.source.Checkpoint` (canonical names, Meta rotary layout); writers take
one. `model.convert` (`--to`), `model.merge_lora` (`--output_type` and the file it writes)
and `model.generate` (what it reads) all go through the table, as torchtitan's
`StateDictAdapter` and torchtune's checkpointers make a format one class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..source import Checkpoint
from ..tensor_io import FormatError
from . import gguf, hf, llama2c, meta, zhllama
from .hf import write_hf
from .meta import write_meta
from .options import ReadOptions, WriteOptions
from .zhllama import write_model_dir

__all__ = ["FORMATS", "Format", "ReadOptions", "WriteOptions", "detect_format", "find_format",
           "read_checkpoint", "write_checkpoint", "write_hf", "write_meta", "write_model_dir",
           "write_names"]


@dataclass(frozen=True)
class Format:
    """One checkpoint format.

    Attributes:
        name: its name in `--to`, `--output_type` and `Checkpoint.format`.
        title: its name in messages.
        expected: what `detect` looks for, for the message about a path none recognises.
        aliases: other names `--output_type` accepts (Chinese-LLaMA-Alpaca's script's).
        detect: whether a path holds this format; it may raise a FormatError for a near
            miss that deserves its own message. None: never read.
        read: opens it lazily. None: write only.
        write: writes a checkpoint in it. None: read only.
        file_name: for a format written as one file, the file's name inside an output
            directory, from `--dtype`; None: the output is the directory itself.
        chat_template: whether `--template` goes into it (a tokenizer chat template).
    """

    name: str
    title: str
    expected: str = ""
    aliases: tuple[str, ...] = ()
    detect: Callable[[Path], bool] | None = None
    read: Callable[[Path, ReadOptions], Checkpoint] | None = None
    write: Callable[[Checkpoint, Path, WriteOptions], Checkpoint] | None = None
    file_name: Callable[[str | None], str] | None = None
    chat_template: bool = False


# In the order `detect_format` tries them, the most telling layout first.
FORMATS = (
    Format("meta", "Meta", "consolidated.*.pth + params.json (Meta)", aliases=("pth",),
           detect=meta.detect, read=meta.read, write=meta.write),
    Format("hf", "Hugging Face",
           f"config.json + {' or '.join(hf.WEIGHT_FILES[:2])} (Hugging Face)",
           aliases=("huggingface",), detect=hf.detect, read=hf.read, write=hf.write,
           chat_template=True),
    Format("zhllama", "zhllama", "params.json + model.safetensors (zhllama)",
           detect=zhllama.detect, read=zhllama.read, write=zhllama.write),
    Format("gguf", "GGUF", write=gguf.write, file_name=gguf.file_name, chat_template=True),
    Format("llama2c", "llama2.c", "a llama2.c .bin file", detect=llama2c.detect,
           read=llama2c.read),
)


def find_format(name: str) -> Format:
    """The format called `name` (or one of its aliases)."""
    for fmt in FORMATS:
        if name == fmt.name or name in fmt.aliases:
            return fmt
    raise ValueError(f"unknown format {name!r}; choose from {', '.join(f.name for f in FORMATS)}")


def write_names(*, aliases: bool = False) -> tuple[str, ...]:
    """The formats a checkpoint can be written in (the choices of `--to`, `--output_type`)."""
    return tuple(n for f in FORMATS if f.write for n in (f.name, *(f.aliases if aliases else ())))


def detect_format(path: str | Path) -> str:
    """The name of the format a path holds, from what it holds."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory")
    for fmt in FORMATS:
        if fmt.detect is not None and fmt.detect(path):
            return fmt.name
    expected = [f.expected for f in FORMATS if f.detect is not None]
    raise FormatError(f"{path}: unknown format: expected {', '.join(expected[:-1])}, "
                      f"or {expected[-1]}")


def read_checkpoint(
    path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    verify_checksum: bool = True,
    progress: bool = True,
) -> Checkpoint:
    """Open any supported checkpoint lazily; `tokenizer` overrides the one found beside it."""
    fmt = find_format(detect_format(path))
    ckpt = fmt.read(Path(path), ReadOptions(verify_checksum=verify_checksum, progress=progress))
    if tokenizer is not None:
        tok = Path(tokenizer)
        tok = tok / "tokenizer.model" if tok.is_dir() else tok
        if not tok.is_file():
            raise FormatError(f"{tok}: no such tokenizer file")
        ckpt = ckpt.replace(tokenizer=tok)
    return ckpt


def write_checkpoint(ckpt: Checkpoint, dst: str | Path, to: str, opts: WriteOptions) -> Checkpoint:
    """Write `ckpt` at `dst` in the format `to`; returns the checkpoint as written."""
    fmt = find_format(to)
    if fmt.write is None:
        raise ValueError(f"{fmt.title} is read only; write one of {', '.join(write_names())}")
    return fmt.write(ckpt, Path(dst), opts)
