"""A training run's frame: its config from the command line, the read-only checks made
before anything is written, the process group and the output directory's lock, and one
`error:` line for whatever goes wrong.

    with TrainingRun(argv, "train/pretrain.py", __doc__, stages) as session:
        built = session.agree(lambda: build_for_stage(session.cfg, session.dist))
        ...

Under torchrun a failure the ranks share (a bad config, data or checkpoint, a non-finite
stop, Ctrl-C) is said once, by rank 0; one a rank meets alone is said by that rank, tagged
with it. The exit status is 1, or 130 when interrupted.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from argparse import RawDescriptionHelpFormatter
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import torch

from model.formats import read_checkpoint
from tokenizer.cli import TRACEBACK_ENV, ArgumentParser, CommandError, describe_error

from .config import ConfigError, TrainConfig, load_config
from .distributed import DistInfo, setup, teardown
from .lock import RunLock
from .metrics import summary_writer_class
from .optim import adamw8bit_class
from .parallelize import check_offload
from .data_checks import check_inputs_agree
from .resume import (
    ResumePlan, base_fingerprint, check_data_outside_output, check_model_outside_output, plan_resume,
)
from .stages import check_packed_attention, check_quantize

T = TypeVar("T")


class Interrupted(CommandError):
    """The run was stopped by Ctrl-C or SIGTERM; the message says what was kept."""


class _Agreed(CommandError):
    """A failure of one or more ranks, agreed on by all (the message of the lowest rank)."""


class TrainingRun:
    """Parses the command line and frames the run (see the module docstring).

    Attributes (inside the `with` block): cfg, dist, plan (the step to resume from and
    what changed), fingerprint (of the base, saved with every checkpoint).
    """

    def __init__(self, argv: list[str] | None, prog: str, doc: str, stages: tuple[str, ...]) -> None:
        p = ArgumentParser(prog=prog, description=doc, formatter_class=RawDescriptionHelpFormatter)
        p.add_argument("config", help="YAML config (see configs/)")
        self.args, self.overrides = p.parse_known_args(argv)
        self.prog, self.stages = prog, stages
        self.dist: DistInfo | None = None
        self.shared = True  # until the ranks agree that set-up went well
        self.stopped: list[int] = []

    def __enter__(self) -> TrainingRun:
        # Ctrl-C reaches every rank at once (and torchrun forwards SIGINT or SIGTERM); after
        # it, whatever a rank hits — often a peer's closed connection — is part of the stop.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._interrupt)
        try:
            self._start()
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def _start(self) -> None:
        """Read-only checks first, alike on every rank: nothing is written if they fail."""
        cfg = load_config(self.args.config, self.overrides)
        if cfg.stage not in self.stages:
            raise ConfigError(f"stage: {self.prog} runs {', '.join(self.stages)}, not {cfg.stage!r}")
        check_model_outside_output(cfg)
        check_data_outside_output(cfg)
        check_inputs_agree(cfg.data)  # a mixture's sources, the validation sets
        if cfg.log.tensorboard:
            summary_writer_class()  # the optional package is there, or one error now
        if cfg.optim.name == "adamw8bit":
            adamw8bit_class()  # likewise torchao
        check_offload(cfg.parallel.activation_checkpointing, cfg.parallel.activation_offload)
        check_quantize(cfg)  # model.quantize: the stage and the optional package
        self.fingerprint = base_fingerprint(read_checkpoint(cfg.model.path, progress=False))
        self.plan: ResumePlan = plan_resume(cfg, self.fingerprint)  # refuses before any write
        self.cfg: TrainConfig = cfg
        self.dist = setup(cfg.parallel.backend, cfg.parallel.replicate)
        check_packed_attention(cfg, self.dist.device)
        RunLock(Path(cfg.output_dir), self.dist).acquire()

    def _interrupt(self, signum: int, frame: Any) -> None:
        self.stopped.append(signum)
        raise KeyboardInterrupt

    def agree(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if any rank fails, every rank raises the first failure's
        message, so that rank 0 can say it and no rank is left waiting in a collective."""
        result, message = None, None
        try:
            result = fn()
        except Exception as e:
            if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
                raise
            message = describe_error(e)
        messages: list[str | None] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(messages, message)  # our own strings: nothing foreign
        failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
        if failed:
            rank, first = failed[0]
            raise _Agreed(first if rank == 0 or len(failed) == self.dist.world_size
                          else f"rank {rank}: {first}")
        return result

    def ranks_on_their_own(self) -> None:
        """From here a rank may fail alone (a full disk, a lost GPU): each says its own."""
        self.shared = False

    def done(self, path: Path) -> None:
        if self.dist.is_main:
            print(f"done: {path}")

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if e is None:
            teardown()
            return False
        if isinstance(e, SystemExit):
            return False
        if isinstance(e, (Interrupted, KeyboardInterrupt)):
            self._fail(str(e) if isinstance(e, Interrupted) else "interrupted", 130, shared=True)
        if not isinstance(e, Exception):
            return False
        if self.stopped:
            self._fail("interrupted", 130, shared=True)
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            return False
        # the same words as every other command (tokenizer/cli.py)
        self._fail(describe_error(e, self.args.config), 1, shared=self.shared or isinstance(e, CommandError))
        return False

    def _fail(self, message: str, code: int, shared: bool) -> None:
        """One `error:` line, then exit without waiting for other ranks.

        A shared failure is said by rank 0 only; the other ranks wait a moment first, so
        that the launcher does not stop rank 0 (for their exit) before it has said it.
        """
        rank = self.dist.rank if self.dist is not None else int(os.environ.get("RANK", "0"))
        if rank == 0 or not shared:
            tag = f"rank {rank}: " if rank else ""
            print(f"error: {tag}{message}", file=sys.stderr, flush=True)
        elif code != 130:
            for sig in (signal.SIGINT, signal.SIGTERM):  # the launcher may stop us now: quietly
                signal.signal(sig, signal.SIG_DFL)
            time.sleep(2)
        sys.stdout.flush()
        os._exit(code)  # a collective teardown could wait forever for a rank that already left
