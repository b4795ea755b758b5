"""YAML configs: typed, strict, overridable; every shipped config parses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from train.config import ConfigError, dump, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    again = tmp_path / "resolved.yaml"
    again.write_text(dump(cfg))
    assert load_config(again) == cfg


def test_overrides_and_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: m}\ndata: {path: d}\noptim: {lr: 1.0e-4}\n")
    cfg = load_config(f, ["--optim.lr=3e-4", "--lora.targets=q_proj,v_proj", "--parallel.compile=true"])
    assert cfg.optim.lr == 3e-4 and cfg.lora.targets == ("q_proj", "v_proj") and cfg.parallel.compile
    bad = [
        (["--optim.lrr=1"], "optim.lrr: unknown key"),
        (["--optim.max_steps=1.5"], "optim.max_steps: expected an integer"),
        (["--parallel.precision=fp8"], "parallel.precision: 'fp8' is not one of"),
        (["--stage=pretrain"], "stage: 'pretrain' is not one of"),
        (["--optim.lr=fast"], "optim.lr: expected a number"),
        (["--nonsense.key=1"], "nonsense: unknown key"),
        (["optim.lr=1"], "expected --section.key=value"),
        (["--optim.micro_batch_size=0"], "optim.micro_batch_size: must be positive"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_config(f, overrides)
    f.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(f)


def test_data_sources_and_val_sets(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: m}\n"
                 "data:\n  sources: [{path: tokens/zh, weight: 4}, {path: tokens/en, weight: 1, name: replay}]\n"
                 "  val_sets: {zh: val/zh, en: val/en}\n")
    cfg = load_config(f)
    assert [(s.path, s.weight, s.label) for s in cfg.data.sources] == [("tokens/zh", 4.0, "zh"),
                                                                       ("tokens/en", 1.0, "replay")]
    assert cfg.data.val_sets == {"zh": "val/zh", "en": "val/en"} and cfg.data.primary_path() == "tokens/zh"
    again = tmp_path / "resolved.yaml"
    again.write_text(dump(cfg))
    assert load_config(again) == cfg
    assert load_config(None, ["--model.path=m", "--data.path=d"]).data.primary_path() == "d"
    bad = [
        (["--data.sources=[{path: a, weight: 0.8}, {path: b, weight: 0}]"], "data.sources[1].weight: must be positive"),
        (["--data.sources=[{path: a, weight: -1}]"], "data.sources[0].weight: must be positive"),
        (["--data.sources=[{path: a}, {path: b, weight: lots}]"], "data.sources[1].weight: expected a number"),
        (["--data.sources=[{path: a}, {paht: b}]"], "data.sources[1].paht: unknown key"),
        (["--data.sources=[{path: a}, b]"], "data.sources[1]: expected a mapping"),
        (["--data.sources=[{weight: 1}]"], "data.sources[0].path: required"),
        (["--data.sources=tokens/zh"], "data.sources: expected a list of mappings"),
        (["--data.sources=[{path: x/zh}, {path: y/zh}]"], "data.sources[1].path: the name 'zh' is data.sources[0]'s"),
        (["--data.sources=[{path: a, name: a/b}]"], "data.sources[0].name: 'a/b' cannot name"),
        (["--data.path=d", "--data.sources=[{path: a}]"], "data.sources: set with data.path too"),
        (["--data.path="], "data.path: required"),
        (["--data.path=d", "--data.val_sets=[a, b]"], "data.val_sets: expected a mapping"),
        (["--data.path=d", "--data.val_sets={zh: 3}"], "data.val_sets.zh: expected a string"),
        (["--data.path=d", "--data.val_sets={zh: ''}"], "data.val_sets.zh: required"),
        (["--data.sources=[{path: tokens/zh}]", "--data.val_sets={zh: v}", "--data.val_fraction=0.01"],
         "data.val_sets.zh: the name 'zh' is data.sources[0]'s already"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(f, ["--data.sources=[]", "--data.val_sets={}", *overrides])


# The published recipe, written out from Chinese-LLaMA-Alpaca's scripts/training/run_pt.sh
# and run_sft.sh (lr, warmup, decay, LoRA, block / sequence length), its wiki's "Training
# Details" (global batch 1,024 for pre-training, 512 for SFT; lr 2e-4 for stage 1, 1e-4 for
# the 7B stage 2 and SFT) and transformers' TrainingArguments defaults (betas, eps, grad norm,
# cosine to 0), which those scripts do not override.
PUBLISHED = {
    "llama-7b-stage1.yaml": dict(stage="embeddings", lr=2e-4, warmup_ratio=0.05, weight_decay=0.01,
                                 batch=1024, length=512),
    "llama-7b-stage2.yaml": dict(stage="lora", lr=1e-4, warmup_ratio=0.05, weight_decay=0.01,
                                 batch=1024, length=512),
    "llama-7b-sft.yaml": dict(stage="lora", lr=1e-4, warmup_ratio=0.03, weight_decay=0.0,
                              batch=512, length=512),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_7b_configs_carry_the_published_recipe(name):
    from transformers import TrainingArguments

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    want = PUBLISHED[name]
    trainer = TrainingArguments(output_dir="unused", report_to=[])
    o = cfg.optim
    assert cfg.stage == want["stage"] and o.lr == want["lr"] and o.weight_decay == want["weight_decay"]
    assert o.warmup_ratio == want["warmup_ratio"] and o.warmup_steps is None
    assert o.schedule == "cosine" and o.min_lr_ratio == 0.0
    assert (o.beta1, o.beta2, o.eps) == (trainer.adam_beta1, trainer.adam_beta2, trainer.adam_epsilon)
    assert o.clip_grad_norm == trainer.max_grad_norm
    assert 8 * o.micro_batch_size * o.grad_accum == want["batch"]  # on the 8 GPUs the comment names
    length = cfg.data.block_size if name != "llama-7b-sft.yaml" else cfg.data.max_seq_length
    assert length == want["length"]
    if cfg.stage == "lora":
        assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 32, 0.05)
        assert set(cfg.lora.targets) == {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
        assert set(cfg.lora.modules_to_save) == {"tok_embeddings", "output"}


def test_the_start_summary_names_every_memory_lever():
    """The opening block says which levers a run uses, read back from the config."""
    import torch

    from train.distributed import DistInfo
    from train.summary import memory_line

    cfg = load_config(None, ["--model.path=m", "--data.path=d", "--model.quantize=nf4",
                             "--parallel.activation_checkpointing=selective", "--parallel.selective_every=3",
                             "--parallel.activation_offload=true", "--parallel.compile=true",
                             "--parallel.loss_chunk_size=0", "--parallel.replicate=2"])
    dist = DistInfo(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"), mesh=None)
    assert memory_line(cfg, dist) == (
        "precision bf16, frozen base weights nf4, activation checkpointing selective (every 3), "
        "offloaded to the CPU, whole-batch loss, compiled blocks, world size 4 (2 replicas x 2 shards)")


def test_the_start_summary_says_how_packed_documents_attend():
    """Packed SFT rows and document-masked blocks: the summary names the attention path the
    run takes on its device (model.packed_attention, "auto" resolved); plain rows say nothing."""
    import torch

    from train.distributed import DistInfo
    from train.summary import documents_phrase

    def phrase(device: str, *overrides: str) -> str:
        cfg = load_config(None, ["--model.path=m", "--data.path=d", *overrides])
        return documents_phrase(cfg, DistInfo(rank=0, world_size=1, local_rank=0,
                                              device=torch.device(device), mesh=None))

    assert phrase("cpu") == ""
    assert phrase("cpu", "--data.pack=true") == "; attention inside each document (SDPA, dense mask)"
    assert phrase("cuda", "--data.document_mask=true") == "; attention inside each document (flex attention, block mask)"
    assert phrase("cuda", "--data.pack=true", "--model.packed_attention=varlen") == (
        "; attention inside each document (varlen flash attention)")
    assert phrase("cuda", "--data.pack=true", "--model.packed_attention=sdpa").endswith("(SDPA, dense mask)")
