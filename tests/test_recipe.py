"""`make demo`'s job: the whole recipe at toy scale, from the embedded corpus only."""

from __future__ import annotations

import json
import subprocess
import sys

import torch


def test_recipe_runs_end_to_end(tmp_path):
    work = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "train.recipe", "--workdir", str(work)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[12/12] generation:" in r.stdout
    # every stage left what it should
    assert sorted(p.name for p in (work / "base-meta").iterdir()) == [
        "checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json",
        "tokenizer.model"]
    merged = json.loads((work / "merged" / "merge_manifest.json").read_text())["report"]
    vocab = merged["total"]
    assert merged["pad_id"] == vocab - 1
    assert json.loads((work / "base-zh" / "params.json").read_text())["vocab_size"] == vocab
    for run in ("stage1", "stage2", "sft"):
        losses = [json.loads(l)["loss"] for l in (work / run / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(l)]
        assert losses[-1] < losses[0], run
    assert (work / "stage2" / "adapter" / "adapter_model.safetensors").exists()
    config = json.loads((work / "final-hf" / "config.json").read_text())
    assert config["vocab_size"] % 64 == 0 and config["pad_token_id"] == vocab - 1
    assert (work / "final-meta" / "consolidated.01.pth").exists()
    transformers = __import__("pytest").importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(work / "final-hf", dtype=torch.float32)
    assert hf.get_input_embeddings().weight.shape[0] == config["vocab_size"]
    # a second run refuses to clobber the first
    r = subprocess.run([sys.executable, "-m", "train.recipe", "--workdir", str(work)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "already exists" in r.stderr
