"""Merging adapters against peft's own merge, and our adapters loaded by peft."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from model.checkpoint import from_state_dict, load_model
from model.formats import read_checkpoint, write_hf, write_model_dir
from model.llama import named_args
from model.lora import LoRAConfig, LoRALinear, adapter_state_dict, apply_lora, save_adapter
from tests.conftest import random_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BASE_VOCAB, ZH_VOCAB = 300, 337
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_base(tmp_path):
    """A tiny GQA LLaMA in transformers, saved as the base everyone merges into."""
    cfg = transformers.LlamaConfig(
        vocab_size=BASE_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def load_hf(path, vocab=None):
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    if vocab:
        model.resize_token_embeddings(vocab)
    return model.eval()


def make_peft_adapter(base_dir, out, targets, seed, vocab=ZH_VOCAB):
    """A PEFT adapter with non-zero B and grown embeddings in modules_to_save."""
    model = load_hf(base_dir, vocab)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, lora_dropout=0.0,
                             modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(out)
    return out


def peft_merged(base_dir, adapters):
    model = load_hf(base_dir, ZH_VOCAB)
    for path in adapters:
        model = peft.PeftModel.from_pretrained(model, path).merge_and_unload()
    return model.eval()


def merged_logits(base_dir, adapters, tmp_path, tokens):
    r = subprocess.run([sys.executable, "-m", "model.merge_lora", "--base_model", str(base_dir),
                        "--lora_model", ",".join(map(str, adapters)), "--output_type", "zhllama",
                        "--output_dir", str(tmp_path / "merged"), "--no_progress", "--overwrite"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model = load_model(read_checkpoint(tmp_path / "merged")).eval()
    with torch.no_grad():
        return model(tokens)


def test_peft_adapter_merge_equals_peft_merge_and_unload(tmp_path):
    base = hf_base(tmp_path)
    adapter = make_peft_adapter(base, tmp_path / "a", HF_TARGETS, seed=1)
    tokens = torch.randint(0, ZH_VOCAB, (2, 21))
    with torch.no_grad():
        theirs = peft_merged(base, [adapter])(tokens).logits
    ours = merged_logits(base, [adapter], tmp_path, tokens)
    assert ours.shape[-1] == ZH_VOCAB
    assert (ours - theirs).abs().max() <= 1e-5


def test_two_adapters_in_order(tmp_path):
    base = hf_base(tmp_path)
    first = make_peft_adapter(base, tmp_path / "a", HF_TARGETS, seed=1)
    second = make_peft_adapter(base, tmp_path / "b", ["q_proj", "v_proj"], seed=2)
    tokens = torch.randint(0, ZH_VOCAB, (2, 17))
    with torch.no_grad():
        theirs = peft_merged(base, [first, second])(tokens).logits
    ours = merged_logits(base, [first, second], tmp_path, tokens)
    assert (ours - theirs).abs().max() <= 1e-5
    reversed_order = merged_logits(base, [second, first], tmp_path, tokens)
    assert (reversed_order - theirs).abs().max() > 1e-3  # the order matters, and is kept


def test_our_adapter_loads_in_peft(tmp_path):
    args = named_args("tiny-gqa", n_kv_heads=2)
    model = random_model(args)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, modules_to_save=("tok_embeddings", "output"))
    write_hf(from_state_dict(model.state_dict(), args), tmp_path / "hf", progress=False)
    apply_lora(model, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.2)
        model.output.weight.add_(0.05)
    save_adapter(adapter_state_dict(model, cfg), cfg, tmp_path / "ours", base_vocab_size=512,
                 vocab_size=512, base_params=args.to_params())
    r = subprocess.run([sys.executable, "-m", "model.adapters", str(tmp_path / "ours"),
                        str(tmp_path / "peft"), "--format", "peft"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    loaded = peft.PeftModel.from_pretrained(load_hf(tmp_path / "hf"), tmp_path / "peft").eval()
    tokens = torch.randint(0, 512, (2, 19))
    with torch.no_grad():
        assert (model(tokens) - loaded(tokens).logits).abs().max() <= 1e-5


def test_mismatched_adapters_are_refused(tmp_path):
    base = hf_base(tmp_path)
    adapter = make_peft_adapter(base, tmp_path / "a", HF_TARGETS, seed=1)
    other = named_args("tiny", vocab_size=BASE_VOCAB)  # another model size
    write_model_dir(from_state_dict(random_model(other).state_dict(), other), tmp_path / "other",
                    progress=False)
    big = named_args("tiny-gqa", n_kv_heads=2, vocab_size=400)  # same shape, larger vocabulary
    write_model_dir(from_state_dict(random_model(big).state_dict(), big), tmp_path / "big",
                    progress=False)
    for base_dir, message in [(tmp_path / "other", "made for another base size"),
                              (tmp_path / "big", "smaller than the base model's (400)")]:
        r = subprocess.run([sys.executable, "-m", "model.merge_lora", "--base_model", str(base_dir),
                            "--lora_model", str(adapter), "--output_type", "huggingface",
                            "--output_dir", str(tmp_path / "out"), "--no_progress"],
                           capture_output=True, text=True)
        assert r.returncode != 0 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
