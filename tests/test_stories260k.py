"""stories260K: a real, trained GQA LLaMA in llama2.c's format, against transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from model.checkpoint import load_model
from model.convert import convert
from model.formats import read_checkpoint
from model.generate import SamplingConfig, generate_ids

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    src = SHARED_DATA / "models" / "stories260K"
    if not src.is_dir():
        pytest.skip(f"real test material not found at {src}")
    out = tmp_path_factory.mktemp("stories")
    convert(src / "stories260K.bin", out / "canon", "zhllama", tokenizer=src / "tok512.model",
            progress=False)
    convert(out / "canon", out / "hf", "hf", progress=False)
    ours = load_model(read_checkpoint(out / "canon")).eval()
    hf = transformers.LlamaForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    return ours, hf, out


def test_header_read_as_published(stories):
    args = stories[0].args
    assert (args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.kv_heads,
            args.vocab_size, args.max_seq_len) == (64, 172, 5, 8, 4, 512, 512)


def test_logits_equal_transformers(stories):
    ours, hf, _ = stories
    tokens = torch.randint(0, 512, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(tokens), hf(tokens).logits
    assert (a - b).abs().max() <= 1e-4


def test_greedy_generation_matches_transformers_and_is_fluent(stories):
    import sentencepiece as spm

    ours, hf, out = stories
    sp = spm.SentencePieceProcessor(model_file=str(out / "canon" / "tokenizer.model"))
    ids = list(generate_ids(ours, [sp.bos_id()], 120, SamplingConfig(temperature=0),
                            stop_ids=(sp.eos_id(),)))
    theirs = hf.generate(torch.tensor([[sp.bos_id()]]), max_new_tokens=len(ids), do_sample=False,
                         eos_token_id=sp.eos_id(), pad_token_id=0)[0, 1:].tolist()
    assert ids == theirs
    text = sp.decode(ids)
    assert text.startswith("Once upon a time, there was a little girl named Lily.")
    words = text.replace(",", " ").replace(".", " ").split()
    assert len(words) > 40 and all(w.isascii() for w in words)


def test_generate_cli_streams_text(stories):
    _, _, out = stories
    r = subprocess.run(
        [sys.executable, "-m", "model.generate", str(out / "hf"), "--prompt", "Once upon a time",
         "--max_new_tokens", "40", "--temperature", "0.7", "--top_p", "0.9", "--seed", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time") and len(r.stdout.split()) > 15
