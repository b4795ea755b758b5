"""Training end to end, in real processes: torchrun with 2 ranks vs 1, a killed run
resumed bit for bit, what each stage may change, the SFT loss."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file

from model.formats import read_checkpoint
from model.source import load_model
from tests.helpers import hf_lrs, losses, metrics, run, train_cmd


def close(a: list[float], b: list[float], tol: float) -> bool:
    return len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) <= tol


def test_two_ranks_equal_one_and_checkpointing_changes_nothing(world, tmp_path):
    common = ["--optim.max_steps=4", "--data.val_fraction=0", "--checkpoint.every=0",
              "--data.block_size=32", "--optim.grad_accum=2", "--optim.warmup_steps=0"]
    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "one", *common,
                  "--optim.micro_batch_size=4"))
    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "two", *common,
                  "--optim.micro_batch_size=2", nproc=2))
    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "noac", *common,
                  "--optim.micro_batch_size=4", "--parallel.activation_checkpointing=none"))
    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "sel", *common,
                  "--optim.micro_batch_size=4", "--parallel.activation_checkpointing=selective"))
    one, two, noac, sel = (losses(tmp_path / d) for d in ("one", "two", "noac", "sel"))
    assert len(one) == 4
    assert close(one, two, 1e-5), (one, two)
    # Adam and clipping hide a constant error in the loss's scale; the gradient norm does not
    assert close(losses(tmp_path / "one", "grad_norm"), losses(tmp_path / "two", "grad_norm"), 1e-5)
    assert close(one, noac, 1e-6) and close(one, sel, 1e-6), (one, noac, sel)
    assert one[-1] < one[0]  # and it learns


def test_sft_on_two_ranks_equals_one(world, tmp_path):
    """Samples of different lengths: each rank holds a different number of target tokens,
    so only a loss divided by the global count gives one process's gradient."""
    common = ["--optim.max_steps=3", "--checkpoint.every=0", "--optim.grad_accum=2"]
    run(train_cmd("sft", "sft.yaml", world, tmp_path / "one", *common, "--optim.micro_batch_size=4"))
    run(train_cmd("sft", "sft.yaml", world, tmp_path / "two", *common, "--optim.micro_batch_size=2",
                  nproc=2))
    assert close(losses(tmp_path / "one"), losses(tmp_path / "two"), 1e-5)
    assert close(losses(tmp_path / "one", "grad_norm"), losses(tmp_path / "two", "grad_norm"), 1e-5)


def test_killed_run_resumes_bit_for_bit(world, tmp_path):
    # dropout on: the resumed run must also restore the random number generators
    common = ["--optim.max_steps=16", "--checkpoint.every=4", "--data.block_size=32",
              "--log.eval_every=0", "--lora.dropout=0.2"]
    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "straight", *common))
    cmd = train_cmd("pretrain", "stage2.yaml", world, tmp_path / "killed", *common)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "step-8" / "meta.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 8"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter").exists()
    (tmp_path / "killed" / ".step-10.tmp").mkdir()  # as if killed while writing step 10
    run(cmd)  # started again on the same output_dir: resumes by itself
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "killed")
    kept = sorted(p.name for p in (tmp_path / "killed").glob("step-*"))
    assert kept == ["step-12", "step-16"]  # keep_last 2
    assert not list((tmp_path / "killed").glob(".step-*"))
    from train.config import load_config

    saved = load_config(tmp_path / "killed" / "step-16" / "config.yaml")
    assert saved.lora.dropout == 0.2 and saved.optim.max_steps == 16
    meta = json.loads((tmp_path / "killed" / "step-16" / "meta.json").read_text())
    assert meta["step"] == 16 and meta["world_size"] == 1


def test_stage1_changes_only_embeddings_and_new_rows(world, tmp_path):
    base = read_checkpoint(world / "base")
    run(train_cmd("pretrain", "stage1.yaml", world, tmp_path / "all", "--optim.max_steps=3",
                  "--data.block_size=32"))
    run(train_cmd("pretrain", "stage1.yaml", world, tmp_path / "new", "--optim.max_steps=3",
                  "--data.block_size=32", "--model.new_rows_from=400"))
    for name, new_only in (("all", False), ("new", True)):
        after = read_checkpoint(tmp_path / name / "model")
        for t in base.specs:
            before, now = base.get(t), after.get(t)
            if t in ("tok_embeddings.weight", "output.weight"):
                assert not torch.equal(before, now), t
                if new_only:
                    assert torch.equal(before[:400], now[:400]) and not torch.equal(before[400:], now[400:])
            else:
                assert torch.equal(before, now), t


def test_stage2_starts_at_the_base_loss_and_its_adapter_merges(world, tmp_path):
    from data.datasets import PackedBlocks
    from model.lora import read_adapter

    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "s2", "--optim.max_steps=3",
                  "--data.block_size=32", "--data.val_fraction=0", "--optim.grad_accum=1"))
    model = load_model(read_checkpoint(world / "base"))
    batch = next(PackedBlocks(world / "tokens", block_size=32, seed=0).batches(4))
    with torch.no_grad():
        loss = model.loss(batch["tokens"], batch["labels"]) / (batch["labels"] != -100).sum()
    assert abs(losses(tmp_path / "s2")[0] - float(loss)) < 1e-6
    config, meta, tensors = read_adapter(tmp_path / "s2" / "adapter")
    assert meta["base_vocab_size"] == model.args.vocab_size and len(tensors) == 2 * 7 * 2 + 2
    r = subprocess.run([sys.executable, "-m", "model.merge_lora", "--base_model", str(world / "base"),
                        "--lora_model", str(tmp_path / "s2" / "adapter"), "--output_type", "zhllama",
                        "--output_dir", str(tmp_path / "merged"), "--no_progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    merged = read_checkpoint(tmp_path / "merged")
    w = model.state_dict()["layers.1.feed_forward.w2.weight"]
    a, b = tensors["layers.1.feed_forward.w2.lora_a"], tensors["layers.1.feed_forward.w2.lora_b"]
    assert b.abs().sum() > 0
    expected = w + (config.alpha / config.r) * b @ a
    assert torch.allclose(merged.get("layers.1.feed_forward.w2.weight"), expected, atol=1e-6)
    assert torch.equal(merged.get("output.weight"), tensors["output.weight"])


def test_sft_loss_counts_only_response_tokens(world, tmp_path):
    from data.datasets import SFTDataset
    from tokenizer.templates import format_prompt

    run(train_cmd("sft", "sft.yaml", world, tmp_path / "sft", "--optim.max_steps=2",
                  "--optim.micro_batch_size=3"))
    data = SFTDataset(world / "sft", seed=0)
    ids = [data._next() for _ in range(3)]  # the samples of the first batch, in its order
    records = json.loads((world / "sft.json").read_text(encoding="utf-8"))
    sp = spm.SentencePieceProcessor(model_file=str(world / "tokenizer.model"))
    model = load_model(read_checkpoint(world / "base"))
    # by hand: the prompt is BOS + the template's text; the loss is the log-probability of
    # every later token (the response and EOS), predicted from the position before it
    total, count = 0.0, 0
    for i in ids:
        tokens, _ = data.sample(i)
        prompt = [sp.bos_id()] + sp.encode(format_prompt("cla_v1", records[i]["instruction"]))
        response = sp.encode(records[i]["output"]) + [sp.eos_id()]
        assert tokens.tolist() == prompt + response
        with torch.no_grad():
            logp = model(torch.as_tensor(tokens[None].astype("int64")))[0].log_softmax(-1)
        for j in range(len(prompt), len(tokens)):
            total -= float(logp[j - 1, int(tokens[j])])
            count += 1
    assert abs(losses(tmp_path / "sft")[0] - total / count) < 1e-5
    assert (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").exists()


def test_metrics_and_evaluation(world, tmp_path):
    done = run(train_cmd("sft", "sft.yaml", world, tmp_path / "sft", "--optim.max_steps=4",
                         "--optim.warmup_steps=2", "--optim.lr=0.01", "--data.val_fraction=0.1",
                         "--log.eval_every=2", "--log.eval_batches=100", "--log.peak_tflops=1"))
    rows = metrics(tmp_path / "sft")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert set(train_rows[0]) == {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s",
                                  "memory_gb", "skipped_steps", "mfu"}
    # the target tokens trained on so far: the response tokens of the samples read
    assert 0 < train_rows[0]["tokens"] < train_rows[1]["tokens"] < train_rows[-1]["tokens"]
    # the rate each step trained with: transformers' own schedule (warmup from 0, cosine to 0)
    expected = hf_lrs("cosine", 0.01, warmup=2, max_steps=4, min_lr_ratio=0.0)
    assert [r["lr"] for r in train_rows] == pytest.approx(expected, rel=1e-12)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) and 0 <= r["val_acc"] <= 1
    # the final evaluation by hand: the held-out samples (the last 10%), under the trained adapter
    from data.datasets import SFTDataset
    from model.lora import load_adapter

    val = SFTDataset(world / "sft", split="val", val_fraction=0.1)
    assert len(val) == 12 and not set(val.ids) & set(SFTDataset(world / "sft", val_fraction=0.1).ids)
    model = load_model(read_checkpoint(world / "base"))
    load_adapter(model, tmp_path / "sft" / "adapter")
    model.eval()
    total = right = count = chars = nbytes = 0
    sp = spm.SentencePieceProcessor(model_file=str(world / "tokenizer.model"))
    for i in val.ids:
        tokens, plen = val.sample(int(i))
        response = sp.decode(tokens[plen:].tolist())  # the text the scored tokens stand for
        chars, nbytes = chars + len(response), nbytes + len(response.encode("utf-8"))
        with torch.no_grad():
            logits = model(torch.as_tensor(tokens[None].astype("int64")))[0]
        targets = torch.as_tensor(tokens[plen:].astype("int64"))
        total -= float(logits[plen - 1 : -1].log_softmax(-1).gather(1, targets[:, None]).sum())
        right += int((logits[plen - 1 : -1].argmax(-1) == targets).sum())
        count += len(targets)
    assert evals[-1]["val_loss"] == pytest.approx(total / count, abs=1e-5)
    assert evals[-1]["val_acc"] == pytest.approx(right / count)
    # bits per character and byte: the same summed NLL in bits over the decoded responses
    assert evals[-1]["val_bpc"] == pytest.approx(total / math.log(2) / chars, abs=1e-5)
    assert evals[-1]["val_bpb"] == pytest.approx(total / math.log(2) / nbytes, abs=1e-5)
    # the summaries: what the run is at the start, what it did at the end
    adapter = load_file(next((tmp_path / "sft" / "adapter").glob("*.safetensors")))
    base = load_file(world / "base" / "model.safetensors")
    trainable = sum(t.numel() for t in adapter.values())  # LoRA and the modules saved whole
    total_params = sum(t.numel() for t in base.values()) + sum(
        t.numel() for k, t in adapter.items() if "lora" in k)
    assert f"stage lora: {total_params:,} parameters, {trainable:,} trainable" in done.stdout
    assert "data: " in done.stdout and f"batch: 4 rows x 1 accumulation x 1 rank(s) = 4 rows per step" in done.stdout
    assert f"steps: 4 = {4 * 4 / 108:.2f} epochs" in done.stdout  # 108 training samples
    # the optimizer as built (foreach on the CPU) and the config's rates and levers
    assert ("optimizer: AdamW (foreach), lr 0.01, cosine with 2 warmup steps, weight decay 0, "
            "clip 1\n") in done.stdout
    assert ("precision fp32, activation checkpointing none, loss chunks of 64 tokens, world size 1\n"
            in done.stdout)
    assert "trained 4 steps in" in done.stdout
    assert f"best: val_loss {min(e['val_loss'] for e in evals):.4f}" in done.stdout


def test_epochs_set_the_number_of_steps(world, tmp_path):
    """optim.epochs: steps to read the training samples that many times, rounded up."""
    r = run(train_cmd("sft", "sft.yaml", world, tmp_path / "sft", "--optim.epochs=0.5",
                      "--optim.warmup_steps=1", "--data.val_fraction=0.1", "--checkpoint.every=0"))
    steps = math.ceil(0.5 * 108 / 4)  # 120 samples, 12 held out; 4 per step
    assert [m["step"] for m in metrics(tmp_path / "sft") if "loss" in m][-1] == steps
    assert f"steps: {steps} (optim.epochs 0.5) = 0.52 epochs" in r.stdout


def test_non_finite_losses_stop_with_the_last_good_checkpoint(world, tmp_path):
    out = tmp_path / "nan"
    cmd = train_cmd("pretrain", "stage2.yaml", world, out, "--optim.max_steps=12",
                    "--optim.lr=1e8", "--optim.warmup_steps=0", "--optim.clip_grad_norm=null",
                    "--log.max_bad_steps=2", "--checkpoint.every=1", "--checkpoint.keep_last=1",
                    "--data.block_size=32", "--log.eval_every=0")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "2 non-finite losses in a row" in r.stderr and "Lower the learning rate" in r.stderr
    rows = [m for m in metrics(out) if "loss" in m]
    first_bad = next(m["step"] for m in rows if not math.isfinite(m["loss"]))
    good = sorted(int(p.name.split("-")[1]) for p in out.glob("step-*") if p.is_dir() and "." not in p.name)
    # what is left to resume from was followed by a finite loss; newer steps are set aside
    # step-k holds the weights after k updates; the loss of step k + 1 is the first they give
    assert good == [first_bad - 2] and f"step-{first_bad - 2} " in r.stderr
    assert (out / f"step-{first_bad - 1}.nonfinite" / "meta.json").exists()
    assert rows[-1]["skipped_steps"] == 2 and rows[-1]["step"] == first_bad + 1


def test_fp16_and_bf16_follow_fp32_with_fp32_trained_weights(world, tmp_path):
    common = ["--optim.max_steps=4", "--checkpoint.every=0", "--data.block_size=32",
              "--log.eval_every=0"]
    for precision in ("fp32", "fp16", "bf16"):
        run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / precision, *common,
                      f"--parallel.precision={precision}"))
    reference = losses(tmp_path / "fp32")
    for precision in ("fp16", "bf16"):
        assert close(losses(tmp_path / precision), reference, 5e-3), precision
        assert losses(tmp_path / precision, "skipped_steps")[-1] == 0
        adapter = load_file(tmp_path / precision / "adapter" / "adapter_model.safetensors")
        assert {t.dtype for t in adapter.values()} == {torch.float32}  # master weights, not fp16
