"""The optimizer step's maths in one process (a process group of one, FSDP2 over it)."""

from __future__ import annotations

import copy

import pytest
import torch

from model.formats import write_model_dir
from model.llama import named_args
from model.source import from_state_dict
from tests.conftest import random_model
from train.config import load_config
from train.distributed import setup
from train.optim import LossScaler
from train.stages import build_for_stage
from train.trainer import step_options, train_step


@pytest.fixture(scope="module")
def dist():
    return setup("gloo")


@pytest.fixture
def model_dir(tmp_path):
    model = random_model(named_args("tiny"))
    return write_model_dir(from_state_dict(model.state_dict(), model.args), tmp_path / "base",
                           progress=False)


def config(model_dir, **overrides):
    args = [f"--{k}={v}" for k, v in {"model.path": model_dir, "data.path": "unused",
                                       "parallel.precision": "fp32", "optim.clip_grad_norm": "null",
                                       "lora.dropout": 0.0, **overrides}.items()]
    return load_config(None, args)


def grads(model):
    return {n: p.grad.full_tensor().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_uneven_micro_batches_give_the_gradient_of_one_batch(dist, model_dir):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (4, 24), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    for i, keep in enumerate([23, 3, 15, 0]):  # uneven target counts (one micro-batch has none)
        labels[i, keep:] = -100
    cfg = config(model_dir, stage="full")
    one = build_for_stage(cfg, dist)
    four = build_for_stage(cfg, dist)
    params_one = [p for p in one.model.parameters() if p.requires_grad]
    params_four = [p for p in four.model.parameters() if p.requires_grad]
    loss1, _, n1 = train_step(one.model, [{"tokens": tokens, "labels": labels}], params_one,
                              step_options(cfg, one), dist, LossScaler(False))
    micro = [{"tokens": tokens[i : i + 1], "labels": labels[i : i + 1]} for i in range(4)]
    loss4, _, n4 = train_step(four.model, micro, params_four, step_options(cfg, four), dist,
                              LossScaler(False))
    assert n1 == n4 == 23 + 3 + 15 and abs(loss1 - loss4) < 1e-6
    g1, g4 = grads(one.model), grads(four.model)
    assert g1.keys() == g4.keys()
    for name in g1:
        assert torch.allclose(g1[name], g4[name], atol=1e-6, rtol=1e-5), name


def test_lora_stage_starts_at_the_base_loss_and_trains_only_lora(dist, model_dir):
    tokens = torch.randint(0, 512, (2, 16))
    labels = torch.roll(tokens, -1, dims=1)
    cfg = config(model_dir, stage="lora", **{"parallel.activation_checkpointing": "full",
                                              "lora.modules_to_save": "[]"})
    built = build_for_stage(cfg, dist)
    full = build_for_stage(config(model_dir, stage="full"), dist)
    with torch.no_grad():
        assert torch.equal(built.model.loss(tokens, labels), full.model.loss(tokens, labels))
    params = [p for p in built.model.parameters() if p.requires_grad]
    train_step(built.model, [{"tokens": tokens, "labels": labels}], params, step_options(cfg, built),
               dist, LossScaler(False))
    trained = grads(built.model)
    # frozen embeddings + checkpointed blocks: LoRA still gets gradients (B's, since B = 0 → A's are 0)
    assert trained and all(n.endswith(("lora_a", "lora_b")) for n in trained)
    assert any(g.abs().sum() > 0 for n, g in trained.items() if n.endswith("lora_b"))
