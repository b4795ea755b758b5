"""Training end to end, in real processes: torchrun with 2 ranks vs 1, a killed run
resumed bit for bit, what each stage may change, the SFT loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file

from data.toy import chinese_documents, english_documents
from model.checkpoint import from_state_dict, load_model
from model.formats import read_checkpoint, write_model_dir
from model.llama import named_args
from tests.conftest import random_model

REPO = Path(__file__).resolve().parents[1]
TINY = ["--parallel.precision=fp32", "--log.every=1", "--lora.dropout=0.0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A toy tokenizer (with pad), a tiny model, pretraining and SFT data: all from the
    embedded corpus, so these tests need nothing from outside the repository."""
    from tokenizer.merge import add_pad_piece, read_proto
    from tokenizer.train import train

    root = tmp_path_factory.mktemp("world")
    text = root / "corpus.txt"
    docs = english_documents(300) + chinese_documents(300)
    text.write_text("\n".join(docs) + "\n", encoding="utf-8")
    train(SimpleNamespace(input=[str(text)], model_prefix=str(root / "sp"), vocab_size=600,
                          model_type="bpe", character_coverage=1.0, input_sentence_size=0,
                          max_sentence_length=16384, num_threads=1, overwrite=False))
    proto = read_proto(root / "sp.model")
    add_pad_piece(proto)
    (root / "tokenizer.model").write_bytes(proto.SerializeToString())
    vocab = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model")).vocab_size()
    model = random_model(named_args("tiny", vocab_size=vocab), std=0.05)
    write_model_dir(from_state_dict(model.state_dict(), model.args, tokenizer=root / "tokenizer.model"),
                    root / "base", progress=False)
    records = [{"instruction": "续写：" + d[:12], "input": "", "output": d[12:]} for d in docs[300:420]]
    (root / "sft.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    for args in (["--input", str(text), "--output_dir", str(root / "tokens")],
                 ["--sft", "--input", str(root / "sft.json"), "--output_dir", str(root / "sft"),
                  "--max_seq_length", "320"]):
        r = subprocess.run([sys.executable, "-m", "data.prepare", "--tokenizer",
                            str(root / "tokenizer.model"), "--num_workers", "1", *args],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return root


def train_cmd(script: str, config: str, world: Path, out: Path, *extra: str, nproc: int = 1) -> list[str]:
    data = world / ("sft" if script == "sft" else "tokens")
    args = [str(REPO / "configs" / "tiny" / config), f"--model.path={world / 'base'}",
            f"--data.path={data}", f"--output_dir={out}", *TINY, *extra]
    if nproc == 1:
        return [sys.executable, str(REPO / "train" / f"{script}.py"), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", str(REPO / "train" / f"{script}.py"), *args]


def run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


def losses(out: Path) -> list[float]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_two_ranks_equal_one_and_checkpointing_changes_nothing(world, tmp_path):
    common = ["--optim.max_steps=4", "--data.val_fraction=0", "--checkpoint.every=0",
              "--data.block_size=32", "--optim.grad_accum=2"]
    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "one", *common,
                  "--optim.micro_batch_size=4"))
    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "two", *common,
                  "--optim.micro_batch_size=2", nproc=2))
    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "noac", *common,
                  "--optim.micro_batch_size=4", "--parallel.activation_checkpointing=none"))
    one, two, noac = losses(tmp_path / "one"), losses(tmp_path / "two"), losses(tmp_path / "noac")
    assert len(one) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
    assert max(abs(a - b) for a, b in zip(one, noac)) <= 1e-6, (one, noac)
    assert one[-1] < one[0]  # and it learns


def test_killed_run_resumes_bit_for_bit(world, tmp_path):
    common = ["--optim.max_steps=16", "--checkpoint.every=4", "--data.block_size=32",
              "--log.eval_every=0"]
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
    run(cmd)  # started again on the same output_dir: resumes by itself
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "killed")
    kept = sorted(p.name for p in (tmp_path / "killed").glob("step-*"))
    assert kept == ["step-12", "step-16"]  # keep_last 2


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
        loss = model(batch["tokens"], labels=batch["labels"]) / (batch["labels"] != -100).sum()
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

    run(train_cmd("sft", "sft.yaml", world, tmp_path / "sft", "--optim.max_steps=2",
                  "--optim.micro_batch_size=3"))
    batch = next(SFTDataset(world / "sft", seed=0).batches(3))
    model = load_model(read_checkpoint(world / "base"))
    with torch.no_grad():
        logits = model(batch["tokens"])
    # by hand: log-softmax at each position, the next token's, only where the next token
    # belongs to the response
    total, count = 0.0, 0
    meta = json.loads((world / "sft" / "meta.json").read_text())
    for row in range(3):
        tokens, labels = batch["tokens"][row], batch["labels"][row]
        first = int((labels != -100).nonzero()[0])  # position before the first response token
        end = int((tokens != meta["special_ids"]["pad"]).sum())
        for j in range(first, end - 1):
            total -= float(logits[row, j].log_softmax(-1)[tokens[j + 1]])
            count += 1
        assert int(tokens[end - 1]) == meta["special_ids"]["eos"]
    assert abs(losses(tmp_path / "sft")[0] - total / count) < 1e-5
    assert (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").exists()
