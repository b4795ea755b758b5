"""Pictures and TensorBoard scalars of a real tiny training run: loss.png and `zhllama plot`
read back by matplotlib, the scalars read back by TensorBoard's own event reader."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ENV, FAST, REPO, losses, metrics, one_error, run, train_cmd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# the words the loop's missing-matplotlib warning must have, once per process
WARNING = "warning: matplotlib is not installed: no loss.png (pip install 'zhllama[plot]')"
# metrics.jsonl keys and the TensorBoard tags they must get
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
        "tokens_per_s": "train/tokens_per_s", "memory_gb": "train/memory_gb",
        "skipped_steps": "train/skipped_steps", "val_loss": "val/loss", "val_ppl": "val/ppl",
        "val_acc": "val/acc", "val_bpc": "val/bpc", "val_bpb": "val/bpb",
        "val/zh/loss": "val/zh/loss", "val/zh/bpc": "val/zh/bpc"}


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> Path:
    """Six steps of stage 2 with an evaluation every two: metrics.jsonl as the loop writes it."""
    out = tmp_path_factory.mktemp("plot") / "run"
    run(train_cmd("pretrain", "stage2.yaml", world, out, *FAST, "--optim.max_steps=6",
                  "--data.val_fraction=0.1", "--log.eval_every=2", "--log.eval_batches=2",
                  "--checkpoint.every=0", "--log.tensorboard=true"))
    return out


def test_a_run_writes_its_picture_and_tensorboard_scalars(trained):
    """The loop's own wiring: loss.png beside metrics.jsonl, and with log.tensorboard the
    same figures as TensorBoard reads them back."""
    assert (trained / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert scalars(trained / "tensorboard") == expected_scalars(metrics(trained))


def copy_run(trained: Path, dst: Path) -> Path:
    """The run's metrics.jsonl alone in a directory of the test's (the fixture stays as it is)."""
    dst.mkdir(parents=True)
    shutil.copy(trained / "metrics.jsonl", dst / "metrics.jsonl")
    return dst


def plot_cmd(*args: object, prelude: str = "") -> subprocess.CompletedProcess:
    """`python -m train.plot ARGS`, after `prelude` (e.g. one that hides matplotlib)."""
    code = f"{prelude}\nimport sys\nfrom train.plot import main\nmain(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=ENV, timeout=120)


def read_png(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(path)


def lines_by_label(fig, ylabel: str) -> dict[str, tuple[list, list]]:
    """The lines of the axes whose y axis is called `ylabel`, by their legend labels."""
    axes = [ax for ax in fig.axes if ax.get_ylabel() == ylabel]
    assert len(axes) == 1, [ax.get_ylabel() for ax in fig.axes]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in axes[0].get_lines()}


LOSS, LR, BPC = "loss (nats per token)", "learning rate", "val bits per character"


def test_loss_png_of_a_run(trained, tmp_path):
    from train.plot import LossPicture, PictureOptions

    run_dir = copy_run(trained, tmp_path / "run")
    picture = LossPicture(run_dir)
    assert picture.redraw() == run_dir / "loss.png"
    assert picture.redraw() == run_dir / "loss.png"  # redrawn over the last one
    width, height = PictureOptions().size
    assert read_png(run_dir / "loss.png").shape[:2] == (height * PictureOptions().dpi,
                                                        width * PictureOptions().dpi)
    assert sorted(p.name for p in run_dir.iterdir()) == ["loss.png", "metrics.jsonl"]  # no temporaries
    assert LossPicture(run_dir, enabled=False).redraw() is None  # another rank's


def test_the_lines_are_the_logged_figures(trained):
    from train.plot import build_figure, curves, read_metrics

    rows = metrics(trained)
    fig = build_figure([curves(read_metrics(trained / "metrics.jsonl"), "run")])
    train_steps = [r["step"] for r in rows if "loss" in r]
    val_steps = [r["step"] for r in rows if "val_loss" in r]
    assert len(train_steps) == 6 and val_steps == [2, 4, 6]
    assert lines_by_label(fig, LOSS) == {"train": (train_steps, losses(trained)),
                                         "val": (val_steps, losses(trained, "val_loss"))}
    assert lines_by_label(fig, LR) == {"lr": (train_steps, losses(trained, "lr"))}
    # bits per character: the loop logs them when it knows the tokenizer's text lengths
    assert lines_by_label(fig, BPC) == {"val": (val_steps, losses(trained, "val_bpc"))}


def with_bpc(trained: Path, dst: Path, chars_per_token: float) -> Path:
    """The run with a second validation set, zh, as the loop logs a named one (val/zh/...),
    its bits per character as if from a tokenizer of `chars_per_token`."""
    import json

    dst.mkdir(parents=True)
    rows = []
    for r in metrics(trained):
        if "val_loss" in r:
            r = {**r, "val/zh/loss": r["val_loss"],
                 "val/zh/bpc": r["val_loss"] / math.log(2) / chars_per_token}
        rows.append(r)
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def test_several_runs_in_one_picture(trained, tmp_path):
    from train.plot import PictureOptions, build_figure, curves, read_metrics, run_labels

    a = with_bpc(trained, tmp_path / "a" / "run", 1.5)
    b = with_bpc(trained, tmp_path / "b" / "run", 2.0)
    r = plot_cmd(a, b, "--output", tmp_path / "both.png", "--size", "4", "3", "--dpi", "50")
    assert r.returncode == 0, r.stderr
    assert read_png(tmp_path / "both.png").shape[:2] == (150, 200)
    assert run_labels([a, b]) == ["a/run", "b/run"]  # the same name: their parents tell them apart
    r = plot_cmd(a, b, "--output", tmp_path / "bpc.png", "--labels", "big vocab,small vocab",
                 "--metric", "bpc")
    assert r.returncode == 0, r.stderr
    assert read_png(tmp_path / "bpc.png").shape[:2] == (600, 1000)  # the default 10 × 6 inches
    runs = [curves(read_metrics(d / "metrics.jsonl"), label) for d, label in ((a, "A"), (b, "B"))]
    fig = build_figure(runs)
    assert set(lines_by_label(fig, LOSS)) == {"A: train", "A: val", "A: val zh",
                                              "B: train", "B: val", "B: val zh"}
    assert set(lines_by_label(fig, LR)) == {"A: lr", "B: lr"}
    bpc = lines_by_label(fig, BPC)
    assert set(bpc) == {"A: val", "A: val zh", "B: val", "B: val zh"}
    assert bpc["A: val zh"][1] == losses(a, "val/zh/bpc") and bpc["B: val zh"][1] == losses(b, "val/zh/bpc")
    fig = build_figure(runs, PictureOptions(metric="bpc"))
    assert [ax.get_ylabel() for ax in fig.axes] == [BPC]  # bits per character alone


@pytest.mark.parametrize("case", ["bad line", "missing dir", "no metrics", "output over input",
                                  "labels", "several without output", "not png"])
def test_plot_errors_are_one_line(trained, tmp_path, case):
    run_dir = copy_run(trained, tmp_path / "run")
    args: list[object] = [run_dir]
    if case == "bad line":
        lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
        lines.insert(2, '{"step": 3, "loss": \n')
        (run_dir / "metrics.jsonl").write_text("".join(lines))
        expected = f"{run_dir / 'metrics.jsonl'}:3: "
    elif case == "missing dir":
        args, expected = [tmp_path / "nowhere"], f"{tmp_path / 'nowhere'}: no such directory"
    elif case == "no metrics":
        (tmp_path / "empty").mkdir()
        args, expected = [tmp_path / "empty"], "no metrics.jsonl"
    elif case == "output over input":
        args, expected = [run_dir, "--output", run_dir / "metrics.jsonl"], "refusing to replace it"
    elif case == "labels":
        args, expected = [run_dir, run_dir, "--output", tmp_path / "x.png", "--labels", "a"], "--labels"
    elif case == "several without output":
        args, expected = [run_dir, run_dir], "--output"
    else:
        args, expected = [run_dir, "--output", tmp_path / "x.jpg"], "PNG"
    before = (run_dir / "metrics.jsonl").read_bytes()
    line = one_error(plot_cmd(*args))
    assert expected in line, line
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["metrics.jsonl"]  # nothing written


HIDE_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None  # import matplotlib fails"


def test_without_matplotlib_the_loop_warns_once(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path / "run")
    code = (f"{HIDE_MATPLOTLIB}\nfrom pathlib import Path\nfrom train.plot import LossPicture\n"
            f"picture = LossPicture(Path(sys.argv[1]))\n"
            "print([picture.redraw() for _ in range(3)])")
    r = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True,
                       cwd=REPO, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [WARNING]
    assert r.stdout.strip() == "[None, None, None]"
    assert not (run_dir / "loss.png").exists()
    # the command cannot do without it: one error line naming the extra
    line = one_error(plot_cmd(run_dir, prelude=HIDE_MATPLOTLIB))
    assert "matplotlib" in line and "zhllama[plot]" in line, line


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under `log_dir` as TensorBoard itself reads it back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep them all
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def as_float32(x: float) -> float:
    return float(np.float32(x))  # what a TensorBoard scalar holds


def expected_scalars(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for key, value in r.items():
            if key != "step":
                assert key in TAGS, f"{key}: a metrics.jsonl key this test does not know; add its tag"
                out.setdefault(TAGS[key], []).append((r["step"], as_float32(value)))
    return out


def test_tensorboard_scalars_are_metrics_jsonl(trained, tmp_path):
    from train.metrics import MetricsLog

    rows = metrics(with_bpc(trained, tmp_path / "source", 1.5))
    with MetricsLog(tmp_path / "run" / "metrics.jsonl", True, 0, tensorboard=True) as log:
        for r in rows:
            log.write(r)
    assert log.writer is None  # closed by the with block
    assert metrics(tmp_path / "run") == rows
    found = scalars(tmp_path / "run" / "tensorboard")
    assert {"train/loss", "train/lr", "val/loss", "val/zh/loss", "val/zh/bpc"} <= found.keys()
    assert found == expected_scalars(rows)


def test_tensorboard_forgets_the_steps_a_resume_drops(trained, tmp_path):
    from train.metrics import MetricsLog

    rows = metrics(trained)
    run_dir = tmp_path / "run"
    with MetricsLog(run_dir / "metrics.jsonl", True, 0, tensorboard=True) as log:
        for r in rows:
            log.write(r)
    # resumed from step 3: steps 4..6 are trained again, to other figures
    again = [{**r, "loss": r["loss"] + 1} if "loss" in r else r for r in rows if r["step"] > 3]
    with MetricsLog(run_dir / "metrics.jsonl", True, 3, tensorboard=True) as log:
        assert metrics(run_dir) == [r for r in rows if r["step"] <= 3]
        for r in again:
            log.write(r)
    expected = [r for r in rows if r["step"] <= 3] + again
    assert metrics(run_dir) == expected
    found = scalars(run_dir / "tensorboard")
    assert found == expected_scalars(expected)
    assert [s for s, _ in found["train/loss"]] == [1, 2, 3, 4, 5, 6]


def test_missing_tensorboard_is_a_config_error(tmp_path, monkeypatch):
    from train.config import ConfigError
    from train.metrics import MetricsLog

    for module in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails, as if not installed
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    for enabled in (True, False):  # every rank, so that all stop alike
        with pytest.raises(ConfigError, match=r"log\.tensorboard.*zhllama\[tensorboard\]"):
            MetricsLog(tmp_path / "metrics.jsonl", enabled, 1, tensorboard=True)
    assert len(metrics(tmp_path)) == 2  # refused before anything was changed
    assert not (tmp_path / "tensorboard").exists()
    MetricsLog(tmp_path / "metrics.jsonl", True, 2).write({"step": 3, "loss": 1.0})  # off: no need
    assert losses(tmp_path) == [2.0, 1.5, 1.0]
