"""The memory planner (train/plan.py): its predictions against the measured peak of the real
step, its counts of parameters and state against transformers' and PEFT's models of the
named sizes, its advice applied, and its refusals.

The planner runs here, in the test process: it makes a fake process group of its own, so
no test before it may leave one behind (none does; tests/test_train_step.py, which keeps
one, runs after this file).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from model.formats import write_model_dir
from model.llama import named_args
from model.source import from_state_dict
from tests.conftest import random_model
from tests.helpers import REPO
from train.plan import GIB, PlanOptions, main, run_plan

STAGE2 = REPO / "configs" / "llama-7b-stage2.yaml"

# The published Hugging Face configs (config.json) of the named sizes.
HF_CONFIGS = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "llama-33b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52),
    "llama-65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8),
}
VOCABS = (32000, 49953, 49954, 55296)  # LLaMA's; Chinese-LLaMA's; Chinese-Alpaca's; the Plus models'


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A model small enough to train a step of on the CPU, wide enough that its
    activations, vocabulary and state are each megabytes."""
    model = random_model(named_args("tiny", dim=256, n_layers=4, n_heads=4, vocab_size=8000, max_seq_len=512))
    return write_model_dir(from_state_dict(model.state_dict(), model.args),
                           tmp_path_factory.mktemp("plan") / "base", progress=False)


def write_config(path: Path, model_dir: Path | str, **sections) -> Path:
    data = {"stage": "lora", "model": {"path": str(model_dir)}, "data": {"path": str(path.parent / "tokens")}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(data))
    return path


# Stage 2 as QLoRA (NF4 base, LoRA + embeddings, bf16, checkpointed, accumulating), stage 1
# (new rows only, nothing checkpointed), full training checkpointed, and LoRA with per-op
# checkpointing on document-masked blocks.
SMALL = {
    "qlora-full-bf16": dict(stage="lora", model={"dtype": "bfloat16", "quantize": "nf4"},
                            optim={"micro_batch_size": 4, "grad_accum": 2},
                            parallel={"precision": "bf16", "activation_checkpointing": "full",
                                      "loss_chunk_size": 512}),
    "embeddings-none": dict(stage="embeddings", model={"new_rows_from": 4000}, optim={"micro_batch_size": 4},
                            parallel={"precision": "fp32", "loss_chunk_size": 256}),
    "full-checkpointed": dict(stage="full", optim={"micro_batch_size": 2},
                              parallel={"precision": "fp32", "activation_checkpointing": "full"}),
    "lora-op-documents": dict(stage="lora", data={"block_size": 256, "document_mask": True},
                              optim={"micro_batch_size": 4}, lora={"dropout": 0.0},
                              parallel={"precision": "fp32", "activation_checkpointing": "op",
                                        "loss_chunk_size": 1024}),
}


@pytest.mark.parametrize("name", SMALL)
def test_plan_is_within_15_percent_of_the_real_step(name, small_model, tmp_path):
    """The CPU plan of a config against the CPU allocator's peak in the real second step
    (trainer.train_step and the optimizer, on the model build_for_stage loads)."""
    sections = dict(SMALL[name])
    sections["data"] = {"block_size": 256, **sections.get("data", {})}
    cfg = write_config(tmp_path / "cfg.yaml", small_model, **sections)
    plan, _, measured, _ = run_plan(PlanOptions(str(cfg), device="cpu", measure=True))
    assert measured > 50 * 2**20, measured  # megabytes of activations and state, not noise
    assert abs(plan.total - measured) <= 0.15 * measured, (plan.total, measured, plan.phases)


def hf_counts(name: str, vocab: int) -> dict[str, int]:
    """Parameters of the size's base, of its embeddings and output layer, and of PEFT's LoRA
    (r 8 on the seven projections), counted on transformers' own model (meta device)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, **HF_CONFIGS[name])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        base = sum(p.numel() for p in model.parameters())
        vocab_rows = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        lora = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    return {"base": base, "vocab": vocab_rows, "lora": lora}


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_stage2_plan_of_every_named_size_counts_what_transformers_and_peft_count(name, capsys):
    """configs/llama-7b-stage2.yaml at each size: bf16 frozen weights, fp32 LoRA and vocabulary
    matrices, their fp32 gradients and AdamW's two moments — per GPU, the whole model on one."""
    vocab = VOCABS[list(HF_CONFIGS).index(name) % len(VOCABS)]
    main([str(STAGE2), "--size", name, "--vocab", str(vocab), "--gpu_memory", "1000GiB", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["args"]["vocab_size"] == vocab and plan["fits"]
    n = hf_counts(name, vocab)
    trained = n["vocab"] + n["lora"]
    optimizer = plan["phases"]["optimizer"]
    for got, want in ((optimizer["parameters"], 2 * (n["base"] - n["vocab"]) + 4 * trained),
                      (optimizer["optimizer state"], 8 * trained), (optimizer["gradients"], 4 * trained)):
        assert abs(got - want) <= 1e-3 * want, (name, got, want)


def test_7b_stage2_table(capsys):
    main([str(STAGE2), "--size", "7b", "--vocab", "49954", "--gpu_memory", "80GiB"])
    table = capsys.readouterr().out
    rows = ("parameters", "gradients", "optimizer state", "activations", "output layer and loss",
            "temporary buffers", "total (peak:", "needed")
    assert all(f"\n  {r}" in table for r in rows), table
    assert "vocab 49,954" in table and "fits" in table and "does not fit" not in table


def test_advice_applied_makes_it_fit():
    """7B stage 2 at vocab 49,954 on a card a GiB short of what it needs: the change the
    plan names, applied, is planned again and fits."""
    plan, _, _, _ = run_plan(PlanOptions(str(STAGE2), size="7b", vocab=49954, gpu_memory=1000 * GIB))
    budget = plan.needed - GIB
    again, tried, _, _ = run_plan(PlanOptions(str(STAGE2), size="7b", vocab=49954, gpu_memory=budget))
    fitting = [t for t in tried if t.fits]
    assert again.needed == plan.needed and len(fitting) == 1, tried
    flags = shlex.split(fitting[0].change.flags)
    nproc = int(flags[flags.index("--nproc") + 1]) if "--nproc" in flags else 1
    overrides = tuple(f for f in flags if f.startswith("--") and "=" in f)
    changed, _, _, _ = run_plan(PlanOptions(str(STAGE2), overrides, nproc=nproc, size="7b", vocab=49954,
                                            gpu_memory=budget))
    assert changed.needed <= budget and changed.needed == fitting[0].needed


@pytest.mark.parametrize("argv, says", [
    (["missing.yaml"], "missing.yaml: no such config file"),
    ([str(STAGE2), "--size", "8b"], "--size: unknown size '8b'"),
    ([str(STAGE2), "--optim.micro_batchsize=2"], "optim.micro_batchsize: unknown key"),
    ([str(STAGE2), "--vocab", "0"], "--vocab"),
    ([str(STAGE2)], "model.path: runs/llama-7b-zh-stage1/model does not exist"),
    ([str(STAGE2), "--size", "7b", "--measure"], "--measure"),
    ([str(STAGE2), "--size", "7b", "--data.block_size=4096"], "data.block_size: 4096 is above the max_seq_len 2048"),
    ([str(STAGE2), "--size", "7b", "--gpu_memory", "lots"], "--gpu_memory"),
    ([str(STAGE2), "--size", "7b", "stray"], "stray"),
])
def test_bad_input_is_one_error_line(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
