"""Pictures of training runs: loss curves from metrics.jsonl.

    python -m train.plot RUN_DIR [RUN_DIR ..] [--output FILE.png] [--labels a,b] [--metric loss|bpc]

The loss panel shows the training loss and each validation set's loss (nats per token),
with the learning rate on a second axis; when the runs logged bits per character
(`val_bpc`, `val/NAME/bpc`), a second panel shows them per validation set. Loss per token
does not compare across tokenizers (a token of a larger vocabulary holds more text); bits
per character do, so `--metric bpc` draws that panel alone, for runs with different
tokenizers. Several runs share one picture, told apart by their labels (the run
directories' names unless --labels says otherwise).

During training the loop redraws output_dir/loss.png at each evaluation (`log.plot`,
through `LossPicture`). matplotlib is an optional extra (`pip install 'zhllama[plot]'`);
without it the loop warns once and goes on, and this command fails with one error line.
Pictures are drawn with matplotlib's Agg canvas directly, never through pyplot, so
nothing global (the backend, the current figure) changes for the program that draws.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from tokenizer.cli import ArgumentParser, CommandError, command_errors, positive_float, positive_int
from tokenizer.files import atomic_output_file, check_output_against_inputs
from tokenizer.schema import Field, check_fields

METRICS_FILE = "metrics.jsonl"
PICTURE_FILE = "loss.png"
EXTRA_HINT = "pip install 'zhllama[plot]'"
MISSING_WARNING = f"warning: matplotlib is not installed: no {PICTURE_FILE} ({EXTRA_HINT})"
Metric = Literal["loss", "bpc"]
METRICS: tuple[Metric, ...] = ("loss", "bpc")
_ROW = {"step": Field("integer", min=0)}
# how each validation set's points are marked, in the order the sets first appear
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


class MatplotlibMissing(CommandError):
    """matplotlib, the `plot` extra, is not installed."""


# ---------------------------------------------------------------------------------------
# reading metrics.jsonl


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, each a JSON object with an integer "step".

    A last line without its newline is one a running (or killed) writer has not finished:
    it is left out. Any other line that is not such an object is an error.

    Raises:
        ValueError: `FILE:LINE: what is wrong`.
    """
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # unfinished, or "" after the last newline otherwise
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e.msg} at column {e.colno})") from None
        rows.append(check_fields(row, _ROW, f"{path}:{n}"))
    return rows


def metric_group(key: str) -> tuple[str | None, str]:
    """(validation set, figure) that a metrics.jsonl key names: (None, "loss") for the
    training loss, ("", "loss") for `val_loss` (the held-out split), ("zh", "bpc") for
    `val/zh/bpc`. The inverse of train.trainer.metric_key, for the training figures too."""
    if key.startswith("val_"):
        return "", key[len("val_"):]
    if key.startswith("val/") and "/" in key[len("val/"):]:
        name, _, figure = key[len("val/"):].rpartition("/")
        return name, figure
    return None, key


def is_number(value: Any) -> bool:
    """A number a picture or TensorBoard can show (JSON's true/false are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# (validation set or None for training, figure) → (steps, values)
Series = dict[tuple[str | None, str], tuple[list[int], list[float]]]


@dataclass(frozen=True)
class Curves:
    """One run's figures as lines: `series[(val_set, figure)] = (steps, values)`."""

    label: str
    series: Series = field(default_factory=dict)

    def get(self, val_set: str | None, figure: str) -> tuple[list[int], list[float]]:
        return self.series.get((val_set, figure), ([], []))

    def val_sets(self) -> list[str]:
        """The validation sets, in the order they first appear."""
        return list(dict.fromkeys(s for s, _ in self.series if s is not None))


def curves(rows: Sequence[dict[str, Any]], label: str) -> Curves:
    """Every finite numeric figure of `rows` as a line over the steps."""
    series: Series = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and is_number(value) and math.isfinite(value):
                steps, values = series.setdefault(metric_group(key), ([], []))
                steps.append(row["step"])
                values.append(float(value))
    return Curves(label, series)


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's name: its directory's, with as many parents as it takes to tell apart
    runs whose directories share a name (a/stage2, b/stage2)."""
    paths = [Path(p).resolve() for p in run_dirs]
    depth = 1
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        unique = len(set(labels)) == len(set(paths))
        if unique or all(depth >= len(p.parts) for p in paths):
            return labels
        depth += 1


# ---------------------------------------------------------------------------------------
# drawing


@dataclass(frozen=True)
class PictureOptions:
    """What the picture shows and its size: `size` inches at `dpi` dots per inch."""

    metric: Metric = "loss"  # loss: loss and lr (+ bits/char when logged); bpc: bits/char only
    size: tuple[float, float] = (10.0, 6.0)
    dpi: int = 100


def _matplotlib() -> tuple[type, type]:
    """matplotlib's Figure and Agg canvas, or MatplotlibMissing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing(f"matplotlib is not installed: {EXTRA_HINT}") from None
    return Figure, FigureCanvasAgg


def _panels(runs: Sequence[Curves], metric: Metric) -> list[Metric]:
    has = {m: any(c.get(s, m)[0] for c in runs for s in [None, *c.val_sets()]) for m in METRICS}
    if metric == "bpc":
        if not has["bpc"]:
            raise ValueError("no bits per character in these runs (val_bpc or val/NAME/bpc, "
                             "logged when the loop knows the tokenizer's text lengths)")
        return ["bpc"]
    if not has["loss"]:
        raise ValueError(f"no loss in these runs yet: {', '.join(c.label for c in runs)}")
    return ["loss", "bpc"] if has["bpc"] else ["loss"]


def _set_name(val_set: str | None) -> str:
    return "train" if val_set is None else f"val {val_set}" if val_set else "val"


def _line(ax: Any, runs: Sequence[Curves], i: int, val_set: str | None, figure: str,
          sets: list[str | None], **style: Any) -> None:
    """One run's line of one figure: a colour per run when there are several, else one
    per validation set; the line's style (train solid, val dashed with markers) says which."""
    steps, values = runs[i].get(val_set, figure)
    if not steps:
        return
    many = len(runs) > 1
    name = _set_name(val_set) if figure != "lr" else "lr"
    colour = f"C{i}" if many else ("0.45" if figure == "lr" else f"C{sets.index(val_set)}")
    if val_set is not None:
        style = {"linestyle": "--", "marker": _MARKERS[(sets.index(val_set) - 1) % len(_MARKERS)],
                 "markersize": 4, **style}
    ax.plot(steps, values, color=colour, label=f"{runs[i].label}: {name}" if many else name, **style)


def _loss_scale(ax: Any) -> None:
    """A log scale once the loss spans a factor of 10 (the first steps dwarf the rest)."""
    values = [v for line in ax.get_lines() for v in line.get_ydata()]
    if values and min(values) > 0 and max(values) >= 10 * min(values):
        ax.set_yscale("log")


def _loss_panel(ax: Any, runs: Sequence[Curves], sets: list[str | None]) -> None:
    lr_ax = ax.twinx()
    for i in range(len(runs)):
        for val_set in sets:
            _line(ax, runs, i, val_set, "loss", sets)
        _line(lr_ax, runs, i, None, "lr", sets, linestyle=":", linewidth=1)
    _loss_scale(ax)
    ax.set_ylabel("loss (nats per token)")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    handles = [h for a in (ax, lr_ax) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize="small")


def _bpc_panel(ax: Any, runs: Sequence[Curves], sets: list[str | None]) -> None:
    for i in range(len(runs)):
        for val_set in sets[1:]:  # bits per character are measured on validation sets only
            _line(ax, runs, i, val_set, "bpc", sets)
    ax.set_ylabel("val bits per character")
    ax.legend(fontsize="small")


def build_figure(runs: Sequence[Curves], options: PictureOptions = PictureOptions()) -> Any:
    """A matplotlib Figure (with an Agg canvas) of the runs' curves.

    Raises:
        MatplotlibMissing: matplotlib is not installed.
        ValueError: the runs hold nothing to draw for `options.metric`.
    """
    figure_class, canvas_class = _matplotlib()
    panels = _panels(runs, options.metric)
    # training first, then every validation set of any run, in the order they appear
    sets: list[str | None] = [None, *dict.fromkeys(s for c in runs for s in c.val_sets())]
    fig = figure_class(figsize=options.size, dpi=options.dpi, layout="constrained")
    canvas_class(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        (_loss_panel if panel == "loss" else _bpc_panel)(ax, runs, sets)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)  # steps are whole
    if len(runs) == 1:
        axes[0].set_title(runs[0].label)
    return fig


def write_png(fig: Any, output: Path, inputs: Sequence[Path] = ()) -> Path:
    """Save `fig` as a PNG at `output` (temporary file + rename: never half written),
    refusing an output that is one of `inputs`."""
    with atomic_output_file(output, overwrite=True, inputs=inputs) as tmp:
        fig.savefig(tmp, format="png")
    return output


class LossPicture:
    """run_dir/loss.png, redrawn from run_dir/metrics.jsonl by the training loop.

        picture = LossPicture(out, enabled=dist.is_main and cfg.log.plot)
        ...
        picture.redraw()   # after each evaluation

    Without matplotlib it says so once (on stderr, when made) and draws nothing.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, warnings: IO[str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        if enabled:
            try:
                _matplotlib()
            except MatplotlibMissing:
                self.enabled = False
                print(MISSING_WARNING, file=warnings or sys.stderr, flush=True)

    def redraw(self) -> Path | None:
        """Draw the picture again; its path, or None when there is none to draw."""
        if not self.enabled:
            return None
        metrics = self.run_dir / METRICS_FILE
        run = curves(read_metrics(metrics), self.run_dir.name)
        if not run.get(None, "loss")[0] and not run.val_sets():
            return None  # nothing logged yet
        return write_png(build_figure([run]), self.run_dir / PICTURE_FILE, inputs=[metrics])


# ---------------------------------------------------------------------------------------
# the command


@dataclass(frozen=True)
class PlotOptions:
    """`python -m train.plot`'s request: the runs, their labels, the picture and its file."""

    run_dirs: tuple[Path, ...]
    output: Path | None = None  # None: RUN_DIR/loss.png, for a single run
    labels: tuple[str, ...] = ()  # () : the directories' names
    picture: PictureOptions = PictureOptions()


def metrics_file(run_dir: Path) -> Path:
    """A run directory's metrics.jsonl, or a ValueError saying what is wrong with it."""
    path = Path(run_dir) / METRICS_FILE
    if not Path(run_dir).is_dir():
        raise ValueError(f"{run_dir}: no such directory (expected a run's output_dir)")
    if not path.is_file():
        raise ValueError(f"{run_dir}: no {METRICS_FILE} (not a training run's output_dir, "
                         "or one that has not logged yet)")
    return path


def output_of(opts: PlotOptions, inputs: Sequence[Path]) -> Path:
    """Where the picture goes: --output, or the single run's loss.png; never an input."""
    if opts.output is None and len(opts.run_dirs) > 1:
        raise ValueError(f"{len(opts.run_dirs)} runs in one picture: name it with --output FILE.png")
    output = opts.output if opts.output is not None else opts.run_dirs[0] / PICTURE_FILE
    check_output_against_inputs(output, inputs)  # before the work, not after
    if output.suffix.lower() != ".png":
        raise ValueError(f"--output {output}: the picture is a PNG (name it FILE.png)")
    return output


def plot(opts: PlotOptions) -> Path:
    """Draw the runs' curves into one PNG; returns its path."""
    if opts.labels and len(opts.labels) != len(opts.run_dirs):
        raise ValueError(f"--labels: {len(opts.labels)} labels for {len(opts.run_dirs)} runs")
    if "" in opts.labels:
        raise ValueError("--labels: an empty label (expected one name per run, comma-separated)")
    files = [metrics_file(d) for d in opts.run_dirs]
    output = output_of(opts, files)
    _matplotlib()  # before reading every file
    labels = opts.labels or tuple(run_labels(opts.run_dirs))
    runs = [curves(read_metrics(f), label) for f, label in zip(files, labels)]
    return write_png(build_figure(runs, opts.picture), output, inputs=files)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m train.plot", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help=f"a training run's output_dir (holding {METRICS_FILE})")
    p.add_argument("--output", type=Path, metavar="FILE.png",
                   help=f"the picture (default: RUN_DIR/{PICTURE_FILE}; required for several runs)")
    p.add_argument("--labels", metavar="A,B,..",
                   help="the runs' names in the legend, comma-separated (default: their directories')")
    p.add_argument("--metric", choices=METRICS, default="loss",
                   help="loss: loss and learning rate, with bits per character when logged; "
                        "bpc: bits per character only (to compare runs with different tokenizers)")
    p.add_argument("--size", type=positive_float, nargs=2, default=(10.0, 6.0), metavar=("W", "H"),
                   help="in inches (default: 10 6)")
    p.add_argument("--dpi", type=positive_int, default=100, help="dots per inch (default: 100)")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    labels = tuple(l.strip() for l in a.labels.split(",")) if a.labels else ()
    opts = PlotOptions(tuple(a.run_dirs), a.output, labels,
                       PictureOptions(a.metric, tuple(a.size), a.dpi))
    with command_errors(output=a.output):
        print(f"wrote {plot(opts)}")


if __name__ == "__main__":
    main()
