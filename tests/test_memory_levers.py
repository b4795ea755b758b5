"""The memory levers, in real processes where training runs: per-op checkpointing ("op")
and activation offloading leave a run's losses bit for bit; torchao's 8-bit AdamW tracks
torch's, keeps its moments in 8 bits and resumes bit for bit; optim.embedding_lr gives the
vocabulary matrices their own rate, scheduled as transformers schedules it, and a killed
run with it resumes exactly; each refusal is one error line before anything is written."""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ENV, FAST, REPO, hf_lrs, losses, one_error, run, train_cmd
from tests.test_train_faults import final_tensors, wait_for
from train.config import OptimConfig
from train.optim import build_optimizer, param_groups, set_lr


# ---------------------------------------------------------------------------------------
# activation checkpointing per op, activation offloading


def test_op_checkpointing_and_offloading_leave_the_losses_bit_for_bit(world, tmp_path):
    """Bit for bit, not within a tolerance: on CPU every kernel is deterministic, the
    recomputation repeats the forward's own operations on the same inputs (checkpoint
    restores the RNG state, so dropout draws the same masks), "op" hands backward the very
    tensors the forward computed, and offloading is a copy to CPU memory and back."""
    pretrain = [*FAST, "--optim.max_steps=4", "--checkpoint.every=0", "--lora.dropout=0.2"]
    for mode in ("none", "op"):
        run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / mode, *pretrain,
                      f"--parallel.activation_checkpointing={mode}"))
    # packed SFT rows (attention kept inside each sample), both levers at once
    sft = ["--optim.max_steps=3", "--checkpoint.every=0", "--data.pack=true", "--data.max_seq_length=256",
           "--lora.dropout=0.2"]
    run(train_cmd("sft", "sft.yaml", world, tmp_path / "sft-none", *sft))
    run(train_cmd("sft", "sft.yaml", world, tmp_path / "sft-op+offload", *sft,
                  "--parallel.activation_checkpointing=op", "--parallel.activation_offload=true"))
    for plain, levers in (("none", "op"), ("sft-none", "sft-op+offload")):
        for key in ("loss", "grad_norm"):
            a, b = losses(tmp_path / plain, key), losses(tmp_path / levers, key)
            assert len(a) >= 3 and a == b, (levers, key, a, b)
    assert losses(tmp_path / "none")[-1] < losses(tmp_path / "none")[0]


def test_offload_without_checkpointing_is_refused_before_anything_is_written(world, tmp_path):
    out = tmp_path / "run"
    line = one_error(run(train_cmd("pretrain", "stage2.yaml", world, out, *FAST,
                                   "--parallel.activation_checkpointing=none",
                                   "--parallel.activation_offload=true"), ok=False))
    assert "parallel.activation_offload" in line and "parallel.activation_checkpointing" in line, line
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# torch's AdamW: foreach on CPU, fused on CUDA


def _trained(params: list[torch.Tensor], **kwargs) -> list[torch.Tensor]:
    """`params` after five AdamW steps on the same gradients, with torch's `kwargs`."""
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW([{"params": ps[:2], "weight_decay": 0.01}, {"params": ps[2:], "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach() for p in ps]


def test_adamw_is_foreach_on_cpu_and_steps_as_torchs_default():
    from model.llama import build_model, named_args

    opt = build_optimizer(build_model(named_args("tiny")), OptimConfig())
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["foreach"] is True and not opt.defaults["fused"]
    # on CPU torch's default is its for-loop implementation: foreach computes the same floats
    torch.manual_seed(0)
    params = [torch.randn(s) for s in [(64, 64), (601, 64), (64,), (8, 192)]]
    for a, b in zip(_trained(params, foreach=True), _trained(params, foreach=False)):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adamw_is_fused_on_cuda():
    from model.llama import build_model, named_args

    opt = build_optimizer(build_model(named_args("tiny")).cuda(), OptimConfig())
    assert opt.defaults["fused"] is True


# ---------------------------------------------------------------------------------------
# torchao's 8-bit AdamW

# LoRA r=64 on wq: 64×64 factors, which torchao keeps in 8 bits (≥ 4,096 elements, whole
# blocks of 256); the toy vocabulary's matrices (601 rows) are not whole blocks and stay fp32.
EIGHT_BIT = [*FAST, "--lora.targets=wq", "--lora.r=64", "--lora.alpha=64",
             "--parallel.activation_checkpointing=none", "--checkpoint.every=2", "--checkpoint.keep_last=3"]


def _distcp_bytes(step: Path) -> int:
    return sum(p.stat().st_size for p in step.glob("*.distcp"))


def test_adamw8bit_tracks_adamw_in_8_bits_and_resumes_bit_for_bit(world, tmp_path):
    """On CPU too: torchao compiles its step with inductor (a C++ compiler is needed), so
    the first steps of a process take a while."""
    pytest.importorskip("torchao")
    steps = ["--optim.max_steps=4"]
    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "adamw", *EIGHT_BIT, *steps))
    eight = tmp_path / "adamw8bit"
    run(train_cmd("pretrain", "stage2.yaml", world, eight, *EIGHT_BIT, *steps, "--optim.name=adamw8bit"))
    ref, got = losses(tmp_path / "adamw"), losses(eight)
    assert len(got) == 4 and max(abs(a - b) for a, b in zip(ref, got)) <= 1e-3, (ref, got)
    assert got[-1] < got[0]
    # the LoRA factors' two moments take 1 byte an element instead of 4 (plus a scale per
    # block of 256 and torchao's 256-entry map): at least 60% of their fp32 bytes saved
    lora = sum(t.numel() for k, t in load_file(eight / "adapter" / "adapter_model.safetensors").items()
               if k.endswith(("lora_a", "lora_b")))
    saved = _distcp_bytes(tmp_path / "adamw" / "step-2") - _distcp_bytes(eight / "step-2")
    assert saved >= 0.6 * 2 * 4 * lora, (saved, lora)

    # resumed from step 2 (the newer step removed): the same run, bit for bit
    resumed = tmp_path / "resumed"
    shutil.copytree(eight, resumed)
    shutil.rmtree(resumed / "step-4")
    shutil.rmtree(resumed / "adapter")
    r = run(train_cmd("pretrain", "stage2.yaml", world, resumed, *EIGHT_BIT, *steps, "--optim.name=adamw8bit"))
    assert f"resumed from {resumed / 'step-2'} (step 2)" in r.stdout, r.stdout[-2000:]
    assert losses(resumed) == got
    a, b = final_tensors(eight), final_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the moments are in the optimizer's own format: another optimizer cannot take them over
    line = one_error(run(train_cmd("pretrain", "stage2.yaml", world, eight, *EIGHT_BIT, "--optim.max_steps=6",
                                   "--optim.name=adamw"), ok=False))
    assert "optim.name: 'adamw8bit' → 'adamw'" in line and "cannot resume step-4" in line, line


def test_adamw8bit_without_torchao_is_refused_before_anything_is_written(world, tmp_path):
    out = tmp_path / "run"
    argv = train_cmd("pretrain", "stage2.yaml", world, out, *FAST, "--optim.name=adamw8bit")[2:]
    code = ("import sys; sys.modules['torchao'] = None  # import torchao fails, as if not installed\n"
            "from train.pretrain import main\nmain(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO,
                       env=ENV, timeout=300)
    line = one_error(r)
    assert "optim.name: adamw8bit" in line and "zhllama[torchao]" in line, line
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# optim.embedding_lr


def _lora_model():
    from model.llama import build_model, named_args
    from model.lora import LoRAConfig, apply_lora, mark_trainable

    lc = LoRAConfig(r=4, alpha=8, targets=("wq", "wv", "w2"), modules_to_save=("tok_embeddings", "output"))
    model = apply_lora(build_model(named_args("tiny")), lc)
    mark_trainable(model, lc.modules_to_save)
    return model


@pytest.mark.parametrize("schedule,min_lr_ratio", [("cosine", 0.0), ("cosine", 0.1), ("linear", 0.0),
                                                   ("constant_with_warmup", 0.0)])
def test_every_group_follows_transformers_schedule_from_its_own_rate(schedule, min_lr_ratio):
    cfg = OptimConfig(lr=1e-3, embedding_lr=3e-5, warmup_steps=3, max_steps=12, schedule=schedule,
                      min_lr_ratio=min_lr_ratio)
    model = _lora_model()
    opt = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = {(g["lr"], names[id(p)].endswith("lora_a") or names[id(p)].endswith("lora_b"))
               for g in opt.param_groups for p in g["params"]}
    assert grouped == {(1e-3, True), (3e-5, False)}  # LoRA at optim.lr, the vocabulary matrices apart
    expected = {base: hf_lrs(schedule, base, 3, 12, min_lr_ratio) for base in (1e-3, 3e-5)}
    for step in range(12):
        logged = set_lr(opt, step, cfg)
        assert logged == expected[1e-3][step]
        for g in opt.param_groups:  # bit for bit: base times the factor, as LambdaLR computes it
            assert g["lr"] == expected[g["initial_lr"]][step]


def test_groups_split_by_rate_and_decay_and_adamw8bit_schedules_its_tensor_rates():
    pytest.importorskip("torchao")
    from model.llama import build_model, named_args

    model = build_model(named_args("tiny"))  # stage full: norms are 1-D and do not decay
    groups = param_groups(model, 0.1, lr=1e-3, embedding_lr=2e-4)
    got = [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups]
    n_layers = model.args.n_layers
    assert got == [(1e-3, 0.1, 7 * n_layers), (1e-3, 0.0, 2 * n_layers + 1), (2e-4, 0.1, 2)]
    assert len(param_groups(model, 0.1, lr=1e-3)) == 2  # without embedding_lr, as before
    cfg = OptimConfig(name="adamw8bit", lr=1e-3, embedding_lr=2e-4, warmup_steps=2, max_steps=6)
    opt = build_optimizer(model, cfg)
    assert type(opt).__name__ == "AdamW8bit"
    for step in range(6):
        set_lr(opt, step, cfg)
        for g in opt.param_groups:  # torchao keeps each rate as a float32 tensor
            want = hf_lrs("cosine", g["initial_lr"], 2, 6, 0.0)[step]
            assert isinstance(g["lr"], torch.Tensor) and float(g["lr"]) == float(torch.tensor(want))


def test_the_vocabulary_matrices_move_at_their_own_rate(world, tmp_path):
    """Adam's first step moves every element with a gradient by the rate itself (the
    moments' bias corrections make it rate · g / (|g| + eps)), and one with none not at all."""
    out = tmp_path / "run"
    run(train_cmd("pretrain", "stage2.yaml", world, out, *FAST, "--optim.max_steps=1", "--optim.warmup_steps=0",
                  "--optim.schedule=constant_with_warmup", "--optim.weight_decay=0", "--optim.lr=1e-3",
                  "--optim.embedding_lr=1e-4", "--checkpoint.every=0"))
    trained = load_file(out / "adapter" / "adapter_model.safetensors")
    base = load_file(world / "base" / "model.safetensors")
    moved = {"lora_b": torch.cat([t.flatten() for k, t in trained.items() if k.endswith("lora_b")])}  # from 0
    for name in ("tok_embeddings.weight", "output.weight"):
        moved[name] = (trained[name] - base[name]).flatten()
    for name, rate in (("lora_b", 1e-3), ("tok_embeddings.weight", 1e-4), ("output.weight", 1e-4)):
        step = moved[name].abs().double()
        assert step.max() <= rate * 1.001, (name, float(step.max()))
        assert math.isclose(float(step[step > 0].median()), rate, rel_tol=0.01), name
    # the rows of tokens the step never saw have no gradient: unchanged
    rows = (trained["tok_embeddings.weight"] != base["tok_embeddings.weight"]).any(dim=1)
    assert 0 < int(rows.sum()) < rows.numel()


def test_a_killed_run_with_embedding_lr_resumes_bit_for_bit(world, tmp_path):
    common = [*FAST, "--optim.max_steps=8", "--checkpoint.every=2", "--checkpoint.keep_last=2",
              "--optim.embedding_lr=3e-4", "--lora.dropout=0.2"]
    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "straight", *common))
    cmd = train_cmd("pretrain", "stage2.yaml", world, tmp_path / "killed", *common)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    wait_for(tmp_path / "killed" / "step-4" / "meta.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = run(cmd)
    assert "resumed from" in r.stdout, r.stdout[-2000:]
    a, b = final_tensors(tmp_path / "straight"), final_tensors(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "killed")
    assert losses(tmp_path / "straight", "lr") == losses(tmp_path / "killed", "lr")
