"""`make demo`'s job: the whole recipe at toy scale, from the embedded corpus only. Two demos
run side by side print the same figures and text (times aside); held-out Chinese bits/char
falls in stages 1 and 2; every stage leaves what it should."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def demo(work) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train.recipe", "--workdir", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def without_times(text: str, work) -> str:
    """The output with the work directory and every duration taken out, and runs of spaces
    made one: the closing table's columns are as wide as their longest cell, so a stage of
    9 s in one run and 10 s in the other shifts the columns after the time."""
    text = text.replace(str(work), "WORK")
    return re.sub(r" +", " ", re.sub(r"\b\d+ s\b", "T s", text))


def table(text: str) -> dict[str, list[str]]:
    """The closing table's rows by model name: the cells after the name."""
    rows = text.split("before stage 1 and after each stage:\n", 1)[1].splitlines()[2:6]
    return {r[:26].strip(): r[26:].split() for r in rows}


def test_recipe_runs_end_to_end_and_twice_the_same(tmp_path):
    works = [tmp_path / "demo", tmp_path / "again"]
    procs = [demo(w) for w in works]  # side by side: 2 cores, one thread each
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err[-3000:]
    first, second = (without_times(o, w) for (o, _), w in zip(outs, works))
    assert first == second  # every figure, every generated text
    out, err = outs[0]
    work = works[0]
    for n in range(1, 13):
        assert f"[{n:2d}/12]" in out
    assert "train (embeddings)" in err and "train (lora)" in err  # the progress bars were shown
    # held-out Chinese improves in stage 1 and in stage 2; the figures are the evaluate command's
    rows = table(out)
    zh = [float(rows[name][-2]) for name in ("base-zh (before stage 1)", "stage 1", "stage 2")]
    assert zh[0] > zh[1] > zh[2], rows
    assert all(float(r[-1]) > 0 for r in rows.values())  # English is scored too
    assert (work / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the answers: greedy and sampled, for each question
    assert out.count("greedy:") == out.count("sampled:") == 3
    # every stage left what it should
    assert sorted(p.name for p in (work / "base-meta").iterdir()) == [
        "checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json",
        "tokenizer.model"]
    merged = json.loads((work / "merged" / "merge_manifest.json").read_text())["report"]
    vocab = merged["total"]
    assert merged["pad_id"] == vocab - 1
    assert json.loads((work / "base-zh" / "params.json").read_text())["vocab_size"] == vocab
    for run in ("stage1", "stage2", "sft"):
        lines = [json.loads(l) for l in (work / run / "metrics.jsonl").read_text().splitlines()]
        losses = [l["loss"] for l in lines if "loss" in l]
        assert losses[-1] < losses[0], run
        if run != "sft":  # pretraining validates on the held-out Chinese and English text
            assert any("val/zh/bpc" in l and "val/en/bpc" in l for l in lines), run
    shares = [l for l in map(json.loads, (work / "stage2" / "metrics.jsonl").read_text().splitlines())
              if "share/en" in l]
    assert shares[-1]["share/en"] == pytest.approx(0.2, abs=0.02)  # English replay
    assert (work / "stage2" / "adapter" / "adapter_model.safetensors").exists()
    config = json.loads((work / "final-hf" / "config.json").read_text())
    assert config["vocab_size"] % 64 == 0 and config["pad_token_id"] == vocab - 1
    assert (work / "final-meta" / "consolidated.01.pth").exists()
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(work / "final-hf", dtype=torch.float32)
    assert hf.get_input_embeddings().weight.shape[0] == config["vocab_size"]
    # a second run refuses to clobber the first
    r = subprocess.run([sys.executable, "-m", "train.recipe", "--workdir", str(work)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "already exists" in r.stderr
