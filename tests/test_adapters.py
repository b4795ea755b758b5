"""Merging adapters against peft's own merge, and our adapters loaded by peft."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from model.formats import read_checkpoint, write_hf, write_model_dir
from model.formats.gguf import gguf_name
from model.formats.hf import canonical_to_hf_name, permute_from_hf
from model.llama import named_args
from model.lora import LoRAConfig, LoRALinear, adapter_state_dict, apply_lora, save_adapter
from model.source import from_state_dict, load_model
from tests.conftest import random_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BASE_VOCAB, ZH_VOCAB = 300, 337
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"


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
    if vocab and vocab != model.config.vocab_size:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return model.eval()


def make_peft_adapter(base_dir, out, targets, seed, vocab=ZH_VOCAB, save_embeddings=True):
    """A PEFT adapter with non-zero B and (by default) grown embeddings in modules_to_save."""
    model = load_hf(base_dir, vocab if save_embeddings else None)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, lora_dropout=0.0,
                             modules_to_save=["embed_tokens", "lm_head"] if save_embeddings else None,
                             task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(out)
    return out


def peft_merged(base_dir, adapters):
    """peft's merge_and_unload of (adapter, vocabulary) pairs in order, resizing before each."""
    model = load_hf(base_dir)
    for path, vocab in adapters:
        if vocab > model.config.vocab_size:
            model.resize_token_embeddings(vocab, mean_resizing=False)
        model = peft.PeftModel.from_pretrained(model, path).merge_and_unload()
    return model.eval()


def run_merge(base_dir, lora_model, out, output_type="zhllama", *extra):
    return subprocess.run([sys.executable, "-m", "model.merge_lora", "--base_model", str(base_dir),
                           "--lora_model", str(lora_model), "--output_type", output_type,
                           "--output_dir", str(out), "--no_progress", *map(str, extra)],
                          capture_output=True, text=True)


def merged_logits(base_dir, adapters, tmp_path, tokens):
    r = run_merge(base_dir, ",".join(map(str, adapters)), tmp_path / "merged", "zhllama", "--overwrite")
    assert r.returncode == 0, r.stderr
    model = load_model(read_checkpoint(tmp_path / "merged")).eval()
    with torch.no_grad():
        return model(tokens)


def read_tensors(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def truncated_tokenizer(src, n_pieces, dst):
    """A real sentencepiece model cut to its first pieces (a BPE model's merges are ordered)."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(src.read_bytes())
    del proto.pieces[n_pieces:]
    dst.write_bytes(proto.SerializeToString())
    return dst


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    """The HF base and a PEFT adapter over it, made once for the tests that only read them."""
    tmp = tmp_path_factory.mktemp("peft")
    base = hf_base(tmp)
    return base, make_peft_adapter(base, tmp / "adapter", HF_TARGETS, seed=1)


def test_peft_adapter_merge_equals_peft_merge_and_unload(peft_pair, tmp_path):
    base, adapter = peft_pair
    tokens = torch.randint(0, ZH_VOCAB, (2, 21))
    with torch.no_grad():
        theirs = peft_merged(base, [(adapter, ZH_VOCAB)])(tokens).logits
    ours = merged_logits(base, [adapter], tmp_path, tokens)
    assert ours.shape[-1] == ZH_VOCAB
    assert (ours - theirs).abs().max() <= 1e-5


def test_original_module_copy_is_never_merged(peft_pair, tmp_path):
    """PEFT also saves `original_module`, the base's untrained embeddings; even when that
    key comes last in the file, the trained copy is the one merged."""
    base, adapter = peft_pair
    tensors = read_tensors(adapter / WEIGHTS)
    assert any(".original_module." in k for k in tensors)
    moved = tmp_path / "bin"
    moved.mkdir()
    shutil.copy(adapter / "adapter_config.json", moved)
    order = sorted(tensors, key=lambda k: ".original_module." in k)  # untrained copies last
    torch.save({k: tensors[k] for k in order}, moved / "adapter_model.bin")
    tokens = torch.randint(0, ZH_VOCAB, (2, 13))
    with torch.no_grad():
        theirs = peft_merged(base, [(moved, ZH_VOCAB)])(tokens).logits
    ours = merged_logits(base, [moved], tmp_path, tokens)
    assert (ours - theirs).abs().max() <= 1e-5


def test_two_adapters_in_order_each_with_its_vocabulary(tmp_path):
    base = hf_base(tmp_path)
    first = make_peft_adapter(base, tmp_path / "a", HF_TARGETS, seed=1, vocab=ZH_VOCAB)
    second = make_peft_adapter(base, tmp_path / "b", ["q_proj", "v_proj"], seed=2, vocab=360)
    tokens = torch.randint(0, 360, (2, 17))
    with torch.no_grad():
        theirs = peft_merged(base, [(first, ZH_VOCAB), (second, 360)])(tokens).logits
    ours = merged_logits(base, [first, second], tmp_path, tokens)
    assert ours.shape[-1] == 360 and (ours - theirs).abs().max() <= 1e-5
    # the order is kept: the other way round, the first adapter's vocabulary no longer fits
    r = run_merge(base, f"{second},{first}", tmp_path / "reversed")
    assert r.returncode != 0 and "smaller than the base model's (360)" in r.stderr, r.stderr


def test_our_adapter_with_grown_embeddings_loads_and_merges_in_peft(tmp_path):
    args, grown = named_args("tiny-gqa", n_kv_heads=2), 540
    small = random_model(args)
    write_hf(from_state_dict(small.state_dict(), args), tmp_path / "hf", progress=False)
    state, g = dict(small.state_dict()), torch.Generator().manual_seed(3)
    for name in ("tok_embeddings.weight", "output.weight"):  # the base resized to 540 rows
        state[name] = torch.cat([state[name], torch.randn(grown - 512, 64, generator=g) * 0.1])
    big_args = args.replace(vocab_size=grown)
    model = load_model(from_state_dict(state, big_args)).eval()
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, modules_to_save=("tok_embeddings", "output"))
    apply_lora(model, cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.2)
        model.tok_embeddings.weight.add_(torch.randn(grown, 64, generator=g) * 0.05)
        model.output.weight.add_(0.05)
    save_adapter(adapter_state_dict(model, cfg), cfg, tmp_path / "ours", base_vocab_size=grown,
                 vocab_size=grown, base_params=big_args.to_params())
    r = subprocess.run([sys.executable, "-m", "model.adapters", str(tmp_path / "ours"),
                        str(tmp_path / "peft"), "--format", "peft"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    loaded = peft.PeftModel.from_pretrained(load_hf(tmp_path / "hf", grown), tmp_path / "peft").eval()
    tokens = torch.cat([torch.randint(0, grown, (2, 19)), torch.arange(512, 540).view(2, 14)], 1)
    with torch.no_grad():
        mine = model(tokens)
        assert (mine - loaded(tokens).logits).abs().max() <= 1e-5
        theirs = loaded.merge_and_unload()(tokens).logits
    for adapter in ("ours", "peft"):  # merged by us, from our format and from PEFT's
        merged = merged_logits(tmp_path / "hf", [tmp_path / adapter], tmp_path, tokens)
        assert (merged - theirs).abs().max() <= 1e-5, adapter


def our_adapter_for_hf_base(out, **recorded):
    """One of our adapters (LoRA on wq only) shaped for `hf_base`, recording `recorded`."""
    g = torch.Generator().manual_seed(5)
    state = {}
    for i in range(2):
        state[f"layers.{i}.attention.wq.lora_a"] = torch.randn(4, 64, generator=g)
        state[f"layers.{i}.attention.wq.lora_b"] = torch.randn(64, 4, generator=g)
    params = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, **recorded.pop("params", {})}
    save_adapter(state, LoRAConfig(r=4, alpha=8, targets=("wq",)), out,
                 **{"base_vocab_size": BASE_VOCAB, "vocab_size": BASE_VOCAB, **recorded},
                 base_params=params)
    return out


def edit_config(adapter, **changes):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(adapter, change):
    tensors = read_tensors(adapter / WEIGHTS)
    change(tensors)
    save_file(tensors, adapter / WEIGHTS)


def _bad(name, adapter, tmp_path):
    """Break a copy of a good adapter in one way; returns the --lora_model argument."""
    if name == "no adapter":
        return ","
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    if name == "missing adapter_config":
        (bad / "adapter_config.json").unlink()
    elif name in ("missing r", "missing lora_alpha"):
        edit_config(bad, **{name.split()[1]: None})
    elif name == "unknown key":
        edit_tensors(bad, lambda t: t.update({"base_model.model.model.layers.0.mlp.gate_proj."
                                              "lora_magnitude_vector": torch.ones(128)}))
    elif name == "embeddings of another width":
        edit_tensors(bad, lambda t: t.update({k: v[:, :32].contiguous() for k, v in t.items()
                                              if "embed_tokens" in k}))
    elif name == "two trained copies differ":
        edit_tensors(bad, lambda t: t["base_model.model.lm_head.weight"].add_(1.0))
    elif name == "ours, larger vocabulary":
        shutil.rmtree(bad)
        our_adapter_for_hf_base(bad, base_vocab_size=400, vocab_size=400)
    elif name == "ours, another base size":
        shutil.rmtree(bad)
        our_adapter_for_hf_base(bad, params={"n_layers": 4})
    return bad


@pytest.mark.parametrize("name, output_type, message", [
    ("no adapter", "huggingface", "no adapter to merge"),
    ("missing adapter_config", "gguf", "adapter_config.json is missing"),
    ("missing r", "gguf", "adapter_config.json: r: missing"),
    ("missing lora_alpha", "huggingface", "adapter_config.json: lora_alpha: missing"),
    ("unknown key", "gguf", "unsupported adapter tensor base_model.model.model.layers.0.mlp"),
    ("embeddings of another width", "huggingface", "the base's rows have 64 values"),
    ("two trained copies differ", "pth", "cannot tell which one was trained"),
    ("ours, larger vocabulary", "gguf", "trained with a 400-row vocabulary"),
    ("ours, another base size", "huggingface", "made for a base with n_layers 4"),
])
def test_bad_adapters_are_refused_whole(peft_pair, tmp_path, name, output_type, message):
    base, adapter = peft_pair
    lora = _bad(name, adapter, tmp_path)
    r = run_merge(base, lora, tmp_path / "out", output_type)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # no temporary left


def test_mismatched_adapters_are_refused(peft_pair, tmp_path):
    _, adapter = peft_pair
    other = named_args("tiny", vocab_size=BASE_VOCAB)  # another model size
    write_model_dir(from_state_dict(random_model(other).state_dict(), other), tmp_path / "other",
                    progress=False)
    big = named_args("tiny-gqa", n_kv_heads=2, vocab_size=400)  # same shape, larger vocabulary
    write_model_dir(from_state_dict(random_model(big).state_dict(), big), tmp_path / "big",
                    progress=False)
    for base_dir, message in [(tmp_path / "other", "made for another base size"),
                              (tmp_path / "big", "smaller than the base model's (400)")]:
        r = run_merge(base_dir, adapter, tmp_path / "out", "huggingface")
        assert r.returncode != 0 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


@pytest.fixture
def tok512(shared_data):
    return shared_data / "models" / "stories260K" / "tok512.model"


def test_adapter_tokenizer_wins_over_the_base_and_flag_over_both(tmp_path, tok512):
    base = hf_base(tmp_path)
    truncated_tokenizer(tok512, BASE_VOCAB, base / "tokenizer.model")
    adapter = make_peft_adapter(base, tmp_path / "a", ["q_proj"], seed=1, vocab=520)
    shutil.copy(tok512, adapter / "tokenizer.model")
    for output_type in ("zhllama", "huggingface"):
        out = tmp_path / output_type
        r = run_merge(base, adapter, out, output_type)
        assert r.returncode == 0, r.stderr
        assert (out / "tokenizer.model").read_bytes() == tok512.read_bytes()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "huggingface")
    assert len(hf_tok) == 512
    chosen = truncated_tokenizer(tok512, 400, tmp_path / "chosen.model")
    r = run_merge(base, adapter, tmp_path / "flag", "zhllama", "--tokenizer", chosen)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "flag" / "tokenizer.model").read_bytes() == chosen.read_bytes()


def test_tokenizer_larger_than_the_embeddings_is_refused(tmp_path, tok512):
    base = hf_base(tmp_path)
    adapter = make_peft_adapter(base, tmp_path / "a", HF_TARGETS, seed=1, save_embeddings=False)
    shutil.copy(tok512, adapter / "tokenizer.model")
    r = run_merge(base, adapter, tmp_path / "out", "huggingface")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "carries no embeddings for its 512-piece tokenizer" in r.stderr, r.stderr
    assert "python -m model.resize" in r.stderr and not (tmp_path / "out").exists()


def test_pth_shards_and_gguf_through_merge_lora(peft_pair, tmp_path, tok512):
    gguf = pytest.importorskip("gguf")
    base, adapter = peft_pair
    tokens = torch.randint(0, ZH_VOCAB, (2, 15))
    theirs_model = peft_merged(base, [(adapter, ZH_VOCAB)])
    with torch.no_grad():
        theirs = theirs_model(tokens).logits
    r = run_merge(base, adapter, tmp_path / "pth", "pth", "--shards", "2")
    assert r.returncode != 0 and "--pad_vocab_to_multiple_of" in r.stderr  # 337 rows in two
    assert not (tmp_path / "pth").exists()
    r = run_merge(base, adapter, tmp_path / "pth", "pth", "--shards", "2", "--pad_vocab_to_multiple_of", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "pth").glob("*.pth")) == ["consolidated.00.pth",
                                                                      "consolidated.01.pth"]
    with torch.no_grad():
        ours = load_model(read_checkpoint(tmp_path / "pth")).eval()(tokens)
    assert ours.shape[-1] == 338 and (ours[..., :ZH_VOCAB] - theirs).abs().max() <= 1e-5

    # GGUF: the base has no tokenizer; nothing may be left behind, and --tokenizer gives one
    r = run_merge(base, adapter, tmp_path / "gguf", "gguf", "--dtype", "f32")
    assert r.returncode != 0 and "pass --tokenizer" in r.stderr and not (tmp_path / "gguf").exists()
    tok = truncated_tokenizer(tok512, BASE_VOCAB, tmp_path / "tok300.model")
    r = run_merge(base, adapter, tmp_path / "gguf", "gguf", "--dtype", "f32", "--tokenizer", tok)
    assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(tmp_path / "gguf" / "model-f32.gguf")
    assert reader.fields["llama.vocab_size"].contents() == ZH_VOCAB
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == ZH_VOCAB  # padded to the rows
    written = {t.name: t for t in reader.tensors}
    theirs_state = theirs_model.state_dict()
    heads = {"wq": 8, "wk": 2}
    for name in read_checkpoint(tmp_path / "pth").specs:
        ref = theirs_state[canonical_to_hf_name(name)]
        kind = name.split(".")[-2]
        if kind in heads:  # GGUF keeps Meta's rotary layout; transformers has HF's
            ref = permute_from_hf(ref, heads[kind])
        got = np.asarray(written[gguf_name(name)].data).reshape(ref.shape)
        assert np.abs(got - ref.numpy()).max() <= 1e-6, name
