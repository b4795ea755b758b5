"""What a run does about non-finite losses: skip the step, count it, and after too many
in a row stop, naming the last checkpoint that a finite loss followed.

A checkpoint counts as good once a finite step has followed it: the weights it holds gave
a usable loss (the one resumed from is taken as good). On a stop, newer checkpoints are
renamed `step-N.nonfinite` so that starting again does not resume from weights that
already gave NaN, and the message says how to go on: the same command with a lower rate.
"""

from __future__ import annotations

from pathlib import Path

from tokenizer.cli import CommandError

from . import steps
from .distributed import DistInfo


class NonFiniteLoss(CommandError):
    """Training stopped after too many non-finite losses in a row."""


class NonFiniteGuard:
    """Counts non-finite steps and tracks which checkpoint is known to be good."""

    def __init__(self, max_in_a_row: int, resumed_from: Path | None) -> None:
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.good, self.pending = resumed_from, None

    def step(self, loss_ok: bool, norm_ok: bool, overflow_expected: bool) -> None:
        """Record a step. An fp16 overflow (finite loss, infinite gradient under loss
        scaling) is the scaler's normal business, not a failure."""
        self.in_a_row = 0 if loss_ok and (norm_ok or overflow_expected) else self.in_a_row + 1
        if loss_ok and self.pending is not None:
            self.good, self.pending = self.pending, None

    @property
    def should_stop(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    @property
    def may_save(self) -> bool:
        """Never save weights whose last loss was not finite."""
        return self.in_a_row == 0

    def saved(self, path: Path) -> None:
        self.pending = path

    def stop(self, out: Path, step: int, dist: DistInfo) -> NonFiniteLoss:
        """Set the checkpoints newer than the good one aside; the error to raise."""
        good = self.good
        suspect = [p for n, p in steps.step_dirs(out) if good is None or n > steps.step_of(good)]
        steps.set_aside(suspect, dist)
        where = (f"the last checkpoint followed by a finite loss is {good}" if good is not None
                 else "no checkpoint was followed by a finite loss")
        moved = f" (newer ones renamed *.nonfinite: {', '.join(p.name for p in suspect)})" if suspect else ""
        return NonFiniteLoss(
            f"{self.in_a_row} non-finite losses in a row at step {step}; stopping: {where}{moved}. "
            f"Lower the learning rate and run the same command again with --optim.lr=<lower "
            f"rate>: it resumes from {good.name if good else 'the start'} at the new rate "
            "(or use bf16).")
