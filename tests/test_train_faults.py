"""Training under faults and hostile inputs, in real processes: kill -9 and resume for every
stage, kills landing inside checkpoint saves, tampered checkpoints whose planted code must
never run, resumes that honour the new config or refuse it, one run per output directory,
incomplete steps skipped, a non-finite stop resumed at a lower rate, Ctrl-C."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ENV, FAST, hf_lrs, losses, metrics, one_error, run, train_cmd


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def final_tensors(out: Path) -> dict[str, torch.Tensor]:
    if (out / "adapter").exists():
        return load_file(out / "adapter" / "adapter_model.safetensors")
    return load_file(out / "model" / "model.safetensors")


STAGES = {  # name: (script, config, extra settings)
    "embeddings": ("pretrain", "stage1.yaml", []),
    "embeddings-new-rows": ("pretrain", "stage1.yaml", ["--model.new_rows_from=400"]),
    "lora": ("pretrain", "stage2.yaml", ["--lora.dropout=0.2"]),
    "full": ("pretrain", "stage1.yaml", ["--stage=full", "--optim.lr=1e-3"]),
    "sft": ("sft", "sft.yaml", ["--lora.dropout=0.2"]),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_9_and_resume_bit_for_bit_for_every_stage(world, tmp_path, stage):
    script, config, extra = STAGES[stage]
    common = [*FAST, "--optim.max_steps=8", "--checkpoint.every=2", "--checkpoint.keep_last=2", *extra]
    run(train_cmd(script, config, world, tmp_path / "straight", *common))
    cmd = train_cmd(script, config, world, tmp_path / "killed", *common)
    kill_after = random.Random(stage).choice([2, 4, 6])  # a different point for each stage
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    wait_for(tmp_path / "killed" / f"step-{kill_after}" / "meta.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = run(cmd)
    assert f"resumed from {tmp_path / 'killed' / f'step-{kill_after}'}" in r.stdout or \
        "resumed from" in r.stdout, r.stdout[-2000:]
    a, b = final_tensors(tmp_path / "straight"), final_tensors(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "killed")


def test_kills_inside_checkpoint_saves_never_break_the_resume(world, tmp_path):
    """A checkpoint every step, so most kills land in or near a save; whatever they leave,
    the next start resumes from a complete step and ends where a straight run ends."""
    common = [*FAST, "--optim.max_steps=10", "--checkpoint.every=1", "--checkpoint.keep_last=2"]
    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "straight", *common))
    out = tmp_path / "killed"
    cmd = train_cmd("pretrain", "stage2.yaml", world, out, *common)
    rng = random.Random(0)
    kills = 0
    for target in (2, 4, 6, 8):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        # wait until the run is writing the step after `target`, then kill at a random moment
        deadline = time.time() + 300
        while not (list(out.glob(f".step-{target + 1}.tmp")) or (out / f"step-{target + 1}").exists()):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    run(cmd)
    a, b = final_tensors(tmp_path / "straight"), final_tensors(out)
    assert kills == 4 and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.glob(".step-*"))  # nothing half-written or half-deleted is left


# ---------------------------------------------------------------------------------------
# tampered checkpoints


class Planted:
    """Unpickling this runs `touch MARKER`: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _trained(world, tmp_path: Path) -> tuple[list[str], Path]:
    """A 4-step run with steps 2 and 4 kept, and the command that would resume it to 6."""
    out = tmp_path / "run"
    common = [*FAST, "--checkpoint.every=2", "--checkpoint.keep_last=3"]
    run(train_cmd("pretrain", "stage2.yaml", world, out, *common, "--optim.max_steps=4"))
    return train_cmd("pretrain", "stage2.yaml", world, out, *common, "--optim.max_steps=6"), out


def _update_sizes(step: Path) -> None:
    """As an attacker would: make meta.json agree with the tampered files."""
    meta = json.loads((step / "meta.json").read_text())
    meta["files"] = {n: (step / n).stat().st_size for n in meta["files"]}
    (step / "meta.json").write_text(json.dumps(meta))


def _tamper_metadata(step: Path, marker: Path) -> None:
    (step / ".metadata").write_bytes(pickle.dumps(Planted(marker)))


def _tamper_bytes_item(step: Path, marker: Path) -> None:
    """Declare a counter a pickled ("bytes") item stored in a .distcp file; DCP's default
    planner would unpickle it with weights_only=False."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    meta = pickle.loads((step / ".metadata").read_bytes())  # the test trusts it: it made it
    key = "train.progress.step"
    distcp = next(step.glob("*.distcp"))
    payload = io.BytesIO()
    torch.save(Planted(marker), payload)
    offset = distcp.stat().st_size
    with open(distcp, "ab") as f:
        f.write(payload.getvalue())
    meta.state_dict_metadata[key] = BytesStorageMetadata()
    for index in [i for i in meta.storage_data if i.fqn == key]:
        del meta.storage_data[index]
    meta.storage_data[MetadataIndex(key)] = _StorageInfo(distcp.name, offset, len(payload.getvalue()))
    (step / ".metadata").write_bytes(pickle.dumps(meta))


def _tamper_tensor_item(step: Path, marker: Path) -> None:
    """Point a tensor item at a pickle that runs code when loaded."""
    meta = pickle.loads((step / ".metadata").read_bytes())
    index = next(i for i in meta.storage_data if i.fqn == "train.progress.tokens")
    info = meta.storage_data[index]
    distcp = step / info.relative_path
    payload = io.BytesIO()
    torch.save(Planted(marker), payload)
    offset = distcp.stat().st_size
    with open(distcp, "ab") as f:
        f.write(payload.getvalue())
    meta.storage_data[index] = type(info)(info.relative_path, offset, len(payload.getvalue()),
                                          info.transform_descriptors)
    (step / ".metadata").write_bytes(pickle.dumps(meta))


@pytest.mark.parametrize("tamper,words", [
    (_tamper_metadata, ["refused to load posix.system"]),
    (_tamper_bytes_item, ["train.progress.step", "pickled object"]),
    (_tamper_tensor_item, ["posix.system"]),
])
def test_tampered_checkpoints_are_refused_and_run_nothing(world, tmp_path, tamper, words):
    cmd, out = _trained(world, tmp_path)
    marker = tmp_path / "PLANTED_CODE_RAN"
    step = out / "step-4"
    tamper(step, marker)
    _update_sizes(step)
    before = tree_hashes(out)
    line = one_error(run(cmd, ok=False))
    assert not marker.exists()
    assert str(step) in line and all(w in line for w in words), line
    assert tree_hashes(out) == before


def test_truncated_step_falls_back_to_the_previous_one(world, tmp_path):
    cmd, out = _trained(world, tmp_path)
    distcp = next((out / "step-4").glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[:-100])  # a power loss, a full disk
    r = run(cmd)
    assert "warning: skipping step-4" in r.stderr and "bytes, meta.json says" in r.stderr
    assert f"resumed from {out / 'step-2'} (step 2)" in r.stdout
    assert (out / "step-6" / "meta.json").exists()


# ---------------------------------------------------------------------------------------
# resumes and the config


def test_resume_takes_the_new_optimizer_settings(world, tmp_path):
    out = tmp_path / "run"
    first = [*FAST, "--optim.max_steps=4", "--checkpoint.every=2", "--optim.lr=1e-3"]
    run(train_cmd("pretrain", "stage2.yaml", world, out, *first))
    second = [*FAST, "--optim.max_steps=8", "--checkpoint.every=2", "--optim.lr=5e-4",
              "--optim.schedule=linear", "--optim.weight_decay=0.1", "--optim.beta2=0.99"]
    r = run(train_cmd("pretrain", "stage2.yaml", world, out, *second))
    line = next(l for l in r.stdout.splitlines() if l.startswith("resumed from"))
    for change in ("optim.lr: 0.001 → 0.0005", "optim.max_steps: 4 → 8",
                   "optim.schedule: 'cosine' → 'linear'", "optim.weight_decay: 0.01 → 0.1",
                   "optim.beta2: 0.95 → 0.99"):
        assert change in line, line
    # steps 5..8 follow transformers' linear schedule for the new settings
    expected = hf_lrs("linear", 5e-4, warmup=2, max_steps=8, min_lr_ratio=0.0)
    rows = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in rows] == list(range(1, 9))
    assert [m["lr"] for m in rows][4:] == pytest.approx(expected[4:], rel=1e-12)
    saved = (out / "step-8" / "config.yaml").read_text()
    assert "beta2: 0.99" in saved and "weight_decay: 0.1" in saved


@pytest.mark.parametrize("change,key", [
    (["--lora.r=4"], "lora.r: 8 → 4"),
    (["--lora.alpha=16"], "lora.alpha: 32.0 → 16.0"),
    (["--lora.targets=wq,wv"], "lora.targets"),
    (["--lora.modules_to_save=output"], "lora.modules_to_save"),
    (["--data.block_size=16"], "data.block_size: 32 → 16"),
    (["--stage=embeddings"], "stage: 'lora' → 'embeddings'"),
    (["--seed=1"], "seed: 0 → 1"),
])
def test_a_resume_that_cannot_continue_is_refused_before_anything_is_written(world, tmp_path, change, key):
    out = tmp_path / "run"
    base = [*FAST, "--optim.max_steps=2", "--checkpoint.every=2"]
    run(train_cmd("pretrain", "stage2.yaml", world, out, *base))
    before = tree_hashes(out)
    line = one_error(run(train_cmd("pretrain", "stage2.yaml", world, out, *base, *change,
                                   "--optim.max_steps=4"), ok=False))
    assert key in line and "cannot resume step-2" in line and f"--output_dir={out}-2" in line, line
    assert tree_hashes(out) == before


def test_other_data_or_weights_are_refused(world, tmp_path):
    import shutil

    out = tmp_path / "run"
    base_copy = tmp_path / "base"
    shutil.copytree(world / "base", base_copy)
    base = [*FAST, "--optim.max_steps=2", "--checkpoint.every=2"]
    cmd = [c if not c.startswith("--model.path=") else f"--model.path={base_copy}"
           for c in train_cmd("pretrain", "stage2.yaml", world, out, *base)]
    run(cmd)
    before = tree_hashes(out)
    # the same path, other weights: a base retrained or replaced in place
    from model.formats import read_checkpoint, write_model_dir
    from model.source import from_state_dict

    ckpt = read_checkpoint(base_copy)
    state = {n: ckpt.get(n).clone() for n in ckpt.specs}
    state["norm.weight"] += 1
    write_model_dir(from_state_dict(state, ckpt.args, tokenizer=world / "tokenizer.model"),
                    base_copy, overwrite=True, progress=False)
    line = one_error(run([*cmd, "--optim.max_steps=4"], ok=False))
    assert "model weights" in line, line
    line = one_error(run([*cmd, f"--data.path={world / 'sft'}"], ok=False))
    assert "data.path" in line, line
    assert tree_hashes(out) == before


def test_model_inside_output_dir_is_refused(world, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(world / "base", out / "model")
    before = tree_hashes(out)
    cmd = [c if not c.startswith("--model.path=") else f"--model.path={out / 'model'}"
           for c in train_cmd("pretrain", "stage2.yaml", world, out, *FAST, "--optim.max_steps=2")]
    line = one_error(run(cmd, ok=False))
    assert "model.path" in line and "inside output_dir" in line
    assert tree_hashes(out) == before


def test_non_finite_stop_then_a_lower_rate_resumes_and_finishes(world, tmp_path):
    out = tmp_path / "nan"
    cmd = train_cmd("pretrain", "stage2.yaml", world, out, "--optim.max_steps=12",
                    "--optim.lr=1e8", "--optim.warmup_steps=0", "--optim.clip_grad_norm=null",
                    "--log.max_bad_steps=2", "--checkpoint.every=1", "--checkpoint.keep_last=1",
                    "--data.block_size=32", "--log.eval_every=0")
    line = one_error(run(cmd, ok=False))
    good = line.split("the last checkpoint followed by a finite loss is ")[1].split()[0]
    assert f"--optim.lr=<lower rate>: it resumes from {Path(good).name}" in line, line
    r = run([*cmd, "--optim.lr=1e-3"])  # as the message says
    assert f"resumed from {good}" in r.stdout and "optim.lr: 100000000.0 → 0.001" in r.stdout
    expected = hf_lrs("cosine", 1e-3, warmup=0, max_steps=12, min_lr_ratio=0.0)
    resumed = [m for m in metrics(out) if "loss" in m and m["step"] > int(good.split("-")[-1])]
    assert [m["step"] for m in resumed] == list(range(int(good.split("-")[-1]) + 1, 13))
    assert [m["lr"] for m in resumed] == pytest.approx(expected[-len(resumed):], rel=1e-12)
    assert all(m["loss"] == m["loss"] for m in resumed)  # finite from there on
    assert (out / "adapter" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------------------
# one run per output directory; Ctrl-C


def test_a_second_run_on_the_same_output_dir_is_refused(world, tmp_path):
    out = tmp_path / "run"
    cmd = train_cmd("pretrain", "stage2.yaml", world, out, *FAST, "--optim.max_steps=100000",
                    "--checkpoint.every=0")
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        wait_for(out / "metrics.jsonl", first)
        line = one_error(run(cmd, ok=False))
        assert f"pid {first.pid}" in line and "in use" in line, line
    finally:
        first.kill()
        first.wait()


def test_orphaned_workers_of_a_killed_launcher_still_hold_the_directory(world, tmp_path):
    out = tmp_path / "run"
    cmd = train_cmd("pretrain", "stage2.yaml", world, out, *FAST, "--optim.max_steps=100000",
                    "--checkpoint.every=0", nproc=2)
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                                start_new_session=True)
    try:
        wait_for(out / "metrics.jsonl", launcher)
        launcher.send_signal(signal.SIGKILL)  # the launcher only: its workers live on
        launcher.wait()
        single = train_cmd("pretrain", "stage2.yaml", world, out, *FAST, "--optim.max_steps=100000",
                           "--checkpoint.every=0")
        line = one_error(run(single, ok=False))
        assert "in use" in line and "pid" in line, line
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:  # the workers may have ended by themselves by now
            pass
        kill_processes_mentioning(out)  # torchrun's workers have process groups of their own


def kill_processes_mentioning(path) -> None:
    """SIGKILL every process whose command line names `path` (orphaned workers would
    otherwise train on until max_steps, long after the test)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if str(path) in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):  # gone meanwhile, or not ours to read
            pass


def test_ctrl_c_says_what_was_kept(world, tmp_path):
    out = tmp_path / "run"
    cmd = train_cmd("pretrain", "stage2.yaml", world, out, *FAST, "--optim.max_steps=100000",
                    "--checkpoint.every=2")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for(out / "step-4" / "meta.json", proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    r = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    line = one_error(r, code=130)
    assert line.startswith("error: interrupted at step ") and "the run resumes from step-" in line, line


def _launch(cmd: list[str]) -> list[str]:
    """The same run under `python -m train.launch` (torchrun in-process) instead of torchrun."""
    i = cmd.index("torch.distributed.run")
    return [*cmd[:i], "train.launch", *cmd[i + 1:]]


def test_ctrl_c_under_torchrun_ends_in_one_line(world, tmp_path):
    out = tmp_path / "run"
    cmd = _launch(train_cmd("pretrain", "stage2.yaml", world, out, *FAST, "--optim.max_steps=100000",
                            "--checkpoint.every=2", nproc=2))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    wait_for(out / "step-4" / "meta.json", proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process at once
    stdout, stderr = proc.communicate(timeout=120)
    line = one_error(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), code=130)
    assert "interrupted at step" in line and "the run resumes from step-" in line, line


def test_a_failure_under_torchrun_is_one_line(world, tmp_path):
    cmd = _launch(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "run", *FAST,
                            "--optim.max_steps=2", nproc=2))
    cmd = [c if not c.startswith("--data.path=") else f"--data.path={tmp_path / 'missing'}" for c in cmd]
    line = one_error(run(cmd, ok=False))
    assert str(tmp_path / "missing") in line, line
