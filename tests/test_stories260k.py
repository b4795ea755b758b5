"""stories260K: a real, trained GQA LLaMA in llama2.c's format, against transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from model.convert import convert
from model.formats import read_checkpoint
from model.generate import SamplingConfig, generate_ids
from model.source import load_model


@pytest.fixture(scope="module")
def hf_dir(stories260k, tmp_path_factory):
    """stories260K exported to a Hugging Face directory."""
    out = tmp_path_factory.mktemp("stories_hf") / "hf"
    convert(stories260k, out, "hf", progress=False)
    return out


@pytest.fixture(scope="module")
def models(stories260k, hf_dir):
    """(ours, transformers') stories260K: transformers loads our Hugging Face export."""
    transformers = pytest.importorskip("transformers")
    ours = load_model(read_checkpoint(stories260k)).eval()
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return ours, hf


def test_header_read_as_published(stories260k):
    args = read_checkpoint(stories260k).args
    # SOURCES.md: dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4,
    # vocab_size=512, seq_len=512 (the llama2.c header's 7 int32)
    assert (args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.kv_heads,
            args.vocab_size, args.max_seq_len) == (64, 172, 5, 8, 4, 512, 512)


def test_logits_equal_transformers(models):
    ours, hf = models
    tokens = torch.randint(0, ours.args.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(tokens), hf(tokens).logits
    assert (a - b).abs().max() <= 1e-4


def test_greedy_generation_matches_transformers_and_is_fluent(models, stories260k):
    import sentencepiece as spm

    ours, hf = models
    sp = spm.SentencePieceProcessor(model_file=str(stories260k / "tokenizer.model"))
    ids = list(generate_ids(ours, [sp.bos_id()], 120, SamplingConfig(temperature=0),
                            stop_ids=(sp.eos_id(),)))
    theirs = hf.generate(torch.tensor([[sp.bos_id()]]), max_new_tokens=len(ids), do_sample=False,
                         eos_token_id=sp.eos_id(), pad_token_id=0)[0, 1:].tolist()
    assert ids == theirs
    text = sp.decode(ids)
    assert text.startswith("Once upon a time, there was a little girl named Lily.")
    words = text.replace(",", " ").replace(".", " ").split()
    assert len(words) > 40 and all(w.isascii() for w in words)


def test_generate_cli_streams_text(hf_dir):
    r = subprocess.run(
        [sys.executable, "-m", "model.generate", str(hf_dir), "--prompt", "Once upon a time",
         "--max_new_tokens", "40", "--temperature", "0.7", "--top_p", "0.9", "--seed", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time") and len(r.stdout.split()) > 15
