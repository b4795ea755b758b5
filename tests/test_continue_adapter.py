"""Continuing an existing adapter (`lora.init_from`): ours, and PEFT's in the published
Chinese-Alpaca layout (adapter_model.bin, embeddings of a grown vocabulary over a smaller
base). The first step's loss must be the loss of the adapter as peft (or our merge) sees
it, and training must go on from there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import ENV, FAST, losses, one_error, run, train_cmd

GROWN = 8  # the adapter's vocabulary has this many rows more than the base (49,954 vs 32,000)


def first_batch(world):
    from data.datasets import PackedBlocks

    return next(PackedBlocks(world / "tokens", block_size=32, seed=0).batches(4))


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy over target positions; labels[:, j] is the token after position j."""
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                   ignore_index=-100))


def with_base(cmd: list[str], base) -> list[str]:
    return [c if not c.startswith("--model.path=") else f"--model.path={base}" for c in cmd]


@pytest.fixture(scope="module")
def peft_adapter(world, tmp_path_factory):
    """A PEFT LoRA adapter as Chinese-Alpaca ships one, over a base GROWN rows smaller."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from model.convert import convert
    from model.formats import read_checkpoint, write_model_dir
    from model.source import from_state_dict

    root = tmp_path_factory.mktemp("peft")
    convert(world / "base", root / "hf", "hf", progress=False)
    model = LlamaForCausalLM.from_pretrained(root / "hf", torch_dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"],
                        modules_to_save=["embed_tokens", "lm_head"])
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained adapter: B non-zero, embeddings moved
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(root / "adapter", safe_serialization=False)
    assert (root / "adapter" / "adapter_model.bin").exists()
    shutil.copy(world / "tokenizer.model", root / "adapter" / "tokenizer.model")
    # the smaller base: the first rows of the embeddings and output (LLaMA's 32,000)
    base = read_checkpoint(world / "base")
    state = {n: base.get(n) for n in base.specs}
    for n in ("tok_embeddings.weight", "output.weight"):
        state[n] = state[n][:-GROWN].clone()
    args = base.args.replace(vocab_size=base.args.vocab_size - GROWN)
    write_model_dir(from_state_dict(state, args), root / "small", progress=False)
    return root, peft_model.eval()


def test_continuing_a_peft_adapter_starts_at_peft_s_loss(world, peft_adapter, tmp_path):
    root, peft_model = peft_adapter
    batch = first_batch(world)
    with torch.no_grad():
        expected = token_loss(peft_model(input_ids=batch["tokens"]).logits, batch["labels"])
    out = tmp_path / "run"
    cmd = with_base(train_cmd("pretrain", "stage2.yaml", world, out, *FAST, "--optim.max_steps=3",
                              "--optim.grad_accum=1", "--optim.micro_batch_size=4",
                              f"--lora.init_from={root / 'adapter'}", "--lora.r=null",
                              "--lora.alpha=null", "--lora.modules_to_save=null"), root / "small")
    run(cmd)
    got = losses(out)
    assert abs(got[0] - expected) <= 1e-5, (got[0], expected)
    assert got[-1] != got[0]  # it trains on
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["alpha"]) == (4, 16.0)
    assert saved["base_vocab_size"] == peft_model.config.vocab_size - GROWN
    assert saved["vocab_size"] == peft_model.config.vocab_size
    # and what it saved merges onto the smaller base
    r = subprocess.run([sys.executable, "-m", "model.merge_lora", "--base_model", str(root / "small"),
                        "--lora_model", str(out / "adapter"), "--output_type", "zhllama",
                        "--output_dir", str(tmp_path / "merged"), "--no_progress"],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]


def test_continuing_our_adapter_starts_where_it_ended(world, tmp_path):
    from model.adapters import merge_adapter, read_adapter_weights
    from model.formats import read_checkpoint
    from model.source import load_model

    first = tmp_path / "first"
    run(train_cmd("pretrain", "stage2.yaml", world, first, *FAST, "--optim.max_steps=3",
                  "--lora.r=4", "--lora.alpha=8", "--optim.lr=1e-2"))
    base = read_checkpoint(world / "base")
    adapter = read_adapter_weights(first / "adapter", base.args.n_heads, base.args.kv_heads)
    merged = load_model(merge_adapter(base, adapter))
    batch = first_batch(world)
    with torch.no_grad():
        expected = token_loss(merged(batch["tokens"]), batch["labels"])
    second = tmp_path / "second"
    run(train_cmd("pretrain", "stage2.yaml", world, second, *FAST, "--optim.max_steps=2",
                  "--optim.grad_accum=1", "--optim.micro_batch_size=4", "--lora.r=null",
                  "--lora.alpha=null", f"--lora.init_from={first / 'adapter'}"))
    assert abs(losses(second)[0] - expected) <= 1e-5


def test_a_config_that_contradicts_the_adapter_is_refused(world, peft_adapter, tmp_path):
    root, _ = peft_adapter
    cmd = with_base(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "run", *FAST,
                              "--optim.max_steps=2", f"--lora.init_from={root / 'adapter'}",
                              "--lora.r=16", "--lora.alpha=null", "--lora.modules_to_save=null"),
                    root / "small")
    line = one_error(run(cmd, ok=False))
    assert "lora.r: the config says 16" in line and "has 4" in line and str(root / "adapter") in line
    assert not (tmp_path / "run" / "adapter").exists()
