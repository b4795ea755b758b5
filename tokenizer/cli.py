"""What every command of zhllama shares on the command line: one `error:` line per failure.

    def main(argv: list[str] | None = None) -> None:
        a = build_parser().parse_args(argv)      # build_parser() returns cli.ArgumentParser
        with command_errors(output=a.output_dir):
            ...                                  # the command's work

or, around a function, `run_command(fn, *args, output=path)`. Every failure then ends in
one line on stderr and a non-zero exit status instead of a traceback:

- ValueError (FormatError, DataError, ConfigError …) and CommandError: `error: <message>`,
  exit 1;
- OSError: `error: <path>: [Errno N] <cause>` (the output path when the OS names none,
  as for a full disk), exit 1;
- a pickle that `torch.load(weights_only=True)` refused: what it tried to load, exit 1;
- KeyboardInterrupt: `interrupted` (or the interrupt's own message), exit 130;
- anything else: `error: unexpected <Type>: <message>` and a hint; with
  ZHLLAMA_TRACEBACK=1 in the environment the exception is raised as is instead.

Argument errors come from `ArgumentParser`, whose `error()` prints one `error:` line too,
and `type=` helpers (`positive_int`, …) that name the rule broken. A command run as
`zhllama <command>` (train/cli.py) shows that name in its usage and help: the dispatcher
calls the command's `main` inside `program_name("zhllama convert")`, so no command needs
to know how it was started. It lives in `tokenizer`, the bottom layer, because every
package has commands.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import errno
import os
import pickle
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

TRACEBACK_ENV = "ZHLLAMA_TRACEBACK"
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for Ctrl-C
# errnos that are about the place written to, not about one file in it: without a file
# name from the OS (a failed write() has none) the output path is the useful one to name.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}
# The name the running command goes by when a dispatcher started it (see program_name);
# a context variable rather than a global, so that it ends with the dispatcher's block.
_PROGRAM_NAME: contextvars.ContextVar[str | None] = contextvars.ContextVar("program_name", default=None)


class CommandError(Exception):
    """A failure whose message says everything (printed as `error: <message>`), for causes
    that are not a bad value, such as a step of a pipeline that failed."""


def one_line(text: str) -> str:
    """Messages from other libraries span lines; an `error:` line must not."""
    return " ".join(text.split())


def refused_pickle(e: BaseException) -> str:
    """What a refused pickle tried to load, from torch's weights-only unpickler message.

    torch words it as "Unsupported global: GLOBAL posix.system was not an allowed global"
    or "Trying to load unsupported GLOBAL posix.system whose module posix is blocked";
    both give `posix.system`. Other refusals (an unsupported opcode, a truncated stream)
    give their most specific line.
    """
    text = str(e)
    m = re.search(r"GLOBAL\s+([\w.<>]+)", text)
    if m:
        return f"it tries to load {m.group(1)}, which a weights file never needs"
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    specific = [l for l in lines if not l.startswith(("Weights only load failed", "Check the documentation",
                                                      "Please file an issue", "In PyTorch"))]
    return one_line((specific or lines or [type(e).__name__])[0])


def describe_os_error(e: OSError, output: str | Path | None = None) -> str:
    """`path: [Errno N] cause`, naming both paths of a failed rename and falling back to
    the command's output for errors such as a full disk where the OS names no file."""
    if e.strerror is None:  # raised by our own code with a full message
        return one_line(str(e))
    cause = f"[Errno {e.errno}] {e.strerror}"
    if e.filename is not None:
        where = str(e.filename) if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        return f"{where}: {cause}"
    if output is not None and e.errno in _OUTPUT_ERRNOS:
        return f"writing {output}: {cause}"
    return cause


def describe_error(e: BaseException, output: str | Path | None = None) -> str:
    """The text of the `error:` line for an exception (without the `error: ` prefix)."""
    if isinstance(e, UnicodeDecodeError):  # a ValueError, but its own words name no file
        return f"cannot decode input as {e.encoding}: byte 0x{e.object[e.start]:02x} at offset {e.start} ({e.reason})"
    if isinstance(e, (ValueError, CommandError)):
        return one_line(str(e)) or type(e).__name__
    if isinstance(e, OSError):
        return describe_os_error(e, output)
    if isinstance(e, pickle.UnpicklingError):
        return f"refused to unpickle: {refused_pickle(e)}"
    return (f"unexpected {type(e).__name__}: {one_line(str(e))} "
            f"(set {TRACEBACK_ENV}=1 to see the traceback)")


def _fail(message: str, status: int = 1) -> NoReturn:
    with contextlib.suppress(Exception):  # stdout may be a closed pipe
        sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(status)


@contextlib.contextmanager
def command_errors(output: str | Path | None = None) -> Iterator[None]:
    """Turn any exception raised inside the block into one `error:` line and an exit status.

    Args:
        output: the path the command writes, named when the OS reports a full or
            read-only filesystem without saying which file.
    """
    try:
        yield
    except SystemExit:
        raise
    except KeyboardInterrupt as e:
        # A caller that knows what was kept says so: raise KeyboardInterrupt("interrupted at …")
        _fail(one_line(str(e)) or "interrupted", INTERRUPTED_EXIT)
    except BrokenPipeError:
        # The reader of stdout went away (`| head`; our commands write no other pipe):
        # nothing left to say, and nobody to say it to. stdout goes to /dev/null so that
        # the interpreter's exit does not fail on it again.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except Exception as e:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        _fail(f"error: {describe_error(e, output)}")


def run_command(fn: Callable[..., T], *args: Any, output: str | Path | None = None, **kwargs: Any) -> T:
    """Call `fn(*args, **kwargs)` inside `command_errors(output)`; returns its result."""
    with command_errors(output):
        return fn(*args, **kwargs)


@contextlib.contextmanager
def interrupts_to_parent_only() -> Iterator[None]:
    """Start worker processes inside this block so that Ctrl-C reaches only this process.

    Ctrl-C sends SIGINT to every process of the terminal's group: workers would each print
    a traceback (also while still importing). SIGINT is blocked in this thread for the
    block's duration, and processes started here inherit the block; the parent still gets
    its KeyboardInterrupt through its other threads, or when the block ends.
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def program_name(name: str) -> Iterator[None]:
    """Inside the block, commands' parsers call themselves `name` (e.g. "zhllama convert").

    Sub-parsers, whose names argparse builds from their parent's, keep theirs.
    """
    token = _PROGRAM_NAME.set(name)
    try:
        yield
    finally:
        _PROGRAM_NAME.reset(token)


def shown_prog(default: str | None) -> str | None:
    """The program name a parser shows: the one `program_name` set, else `default`."""
    name = _PROGRAM_NAME.get()
    if name is None or (default is not None and default.startswith(name)):
        return default
    return name


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage errors as one `error:` line (exit status 2, as argparse's),
    named as `program_name` says when a dispatcher runs the command."""

    def __init__(self, *args: Any, prog: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, prog=shown_prog(prog), **kwargs)

    def error(self, message: str) -> NoReturn:
        _fail(f"error: {one_line(message)} (see {self.prog} --help)", 2)


def _number(kind: Callable[[str], Any], rule: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}") from None
        if not ok(value) or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}")
        return value

    parse.__name__ = rule  # argparse names the type in some of its own messages
    return parse


positive_int = _number(int, "a positive integer", lambda v: v > 0)
non_negative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number(float, "a positive number", lambda v: 0 < v < float("inf"))
non_negative_float = _number(float, "a number >= 0", lambda v: 0 <= v < float("inf"))
probability = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
