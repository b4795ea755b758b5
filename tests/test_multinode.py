"""Past one machine, in real processes: two torchrun "nodes" (one process each, a c10d
rendezvous over loopback) train as one process does, with FSDP and with HSDP
(parallel.replicate 2); a run stopped on one rank and continued on two reads on exactly
where it stopped, with the losses of a run that never stopped."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers import ENV, losses, metrics, run, train_cmd
from tests.test_train_faults import final_tensors

# Blocks of 32 tokens, a constant rate (so that max_steps can grow on a resume without
# changing a step's rate), two micro-batches per step: 8 rows, dealt 4 + 4 on one rank or
# 2 + 2 on each of two.
COMMON = ["--data.block_size=32", "--data.val_fraction=0", "--log.eval_every=0", "--optim.grad_accum=2",
          "--optim.schedule=constant_with_warmup", "--optim.warmup_steps=0", "--checkpoint.every=0"]
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(cmd: list[str], ok: bool = True) -> list[subprocess.CompletedProcess]:
    """Run `cmd` (a one-process train_cmd) as two torchrun "nodes" of one process each,
    meeting at a c10d rendezvous on loopback: the multi-node launch, on one machine."""
    script_and_args = cmd[1:]
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "zhllama-test",
         "--node_rank", str(node), *script_and_args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for node in (0, 1)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    if ok:
        for r in done:
            assert r.returncode == 0, r.stderr[-3000:]
    return done


def data_position(step: Path, rank: int) -> dict:
    """The data position a rank saved in a step (rank-R.safetensors' metadata)."""
    with safe_open(step / f"rank-{rank}.safetensors", "pt") as f:
        return json.loads(f.metadata()["data"])


def close(a: list[float], b: list[float], tol: float) -> bool:
    return len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) <= tol


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=tol) for k in a)


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    """The reference: one process, 4 rows per micro-batch, STEPS steps without a stop
    (checkpoints half way and at the end)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run(train_cmd("pretrain", "stage2.yaml", world, out, *COMMON, f"--optim.max_steps={STEPS}",
                  "--optim.micro_batch_size=4", f"--checkpoint.every={STEPS // 2}"))
    return out


@pytest.mark.parametrize("replicate", [1, 2], ids=["fsdp", "hsdp"])
def test_two_nodes_equal_one_process(world, straight, tmp_path, replicate):
    out = tmp_path / "nodes"
    two_nodes(train_cmd("pretrain", "stage2.yaml", world, out, *COMMON, f"--optim.max_steps={STEPS}",
                        "--optim.micro_batch_size=2", f"--parallel.replicate={replicate}"))
    assert len(losses(straight)) == STEPS
    assert close(losses(out), losses(straight), 1e-5), (losses(out), losses(straight))
    assert close(losses(out, "grad_norm"), losses(straight, "grad_norm"), 1e-5)
    assert same_tensors(final_tensors(out), final_tensors(straight), 1e-5)
    # the blocks of all STEPS · 8 rows consumed, counted alike by every rank
    end = data_position(straight / f"step-{STEPS}", 0)
    assert end["position"] == STEPS * 8 and end["epoch"] == 0
    assert data_position(out / f"step-{STEPS}", 0) == data_position(out / f"step-{STEPS}", 1) == end
    assert losses(out)[-1] < losses(out)[0]


def test_replicate_must_divide_the_world_size():
    from train.config import ConfigError
    from train.distributed import make_mesh

    with pytest.raises(ConfigError, match=r"parallel.replicate: 3 does not divide the world size 8"):
        make_mesh(torch.device("cpu"), 8, 3)  # refused before any mesh is made


def test_stopped_on_one_rank_continued_on_two_reads_on(world, straight, tmp_path):
    """Half the steps on one rank (4 rows per micro-batch), the rest on two (2 each, the
    same global batch): the same blocks in the same order, so the losses of the run that
    never stopped; the data position saved is the same on every rank."""
    out = tmp_path / "moved"
    # the straight run as it stood at its half-way checkpoint: a run stopped there
    shutil.copytree(straight, out)
    for later in (out / f"step-{STEPS}", out / "adapter"):
        shutil.rmtree(later)
    r = run(train_cmd("pretrain", "stage2.yaml", world, out, *COMMON, f"--optim.max_steps={STEPS}",
                      "--optim.micro_batch_size=2", nproc=2))
    assert "was saved by 1 rank(s), this run has 2: the data reads on where it stopped" in r.stderr
    assert "rank 1 start new random states" in r.stderr
    assert f"resumed from {out / f'step-{STEPS // 2}'} (step {STEPS // 2})" in r.stdout
    assert [m["step"] for m in metrics(out) if "loss" in m] == list(range(1, STEPS + 1))
    assert close(losses(out), losses(straight), 1e-5), (losses(out), losses(straight))
    assert close(losses(out, "grad_norm"), losses(straight, "grad_norm"), 1e-5)
    assert same_tensors(final_tensors(out), final_tensors(straight), 1e-5)
    end = data_position(straight / f"step-{STEPS}", 0)
    assert data_position(out / f"step-{STEPS}", 0) == data_position(out / f"step-{STEPS}", 1) == end
