"""LoRA layers: exact start, merge maths, adapters on disk."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from model.llama import named_args
from model.lora import (
    LoRAConfig, LoRALinear, adapter_state_dict, apply_lora, load_adapter, mark_trainable,
    fold_lora, save_adapter,
)
from tests.conftest import random_model


def randomise_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.1)


def test_hf_aliases_and_exact_start():
    model = random_model(named_args("tiny-gqa"))
    tokens = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        before = model(tokens)
    cfg = LoRAConfig(r=4, alpha=16, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"),
                     modules_to_save=("lm_head",))
    assert cfg.targets == ("wq", "wv", "w2") and cfg.modules_to_save == ("output",)
    apply_lora(model, cfg)
    assert isinstance(model.layers[1].attention.wq, LoRALinear)
    assert type(model.layers[1].attention.wk) is torch.nn.Linear
    assert "layers.0.attention.wq.weight" in model.state_dict()  # base key unchanged
    with torch.no_grad():
        assert torch.equal(model(tokens), before)  # B = 0: exactly the base model


def test_merge_equals_w_plus_scaled_ba_and_unmerge():
    model = random_model(named_args("tiny"))
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    randomise_lora(model)
    wq = model.layers[0].attention.wq
    w0 = wq.weight.detach().clone()
    expected = w0 + (8 / 4) * wq.lora_b.detach() @ wq.lora_a.detach()
    tokens = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        with_lora = model(tokens)
        wq.merge()
        assert torch.allclose(wq.weight, expected, atol=1e-6)
        wq.unmerge()
        assert torch.allclose(wq.weight, w0, atol=1e-6)
        fold_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert torch.allclose(model(tokens), with_lora, atol=1e-5)


def test_mark_trainable():
    model = random_model(named_args("tiny"))
    apply_lora(model, LoRAConfig(r=2, targets=("wq", "w3")))
    names = mark_trainable(model, ["embed_tokens", "output"])
    assert "tok_embeddings.weight" in names and "output.weight" in names
    assert all(n.endswith(("lora_a", "lora_b")) or n in ("tok_embeddings.weight", "output.weight")
               for n in names)
    assert not model.layers[0].attention.wq.weight.requires_grad


def test_adapter_round_trip_and_refusals(tmp_path):
    cfg = LoRAConfig(r=4, alpha=32, dropout=0.05, modules_to_save=("tok_embeddings", "output"))
    model = random_model(named_args("tiny"))
    apply_lora(model, cfg)
    randomise_lora(model)
    save_adapter(adapter_state_dict(model, cfg), cfg, tmp_path / "ad", base_vocab_size=500,
                 vocab_size=512, tokenizer_sha256="abc")
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["r"] == 4 and meta["base_vocab_size"] == 500 and meta["targets"][0] == "wq"
    assert (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size > 10_000
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert saved.keys() == adapter_state_dict(model, cfg).keys()
    assert {"tok_embeddings.weight", "output.weight"} <= saved.keys()
    assert {k.rsplit(".", 1)[1] for k in saved} == {"lora_a", "lora_b", "weight"}
    # A fresh model of another seed, so that every tensor the adapter holds starts out
    # different (A, B, the embeddings and output): each must then come from the file.
    fresh = random_model(named_args("tiny"), seed=1)
    apply_lora(fresh, cfg)
    before = adapter_state_dict(fresh, cfg)
    assert not any(torch.equal(before[k], saved[k]) for k in saved)
    with torch.no_grad():  # the base weights, which an adapter does not hold, from the first model
        for name, t in model.state_dict().items():
            if name not in saved:
                fresh.state_dict()[name].copy_(t)
    load_adapter(fresh, tmp_path / "ad")
    loaded = adapter_state_dict(fresh, cfg)
    for name, t in saved.items():
        assert torch.equal(loaded[name], t), name
    tokens = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(tokens), model.eval()(tokens))
    with pytest.raises(ValueError, match="no LoRA tensors"):
        save_adapter({"tok_embeddings.weight": torch.zeros(2)}, cfg, tmp_path / "empty",
                     base_vocab_size=1, vocab_size=1)
    assert not (tmp_path / "empty").exists()
    state = adapter_state_dict(model, cfg)
    for drop in ("output.weight", "layers.0.attention.wq.lora_b"):
        with pytest.raises(ValueError, match="incomplete adapter"):
            save_adapter({k: v for k, v in state.items() if k != drop}, cfg, tmp_path / "part",
                         base_vocab_size=1, vocab_size=1)
    assert not (tmp_path / "part").exists()
    other = random_model(named_args("tiny", vocab_size=600))
    with pytest.raises(ValueError, match="vocabulary of 512 rows"):
        load_adapter(other, tmp_path / "ad")
