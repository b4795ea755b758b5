"""`zhllama evaluate` (train/evaluate.py) against transformers: on the Hugging Face export of
stories260K (a real trained LLaMA), the summed NLL in bits of each document's scored tokens,
computed by transformers' LlamaForCausalLM and its own tokenizer, divided by the characters
(and UTF-8 bytes) of the text, equals our bits/char and bits/byte; for plain text, for
documents cut into windows, and for instruction data scored on the responses."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.helpers import ENV, SHARED_DATA, one_error
from tokenizer.templates import format_prompt

transformers = pytest.importorskip("transformers")

STORIES = ["Once upon a time, there was a little girl named Lily. She loved to play outside in the sun.",
           "Tom had a big red ball. He liked to throw it to his dog, and the dog ran fast.",
           "One day, a cat saw a bird in the tree."]
RECORDS = [{"instruction": "Tell me a story.", "input": "", "output": "Lily went to the park."},
           {"instruction": "What did Tom have?", "input": "A story about Tom.",
            "output": "Tom had a big red ball."}]


@pytest.fixture(scope="module")
def hf(stories260k, tmp_path_factory):
    from model.convert import convert

    out = tmp_path_factory.mktemp("eval") / "hf"
    convert(stories260k, out, "hf", progress=False)
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return out, model, transformers.AutoTokenizer.from_pretrained(out)


def bits(model, ids: list[int], first_target: int) -> float:
    """Summed NLL in bits of ids[first_target:] given what precedes each, by transformers."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    return float(nll[first_target - 1 :].sum()) / math.log(2)


def evaluate(model_dir, *args) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "train.evaluate", str(model_dir), "--json", *map(str, args)],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    return [json.loads(l) for l in r.stdout.splitlines()]


def test_bits_per_character_equal_transformers(stories260k, hf, tmp_path):
    _, model, tok = hf
    zh = [l for l in (SHARED_DATA / "corpus" / "lunyu.txt").read_text(encoding="utf-8").splitlines() if l][:3]
    docs = STORIES + zh  # Chinese: byte fallback, several tokens per character
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    total = sum(bits(model, tok(d)["input_ids"] + [tok.eos_token_id], 1) for d in docs)
    chars, nbytes = sum(map(len, docs)), sum(len(d.encode("utf-8")) for d in docs)
    [ours] = evaluate(stories260k, "--input", tmp_path / "docs.txt", "--block_size", 256)
    assert (ours["documents"], ours["characters"]) == (len(docs), chars)
    assert ours["tokens"] == sum(len(tok(d)["input_ids"]) for d in docs)  # every token after <s>, </s> too
    assert ours["bpc"] == pytest.approx(total / chars, rel=1e-5)
    assert ours["bpb"] == pytest.approx(total / nbytes, rel=1e-5)
    assert ours["loss"] == pytest.approx(total * math.log(2) / ours["tokens"], rel=1e-5)


def test_long_documents_are_scored_in_windows_each_token_once(stories260k, hf, tmp_path):
    _, model, tok = hf
    doc = " ".join(STORIES)
    (tmp_path / "long.txt").write_text(doc + "\n", encoding="utf-8")
    ids = tok(doc)["input_ids"] + [tok.eos_token_id]
    block = 16
    # window k: ids[k·15 : k·15 + 16], scoring all but its first token, each alone
    expected = sum(bits(model, ids[s : s + block], 1) for s in range(0, len(ids) - 1, block - 1))
    [ours] = evaluate(stories260k, "--input", tmp_path / "long.txt", "--block_size", block,
                      "--batch_size", 3)
    assert ours["tokens"] == len(ids) - 1 and ours["characters"] == len(doc)
    assert ours["bpc"] == pytest.approx(expected / len(doc), rel=1e-5)


@pytest.mark.parametrize("block", [256, 8, 9, 10, 11, 12])
def test_instruction_data_is_scored_on_the_responses(stories260k, hf, tmp_path, block):
    """Whole samples, and samples cut into windows at every alignment (one window starts
    at the response's first token: its leading space is still the dummy prefix)."""
    _, model, tok = hf
    (tmp_path / "sft.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    total = 0.0
    for r in RECORDS:
        source = tok(format_prompt("alpaca", r["instruction"], r["input"]))["input_ids"]
        ids = source + tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for s in range(0, len(ids) - 1, block - 1):  # the windows, each scored alone
            if s + block > len(source):
                total += bits(model, ids[s : s + block], max(1, len(source) - s))
    chars = sum(len(r["output"]) for r in RECORDS)
    [ours] = evaluate(stories260k, "--input", tmp_path / "sft.json", "--template", "alpaca",
                      "--block_size", block)
    assert (ours["kind"], ours["documents"], ours["characters"]) == ("sft", 2, chars)
    assert ours["bpc"] == pytest.approx(total / chars, rel=1e-5)


def test_a_token_directory_gives_the_figures_of_its_text(stories260k, tmp_path):
    (tmp_path / "docs.txt").write_text("\n".join(STORIES) + "\n", encoding="utf-8")
    subprocess.run([sys.executable, "-m", "data.prepare", "--tokenizer", str(stories260k), "--input",
                    str(tmp_path / "docs.txt"), "--output_dir", str(tmp_path / "tokens"),
                    "--num_workers", "1"], check=True, capture_output=True, env=ENV)
    from_text, from_dir = evaluate(stories260k, "--input", tmp_path / "docs.txt", tmp_path / "tokens")
    assert {k: v for k, v in from_text.items() if k != "input"} == \
        {k: v for k, v in from_dir.items() if k != "input"}


@pytest.mark.parametrize("args, words", [
    (["--input", "missing.txt"], "missing.txt: no such input file"),
    (["--input", "docs.txt", "--block_size", "4096"], "above the model's max_seq_len"),
    (["--input", "docs.txt", "--block_size", "1"], "at least 2 tokens"),
    (["--input", "docs.txt", "--template", "alpaca"], "docs.txt: unsupported input type"),
])
def test_bad_inputs_get_one_error_line(stories260k, tmp_path, args, words):
    (tmp_path / "docs.txt").write_text("\n".join(STORIES) + "\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "train.evaluate", str(stories260k), *args],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert words in one_error(r)
