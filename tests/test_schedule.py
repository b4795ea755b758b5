"""The learning-rate schedule and a whole stage-2 run against transformers itself: the
scheduler functions step for step, the Trainer's warmup rounding, and the loss trajectory of
a 20-step LoRA run against the Trainer + peft on the same model, blocks and initial LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import hf_lrs, losses, metrics, run, train_cmd
from train.config import OptimConfig
from train.optim import lr_at, warmup_steps

transformers = pytest.importorskip("transformers")

# (warmup_steps, warmup_ratio, max_steps, min_lr_ratio): warmup_steps None means the ratio
SETTINGS = [
    (0, 0.0, 10, 0.0),
    (3, 0.0, 10, 0.0),
    (None, 0.05, 1000, 0.0),
    (None, 0.03, 37, 0.0),  # 1.11 → 2 warmup steps
    (None, 0.07, 100, 0.0),  # 0.07·100 is 7.000000000000001 in floats: the Trainer warms up 8
    (5, 0.0, 50, 0.1),
    (None, 0.05, 200, 0.1),
    (10, 0.0, 10, 0.0),  # all warmup
    (1, 0.0, 1, 0.0),
]
SCHEDULES = ["cosine", "linear", "constant_with_warmup"]
CASES = [(s, schedule) for s in SETTINGS for schedule in SCHEDULES
         if schedule == "cosine" or not s[3]]  # min_lr_ratio is a cosine setting


def hf_warmup(ratio_or_steps: float, max_steps: int) -> int:
    """The Trainer's own rounding. transformers 5.x has no `warmup_ratio`: a float
    `warmup_steps` below 1 is the ratio (`TrainingArguments.get_warmup_steps`)."""
    from transformers import TrainingArguments

    try:
        args = TrainingArguments(output_dir="unused", warmup_ratio=ratio_or_steps, report_to="none")
    except TypeError:
        args = TrainingArguments(output_dir="unused", warmup_steps=ratio_or_steps, report_to="none")
    return args.get_warmup_steps(max_steps)


@pytest.mark.parametrize("setting,schedule", CASES, ids=str)
def test_lr_equals_transformers_schedulers(setting, schedule):
    steps_set, ratio, max_steps, min_lr_ratio = setting
    cfg = OptimConfig(lr=3e-4, schedule=schedule, warmup_steps=steps_set, warmup_ratio=ratio,
                      max_steps=max_steps, min_lr_ratio=min_lr_ratio)
    warmup = warmup_steps(cfg)
    if steps_set is None:
        assert warmup == hf_warmup(ratio, max_steps)
    ours = [lr_at(s, cfg) for s in range(max_steps)]
    theirs = hf_lrs(schedule, cfg.lr, warmup, max_steps, min_lr_ratio)
    assert ours == theirs  # bit for bit: the same float operations in the same order
    if warmup:
        assert ours[0] == 0.0  # the Trainer's first warmup step does not move the weights


@pytest.mark.parametrize("ratio,n", [(0.05, 1000), (0.03, 37), (0.07, 100), (0.05, 7), (0.0, 10),
                                     (0.01, 60), (0.3, 3), (0.999, 5)])
def test_warmup_ratio_rounds_as_the_trainer(ratio, n):
    cfg = OptimConfig(warmup_steps=None, warmup_ratio=ratio, max_steps=n)
    assert warmup_steps(cfg) == hf_warmup(ratio, n)


# ---------------------------------------------------------------------------------------
# a stage-2 run against the Trainer + peft

STEPS, BLOCK, BATCH = 20, 32, 4
# warmup as a ratio: 0.12 · 20 rounds up to 3 on both sides
RUN = [f"--optim.max_steps={STEPS}", f"--data.block_size={BLOCK}", "--data.val_fraction=0",
       "--optim.grad_accum=1", f"--optim.micro_batch_size={BATCH}", "--checkpoint.every=0",
       "--optim.warmup_steps=null", "--optim.warmup_ratio=0.12", "--log.eval_every=0"]


KIND = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
        "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
HF_SAVED = {"tok_embeddings": "embed_tokens", "output": "lm_head"}


def hf_module(ours: str) -> str:
    """'layers.0.attention.wq' → 'model.layers.0.self_attn.q_proj'."""
    from model.formats.hf import canonical_to_hf_name

    return canonical_to_hf_name(ours + ".weight").removesuffix(".weight")


def peft_model(hf_dir: Path, cfg, base):
    """Trainer side: the exported base in fp32 with peft's LoRA as our config has it, and our
    initial A in every lora_A (B is zero in both)."""
    import peft
    from transformers import LlamaForCausalLM

    from train.stages import initial_tensor

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    lc = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                         target_modules=[hf_module(f"layers.0.{KIND[t]}.{t}").rsplit(".", 1)[-1]
                                         for t in cfg.lora.targets],  # q_proj, …, down_proj
                         modules_to_save=[HF_SAVED[m] for m in cfg.lora.modules_to_save],
                         task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lc)
    with torch.no_grad():
        for ours, module in lora_pairs(model, cfg, base.args.n_layers):
            a = module.lora_A["default"].weight
            a.copy_(initial_tensor(ours + ".lora_a", a.shape, base, cfg.seed))
            assert not module.lora_B["default"].weight.any()
    return model


def lora_pairs(model, cfg, n_layers: int):
    """(our module name, peft's LoRA layer) for every target of every block."""
    inner = model.base_model.model
    for i in range(n_layers):
        for t in cfg.lora.targets:
            ours = f"layers.{i}.{KIND[t]}.{t}"
            yield ours, inner.get_submodule(hf_module(ours))


def check_layouts_agree(model, cfg, base, tokens: torch.Tensor) -> None:
    """Zero steps: with the same A and a random B (permuted for q/k as the export permutes
    their rows), our LoRA model and peft's give the same logits; then B is zero again."""
    from model.formats.hf import permute_to_hf
    from model.lora import LoRAConfig, apply_lora
    from model.source import load_model
    from train.stages import initial_tensor

    ours = apply_lora(load_model(base), LoRAConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=0.0,
                                                   targets=cfg.lora.targets))
    heads = {"wq": base.args.n_heads, "wk": base.args.kv_heads}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, theirs in lora_pairs(model, cfg, base.args.n_layers):
            mine = ours.get_submodule(name)
            mine.lora_a.copy_(initial_tensor(name + ".lora_a", mine.lora_a.shape, base, cfg.seed))
            mine.lora_b.copy_(torch.randn(mine.lora_b.shape, generator=g) * 0.05)
            t = name.rsplit(".", 1)[-1]
            b = permute_to_hf(mine.lora_b, heads[t]) if t in heads else mine.lora_b
            theirs.lora_B["default"].weight.copy_(b)
        ours.eval(), model.eval()
        assert torch.allclose(ours(tokens), model(input_ids=tokens).logits, atol=1e-5)
        for _, theirs in lora_pairs(model, cfg, base.args.n_layers):
            theirs.lora_B["default"].weight.zero_()


def trainer_run(model, cfg, blocks: list[torch.Tensor], out: Path) -> dict[str, list]:
    """Train with the Trainer on `blocks` in this order. Per step: the exact loss (the log's
    is rounded), the learning rate the optimizer step used, and the input_ids."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    record: dict[str, list] = {"loss": [], "lr": [], "input_ids": []}

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            record["input_ids"].append(inputs["input_ids"].clone())
            record["lr"].append(self._get_learning_rate())  # the scheduler steps after the optimizer
            loss = super().training_step(model, inputs, num_items_in_batch)
            record["loss"].append(float(loss))  # sum / num_items_in_batch: the step's mean
            return loss

    o = cfg.optim
    args = TrainingArguments(
        output_dir=str(out), learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
        adam_beta2=o.beta2, adam_epsilon=o.eps, max_grad_norm=o.clip_grad_norm, optim="adamw_torch",
        # transformers 5: a float warmup_steps below 1 is the ratio (see hf_warmup)
        lr_scheduler_type=o.schedule, warmup_steps=o.warmup_ratio, max_steps=o.max_steps,
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=o.grad_accum, logging_steps=1,
        seed=cfg.seed, report_to="none", dataloader_drop_last=True, remove_unused_columns=False,
        save_strategy="no", use_cpu=True, disable_tqdm=True, fp16=False, bf16=False)
    # HF shifts labels inside the loss: labels are the tokens themselves
    data = [{"input_ids": b, "labels": b.clone()} for b in blocks]
    trainer = InOrder(model=model, args=args, train_dataset=data)
    trainer.train()
    # the decay groups: every trainable tensor (LoRA factors, embeddings, lm_head) decays
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] == o.weight_decay
               for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters() if p.requires_grad}
    return record


def test_stage2_losses_equal_trainer_with_peft(world, tmp_path):
    pytest.importorskip("peft")
    from data.datasets import PackedBlocks
    from model.formats import read_checkpoint, write_hf
    from model.lora import LoRAConfig, apply_lora, mark_trainable
    from model.source import load_model
    from train.config import load_config
    from train.optim import param_groups

    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "ours", *RUN))
    ours = losses(tmp_path / "ours")
    cfg = load_config(tmp_path / "ours" / "config.yaml")
    assert len(ours) == STEPS and cfg.lora.dropout == 0 and cfg.parallel.precision == "fp32"
    assert warmup_steps(cfg.optim) == 3 and cfg.optim.schedule == "cosine"

    # our decay groups: with LoRA + embeddings every trainable tensor is 2-D, so all decay
    lc = LoRAConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, targets=cfg.lora.targets,
                    modules_to_save=cfg.lora.modules_to_save)
    base = read_checkpoint(world / "base")
    mine = apply_lora(load_model(base), lc)
    mark_trainable(mine, lc.modules_to_save)
    groups = param_groups(mine, cfg.optim.weight_decay)
    assert [g["weight_decay"] for g in groups] == [cfg.optim.weight_decay]

    # the blocks our run drew: rank 0 of 1, seed, consecutive batches of micro_batch_size
    data = PackedBlocks(world / "tokens", block_size=BLOCK, split="train", val_fraction=0.0,
                        seed=cfg.seed, rank=0, world_size=1)
    it = data.batches(BATCH)
    batches = [next(it) for _ in range(STEPS)]
    for b in batches:  # our labels are pre-shifted, the last position ignored
        assert torch.equal(b["labels"][:, :-1], b["tokens"][:, 1:]) and (b["labels"][:, -1] == -100).all()
    blocks = [row for b in batches for row in b["tokens"]]

    write_hf(base, tmp_path / "hf", progress=False)
    model = peft_model(tmp_path / "hf", cfg, base)
    check_layouts_agree(model, cfg, base, batches[0]["tokens"])
    hf = trainer_run(model, cfg, blocks, tmp_path / "trainer")

    seen = hf["input_ids"]
    assert len(seen) == STEPS and all(torch.equal(s, b["tokens"]) for s, b in zip(seen, batches))
    assert [r["lr"] for r in metrics(tmp_path / "ours")] == hf["lr"]  # the schedule, bit for bit
    theirs = hf["loss"]
    diff = max(abs(a - b) for a, b in zip(ours, theirs))
    assert len(theirs) == STEPS and diff <= 1e-4, (diff, ours, theirs)  # measured: 9.4e-7
    assert ours[-1] < ours[0]  # it learns, so the comparison says something
