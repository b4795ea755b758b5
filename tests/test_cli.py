"""The `zhllama` command: every subcommand behind one console script, which a user's own
data/, model/, tokenizer/ or train/ folder cannot shadow, and training launched from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, losses, train_cmd
from train.cli import COMMANDS, main, split_launch_options

ZHLLAMA = Path(sys.executable).parent / "zhllama"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# What the training runs here need to be short (blocks of 32, nothing held out or saved).
ONE_STEP = ["--optim.max_steps=1", "--optim.warmup_steps=0", "--data.block_size=32",
            "--data.val_fraction=0", "--checkpoint.every=0", "--log.eval_every=0",
            "--optim.micro_batch_size=2", "--optim.grad_accum=1"]


@pytest.fixture(scope="module", autouse=True)
def installed() -> None:
    if not ZHLLAMA.is_file():
        pytest.fail(f"no zhllama console script beside {sys.executable}: pip install -e .")


def zhllama(*args: str, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(ZHLLAMA), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=timeout)


def test_help_lists_every_command():
    r = zhllama("--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: zhllama")
    listed = {line.split()[0]: line.split(None, 1)[1] for line in r.stdout.splitlines()
              if line.startswith("  ") and len(line.split()) > 1}
    for c in COMMANDS:
        assert listed.get(c.name) == c.summary, c.name


def test_every_module_with_a_main_is_a_command():
    """A new `python -m` command cannot be forgotten in the table."""
    runnable = {".".join(p.relative_to(REPO).with_suffix("").parts)
                for package in ("data", "model", "tokenizer", "train", "kernels")
                for p in (REPO / package).rglob("*.py")
                if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8")}
    assert runnable - {"train.cli"} == {c.module for c in COMMANDS}


@pytest.mark.parametrize("name", [c.name for c in COMMANDS])
def test_every_command_help_has_its_zhllama_name(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith(f"usage: zhllama {name} "), out[:200]


def test_python_m_keeps_its_own_name(capsys):
    from data.prepare import main as prepare_main

    with pytest.raises(SystemExit):
        prepare_main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m data.prepare ")


def test_unknown_command_is_one_error_line():
    r = zhllama("frobnicate", "--x")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown command 'frobnicate'"), r.stderr
    for args in ([], ["--frobnicate"]):
        r = zhllama(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("error: ")


def test_a_command_error_is_the_commands_own(tmp_path):
    r = zhllama("prepare", "--tokenizer", tmp_path / "none.model", "--input", tmp_path / "x.txt",
                "--output_dir", tmp_path / "out")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_launch_options_are_told_from_the_scripts():
    args = ["cfg.yaml", "--nproc_per_node", "2", "--optim.lr=1e-3", "--standalone",
            "--nnodes=1", "--rdzv-endpoint", "host:29500", "--node_rank", "0", "--seed=3"]
    assert split_launch_options(args) == (
        ["--nproc_per_node", "2", "--standalone", "--nnodes=1", "--rdzv-endpoint", "host:29500",
         "--node_rank", "0"],
        ["cfg.yaml", "--optim.lr=1e-3", "--seed=3"])
    assert split_launch_options(["cfg.yaml", "--output_dir=x"]) == ([], ["cfg.yaml", "--output_dir=x"])


def shadowing_folders(root: Path) -> Path:
    """A working directory whose folders are named like our packages (the issue's
    `data/sft`, where a user keeps SFT shards), each an importable package."""
    for name in ("data", "data/sft", "model", "tokenizer", "train"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text("")
    return root


def test_user_folders_cannot_shadow_the_commands(world, tmp_path):
    cwd = shadowing_folders(tmp_path / "work")
    # they do shadow `python -m`: the reason the console script exists
    r = subprocess.run([sys.executable, "-m", "data.prepare", "--help"], capture_output=True,
                       text=True, cwd=cwd, env=ENV)
    assert r.returncode != 0
    r = zhllama("prepare", "--help", cwd=cwd)
    assert r.returncode == 0 and r.stdout.startswith("usage: zhllama prepare "), r.stderr
    (cwd / "corpus.txt").write_text("一行中文。\nOne line of English.\n第三行。\n", encoding="utf-8")
    (cwd / "alpaca.json").write_text(json.dumps(
        [{"instruction": "续写：从前", "input": "", "output": "有一座山。"}], ensure_ascii=False),
        encoding="utf-8")
    tok = world / "tokenizer.model"
    # two workers: the spawned processes must not find the folders either
    r = zhllama("prepare", "--tokenizer", tok, "--input", "corpus.txt", "--output_dir", "data/tokens",
                "--num_workers", "2", "--chunk_mb", "0.00001", cwd=cwd)
    assert r.returncode == 0, r.stderr
    meta = json.loads((cwd / "data" / "tokens" / "meta.json").read_text())
    assert meta["kind"] == "pretrain" and meta["num_documents"] == 3 and len(meta["files"]) > 1
    r = zhllama("prepare", "--sft", "--tokenizer", tok, "--input", "alpaca.json", "--output_dir",
                "data/sft/alpaca", "--num_workers", "1", cwd=cwd)
    assert r.returncode == 0, r.stderr
    meta = json.loads((cwd / "data" / "sft" / "alpaca" / "meta.json").read_text())
    assert meta["kind"] == "sft" and meta["num_documents"] == 1


def pretrain_args(world: Path, out: Path, micro_batch_size: int) -> list[str]:
    cmd = train_cmd("pretrain", "stage2.yaml", world, out, *ONE_STEP,
                    f"--optim.micro_batch_size={micro_batch_size}")
    assert cmd[1].endswith("pretrain.py")
    return cmd[2:]  # the config and its overrides


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory) -> Path:
    """One step of stage 2 run by `zhllama pretrain` in its own process, 2 sequences a step."""
    root = tmp_path_factory.mktemp("one_process")
    r = zhllama("pretrain", *pretrain_args(world, root / "run", 2),
                cwd=shadowing_folders(root / "work"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run"


def test_pretrain_in_this_process(one_process):
    assert len(losses(one_process)) == 1
    assert (one_process / "adapter" / "adapter_model.safetensors").is_file()


def test_pretrain_on_two_processes_through_torchrun(world, one_process, tmp_path):
    """Two ranks of one sequence each: the same step as one process of two sequences, which
    only a run that really had two ranks (each its half of the batch) gives."""
    config, *overrides = pretrain_args(world, tmp_path / "run", 1)
    r = zhllama("pretrain", config, "--nproc_per_node", "2", "--standalone", *overrides,
                cwd=shadowing_folders(tmp_path / "work"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    one, two = losses(one_process), losses(tmp_path / "run")
    assert len(two) == 1 and abs(one[0] - two[0]) < 1e-5, (one, two)
    grad_norms = losses(one_process, "grad_norm"), losses(tmp_path / "run", "grad_norm")
    assert abs(grad_norms[0][0] - grad_norms[1][0]) < 1e-5, grad_norms
