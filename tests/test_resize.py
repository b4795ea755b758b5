"""Embedding resize to an extended vocabulary, with the real LLaMA and Chinese-LLaMA-2 tokenizers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file

from model.formats import read_checkpoint, write_model_dir
from model.llama import named_args
from model.resize import resize_checkpoint, resize_token_embeddings
from model.source import from_state_dict, load_model
from tests.conftest import random_model
from tests.helpers import CHINESE_LLAMA2_VOCAB, LLAMA_VOCAB


@pytest.fixture
def base(shared_data, tmp_path):
    """A tiny model with LLaMA's 32,000-piece tokenizer, as a model directory."""
    tok = shared_data / "tokenizers" / "llama_tokenizer.model"
    model = random_model(named_args("tiny", vocab_size=LLAMA_VOCAB))
    write_model_dir(from_state_dict(model.state_dict(), model.args, tokenizer=tok),
                    tmp_path / "base", progress=False)
    new_tok = shared_data / "tokenizers" / "chinese_llama2_hf" / "tokenizer.model"
    # the published sizes (SOURCES.md), which the rows below are counted against
    assert [spm.SentencePieceProcessor(model_file=str(t)).vocab_size() for t in (tok, new_tok)] == \
        [LLAMA_VOCAB, CHINESE_LLAMA2_VOCAB]
    return model, tmp_path / "base", tok, new_tok


def run_resize(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.resize", *map(str, args), "--no_progress"],
                          capture_output=True, text=True)


def test_subtoken_rows_are_the_hand_computed_means(base, tmp_path):
    model, base_dir, tok, new_tok = base
    r = run_resize(base_dir, "--tokenizer", new_tok, "--output", tmp_path / "zh")
    assert r.returncode == 0, r.stderr
    resized = load_file(tmp_path / "zh" / "model.safetensors")
    old_sp, new_sp = (spm.SentencePieceProcessor(model_file=str(f)) for f in (tok, new_tok))
    for name in ("tok_embeddings.weight", "output.weight"):
        old = model.state_dict()[name]
        assert resized[name].shape == (CHINESE_LLAMA2_VOCAB, 64)
        assert torch.equal(resized[name][:LLAMA_VOCAB], old)  # old rows bit for bit
        # '一个' is split by LLaMA's tokenizer into '一' and '个'; '但' into its three UTF-8 bytes
        for piece, parts in [("一个", ["一", "个"]), ("但", ["<0xE4>", "<0xBD>", "<0x86>"]),
                             ("▁中国", None)]:
            new_id = new_sp.piece_to_id(piece)
            assert new_id >= LLAMA_VOCAB
            if parts is None:  # a word-initial piece: its text is " 中国"
                parts = [old_sp.id_to_piece(i) for i in old_sp.encode("中国")]
                assert parts[0].startswith("▁")
            expected = torch.stack([old[old_sp.piece_to_id(p)] for p in parts]).mean(0)
            assert torch.allclose(resized[name][new_id], expected, atol=1e-7), piece
    assert (tmp_path / "zh" / "tokenizer.model").read_bytes() == new_tok.read_bytes()


def test_old_logits_unchanged_for_old_tokens(base, tmp_path):
    model, base_dir, tok, new_tok = base
    for init in ("subtoken", "mean", "normal"):
        ckpt = resize_checkpoint(read_checkpoint(base_dir), new_tok, init)
        grown = load_model(ckpt).eval()
        tokens = torch.randint(0, LLAMA_VOCAB, (2, 20))
        with torch.no_grad():
            before, after = model(tokens), grown(tokens)
        assert torch.equal(after[..., :LLAMA_VOCAB], before), init
    # the in-memory version, for training code, agrees with the streamed one
    in_memory = resize_token_embeddings(random_model(named_args("tiny", vocab_size=LLAMA_VOCAB)),
                                        CHINESE_LLAMA2_VOCAB, "mean")
    streamed = load_model(resize_checkpoint(read_checkpoint(base_dir), new_tok, "mean"))
    assert torch.equal(in_memory.tok_embeddings.weight, streamed.tok_embeddings.weight)
    assert in_memory.args.vocab_size == in_memory.tok_embeddings.num_embeddings == CHINESE_LLAMA2_VOCAB


def test_pad_to_multiple_keeps_exported_vocab_size_right(base, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, base_dir, _, new_tok = base
    r = run_resize(base_dir, "--tokenizer", new_tok, "--output", tmp_path / "zh",
                   "--pad_to_multiple_of", "1000")
    assert r.returncode == 0, r.stderr
    padded = -(-CHINESE_LLAMA2_VOCAB // 1000) * 1000  # 56,000
    assert json.loads((tmp_path / "zh" / "params.json").read_text())["vocab_size"] == padded
    sub = subprocess.run([sys.executable, "-m", "model.convert", tmp_path / "zh", tmp_path / "hf",
                          "--to", "hf", "--no_progress"], capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == padded
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.get_input_embeddings().weight.shape[0] == padded
    assert len(transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")) == CHINESE_LLAMA2_VOCAB


def test_bad_tokenizers_are_refused(base, shared_data, tmp_path):
    _, base_dir, _, _ = base
    chinese_only = shared_data / "tokenizers" / "chinese_sp.model"
    r = run_resize(base_dir, "--tokenizer", chinese_only, "--output", tmp_path / "out")
    assert r.returncode != 0 and f"fewer than the model's {LLAMA_VOCAB}" in r.stderr
    not_sp = tmp_path / "junk.model"
    not_sp.write_bytes(b"not a model")
    r = run_resize(base_dir, "--tokenizer", not_sp, "--output", tmp_path / "out")
    assert r.returncode != 0 and "not a sentencepiece model" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
