"""QLoRA (model.quantize: nf4): NF4 projections against torchao's own dequantized weights and
QLoRA's published levels, their bytes against bf16's, and real stage-2 runs — tracking the
fp32 and the bf16 run, 2 ranks equal to 1, resumed, merged onto the unquantized base — and refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from model.formats import read_checkpoint
from model.llama import build_model, named_args
from model.lora import LoRAConfig, LoRALinear, apply_lora, mark_trainable
from model.quant import QuantizeError, frozen_weight_bytes, is_nf4, quantize_frozen, to_nf4
from tests.conftest import random_model
from tests.helpers import REPO, ENV, losses, one_error, run, train_cmd

# NF4's 16 levels as QLoRA publishes them (Dettmers et al. 2023, appendix E; bitsandbytes'
# and torchao's table): the quantiles of N(0, 1), scaled into [-1, 1].
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])

STEPS = ["--optim.max_steps=3", "--data.val_fraction=0", "--data.block_size=32",
         "--optim.grad_accum=2", "--optim.warmup_steps=0", "--checkpoint.every=2"]
NF4 = "--model.quantize=nf4"
BF16 = ["--parallel.precision=bf16", "--model.dtype=bfloat16"]


def lora_layer(dtype: torch.dtype, out_features: int = 192, in_features: int = 128) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(in_features, out_features, r=4, alpha=8.0)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        layer.lora_b.normal_(0, 0.1)  # a non-zero update, so the LoRA branch counts
    layer.weight.requires_grad_(False)
    layer.weight.data = layer.weight.data.to(dtype)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_forward_and_backward_equal_the_dequantized_weights(dtype):
    layer = lora_layer(dtype)
    original = layer.weight.detach().clone()
    layer.weight = torch.nn.Parameter(to_nf4(layer.weight), requires_grad=False)
    w = layer.weight.get_original_weight()  # torchao's dequantization, the reference
    assert w.dtype == dtype and w.shape == original.shape
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    a, b = (t.detach().clone().requires_grad_(True) for t in (layer.lora_a, layer.lora_b))
    y_ref = F.linear(x_ref, w) + (F.linear(F.linear(x_ref.float(), a), b) * layer.scaling).to(dtype)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert torch.allclose(x.grad, x_ref.grad, **tol)
    assert torch.equal(layer.lora_a.grad, a.grad) and torch.equal(layer.lora_b.grad, b.grad)
    assert layer.weight.grad is None  # the base never gets a gradient
    # and it is QLoRA's NF4: blocks of 64 along each row, each value one of the 16 levels
    # times its block's scale (the block's largest magnitude, which NF4 keeps exactly at ±1)
    blocks = w.float().reshape(-1, 64)
    scale = blocks.abs().amax(dim=1, keepdim=True)
    nearest = (blocks / scale).unsqueeze(-1).sub(NF4_LEVELS).abs().amin(dim=-1)
    assert nearest.max() < (1e-4 if dtype == torch.float32 else 1e-2)  # torchao: 4 decimals
    error = (w.float() - original.float()).norm() / original.float().norm()
    assert 0 < error < 0.15  # 4 bits: close to, not equal to, the weights it stands for


def stage2_model(dtype: torch.dtype, lora: LoRAConfig, trained: tuple[str, ...]):
    model = random_model(named_args("tiny"))
    apply_lora(model, lora)
    mark_trainable(model, trained)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def test_only_frozen_projections_become_nf4_at_under_0_3_of_bf16():
    model = stage2_model(torch.bfloat16, LoRAConfig(), ("tok_embeddings", "output"))
    bf16 = frozen_weight_bytes(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not is_nf4(p)}
    names = quantize_frozen(model)
    assert len(names) == 2 * 7 and all(n.startswith("layers.") for n in names)
    assert frozen_weight_bytes(model) <= 0.3 * bf16, (frozen_weight_bytes(model), bf16)
    for name, p in model.named_parameters():
        assert is_nf4(p) == (name in names), name
        if name not in names:  # embeddings, output, norms, LoRA factors: untouched
            assert torch.equal(p, before[name]), name
    assert quantize_frozen(model) == []  # already NF4
    tokens = torch.randint(0, 512, (2, 16))
    model.loss(tokens, tokens).backward()  # trains through NF4: LoRA and the embeddings get gradients
    assert model.layers[0].attention.wq.lora_b.grad.abs().sum() > 0
    assert model.tok_embeddings.weight.grad is not None

    # fewer targets, output frozen: the other projections are NF4 too; output never is
    model = stage2_model(torch.bfloat16, LoRAConfig(targets=("wq", "wv")), ())
    names = quantize_frozen(model)
    assert "layers.1.attention.wk.weight" in names and not is_nf4(model.output.weight)
    assert type(model.layers[1].attention.wk) is torch.nn.Linear
    # nothing frozen (stage full): nothing quantized
    assert quantize_frozen(random_model(named_args("tiny"))) == []


def test_unfit_weights_and_merging_into_nf4_are_refused():
    model = build_model(named_args("tiny", dim=96, n_heads=4), init=False)  # rows of 96: 1.5 blocks
    apply_lora(model, LoRAConfig())
    mark_trainable(model, ())
    with pytest.raises(QuantizeError, match=r"layers\.0\.attention\.wq\.weight: shape \[96, 96\]"):
        quantize_frozen(model)
    assert not any(is_nf4(p) for p in model.parameters())  # checked before any was changed
    layer = lora_layer(torch.float32)
    layer.weight = torch.nn.Parameter(to_nf4(layer.weight), requires_grad=False)
    with pytest.raises(ValueError, match="unquantized base: zhllama merge-lora"):
        layer.merge()


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """fp32 and NF4 stage-2 runs of 3 steps on the toy world (checkpoints at steps 2 and 3),
    and the two again in bf16 (frozen weights and compute), as a GPU user runs them."""
    root = tmp_path_factory.mktemp("qlora")
    run(train_cmd("pretrain", "stage2.yaml", world, root / "fp32", *STEPS))
    run(train_cmd("pretrain", "stage2.yaml", world, root / "nf4", *STEPS, NF4))
    for name, extra in (("bf16", ()), ("nf4-bf16", (NF4,))):
        run(train_cmd("pretrain", "stage2.yaml", world, root / name, *STEPS, *BF16, *extra))
    return root


def test_nf4_run_tracks_fp32_and_saves_only_what_trains(runs):
    fp32, nf4 = losses(runs / "fp32"), losses(runs / "nf4")
    assert len(nf4) == len(fp32) == 3
    assert nf4[0] != fp32[0]  # the base really is NF4 ...
    assert abs(nf4[0] - fp32[0]) <= 1e-2 * fp32[0]  # ... and starts where fp32 starts
    assert all(abs(a - b) <= 0.03 * b for a, b in zip(nf4, fp32)), (nf4, fp32)
    # checkpoints hold the trained state only, as without NF4: no frozen weight in them
    keys = [set(FileSystemReader(str(runs / d / "step-3")).read_metadata().state_dict_metadata)
            for d in ("fp32", "nf4")]
    assert keys[0] == keys[1] and not any(k.endswith((".wq.weight", ".w1.weight")) for k in keys[1])


def test_nf4_run_tracks_the_bf16_run(runs):
    """In bf16, as QLoRA is run on GPUs: the NF4 run's losses track the bf16 run's."""
    bf16, nf4 = losses(runs / "bf16"), losses(runs / "nf4-bf16")
    assert len(nf4) == len(bf16) == 3 and nf4[0] != bf16[0]
    assert abs(nf4[0] - bf16[0]) <= 1e-2 * bf16[0]
    assert all(abs(a - b) <= 0.03 * b for a, b in zip(nf4, bf16)), (nf4, bf16)


def test_nf4_adapter_merges_onto_the_unquantized_base(world, runs, tmp_path):
    adapter = load_file(runs / "nf4" / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * 2 + 2 and {t.dtype for t in adapter.values()} == {torch.float32}
    r = subprocess.run([sys.executable, "-m", "model.merge_lora", "--base_model", str(world / "base"),
                        "--lora_model", str(runs / "nf4" / "adapter"), "--output_type", "zhllama",
                        "--output_dir", str(tmp_path / "merged"), "--no_progress"],
                       capture_output=True, text=True, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stderr
    merged, base = read_checkpoint(tmp_path / "merged"), read_checkpoint(world / "base")
    name = "layers.1.feed_forward.w2"
    a, b = adapter[f"{name}.lora_a"], adapter[f"{name}.lora_b"]
    assert b.abs().sum() > 0
    expected = base.get(f"{name}.weight") + (32 / 8) * b @ a  # the weights on disk, not NF4's
    assert torch.allclose(merged.get(f"{name}.weight"), expected, atol=1e-6)
    assert torch.equal(merged.get("output.weight"), adapter["output.weight"])


def test_nf4_on_two_ranks_equals_one(world, runs, tmp_path):
    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "two", *STEPS, NF4,
                  "--optim.micro_batch_size=2", nproc=2))
    one, two = runs / "nf4", tmp_path / "two"
    for key in ("loss", "grad_norm"):
        a, b = losses(one, key), losses(two, key)
        assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (key, a, b)


def test_nf4_run_resumes_bit_for_bit(world, runs, tmp_path):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(runs / "nf4", out, ignore=shutil.ignore_patterns("step-3", "adapter"))
    run(train_cmd("pretrain", "stage2.yaml", world, out, *STEPS, NF4))  # from step 2
    assert losses(out) == losses(runs / "nf4")
    a = load_file(runs / "nf4" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


HIDE_TORCHAO = "import sys; sys.modules['torchao'] = None  # import torchao fails, as if not installed"


@pytest.mark.parametrize("case", ["stage1", "full", "no torchao"])
def test_nf4_refused_where_it_cannot_be(world, tmp_path, case):
    out = tmp_path / "out"
    if case == "no torchao":
        cmd = train_cmd("pretrain", "stage2.yaml", world, out, NF4)
        code = f"{HIDE_TORCHAO}\nfrom train.pretrain import main\nmain(sys.argv[1:])"
        r = subprocess.run([sys.executable, "-c", code, *cmd[2:]], capture_output=True, text=True,
                           cwd=REPO, env=ENV, timeout=120)
        line = one_error(r)
        assert "model.quantize" in line and "zhllama[torchao]" in line, line
    else:
        config = "stage1.yaml" if case == "stage1" else "stage2.yaml"
        extra = ["--stage=full"] if case == "full" else []
        line = one_error(run(train_cmd("pretrain", config, world, out, NF4, *extra), ok=False))
        assert "model.quantize: nf4" in line and "stage lora" in line, line
    assert not out.exists()  # refused before anything was written
