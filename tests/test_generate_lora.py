"""Generation with adapters applied live equals generation from the merged model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from model.adapters import merge_adapter, read_adapter_weights, write_peft_adapter
from model.formats import read_checkpoint, write_model_dir
from model.generate import SamplingConfig, generate_ids, main, open_model
from model.llama import named_args
from model.lora import LoRAConfig, LoRALinear, adapter_state_dict, apply_lora, save_adapter
from model.merge_lora import main as merge_main
from model.source import from_state_dict, load_model
from tests.conftest import SHARED_DATA, random_model, require_shared

PROMPT = "Once upon a time"


def tree_hash(root: Path) -> dict[str, str]:
    """Every file under root (relative path → sha256): what must not change."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_adapter(base_dir: Path, out: Path, cfg: LoRAConfig, seed: int, *, peft: bool = False,
                 applied: tuple[Path, ...] = ()) -> Path:
    """An adapter with non-zero B (and changed saved modules) over the base with `applied` merged.

    Recording that base (`save_adapter(base=...)`) is what a run continuing from the
    earlier adapters would do; merging then checks it. With `peft`, it is rewritten in
    PEFT's layout (which records no base).
    """
    ckpt = read_checkpoint(base_dir, progress=False)
    for path in applied:
        ckpt = merge_adapter(ckpt, read_adapter_weights(path, ckpt.args.n_heads, ckpt.args.kv_heads))
    model = apply_lora(load_model(ckpt).eval(), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.3)
        for name in cfg.modules_to_save:
            weight = model.get_submodule(name).weight
            weight.add_(torch.randn(weight.shape, generator=g) * 0.1)
    vocab = ckpt.args.vocab_size
    ours = out.with_name(out.name + "-ours") if peft else out
    save_adapter(adapter_state_dict(model, cfg), cfg, ours, base_vocab_size=vocab,
                 vocab_size=vocab, base=ckpt)
    return write_peft_adapter(ours, out) if peft else out


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory):
    tok = SHARED_DATA / "models" / "stories260K" / "tok512.model"
    require_shared(tok)
    tmp = tmp_path_factory.mktemp("live")
    args = named_args("tiny")  # 512 rows: tok512's pieces
    base = tmp / "inputs" / "base"
    write_model_dir(from_state_dict(random_model(args, std=0.3).state_dict(), args, tokenizer=tok),
                    base, progress=False)
    a = make_adapter(base, tmp / "inputs" / "a", LoRAConfig(
        r=4, alpha=8, dropout=0.0, targets=("wq", "wv", "w2"), modules_to_save=("output",)), seed=1)
    b = make_adapter(base, tmp / "inputs" / "b", LoRAConfig(
        r=2, alpha=8, dropout=0.0, targets=("wk", "wo", "w1", "w3")), seed=2, peft=True, applied=(a,))
    return tmp, base, a, b


def greedy(ckpt, sp, n: int = 24) -> list[int]:
    ids = [sp.bos_id()] + sp.encode(PROMPT)
    model = load_model(ckpt).eval()
    return list(generate_ids(model, ids, n, SamplingConfig(temperature=0), stop_ids=(sp.eos_id(),),
                             allowed_vocab=sp.vocab_size()))


def run_generate(capsys, model: Path, *extra: str) -> str:
    capsys.readouterr()
    main([str(model), "--prompt", PROMPT, "--temperature", "0", "--max_new_tokens", "24",
          "--device", "cpu", *extra])
    return capsys.readouterr().out


def test_live_adapters_generate_as_the_merged_model_and_write_nothing(base_and_adapters, capsys):
    import sentencepiece as spm

    tmp, base, a, b = base_and_adapters
    inputs = tmp / "inputs"
    before = tree_hash(inputs)
    live = run_generate(capsys, base, "--lora_model", f"{a},{b}")
    # no merged model, no cache, no other file beside the inputs or in them
    assert tree_hash(inputs) == before and sorted(tmp.iterdir()) == [inputs]

    merge_main(["--base_model", str(base), "--lora_model", f"{a},{b}", "--output_type", "zhllama",
                "--output_dir", str(tmp / "merged"), "--no_progress"])
    assert run_generate(capsys, tmp / "merged") == live

    sp = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    ids = greedy(open_model(base, [a, b]), sp)
    assert ids == greedy(read_checkpoint(tmp / "merged"), sp)
    assert live == sp.decode([sp.bos_id()] + sp.encode(PROMPT) + ids) + "\n"
    # the adapters matter, and their order: each gives another continuation
    assert run_generate(capsys, base) != live
    assert run_generate(capsys, base, "--lora_model", str(a)) != live
    assert ids != greedy(open_model(base, [a]), sp)
    assert tree_hash(inputs) == before


def test_live_adapters_are_checked_as_merge_checks_them(base_and_adapters, capsys):
    tmp, base, a, b = base_and_adapters
    with pytest.raises(SystemExit) as e:
        main([str(base), "--lora_model", str(tmp / "nowhere"), "--prompt", "x"])
    assert e.value.code == 1
    assert "nowhere: no such adapter directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(base), "--lora_model", " , ", "--prompt", "x"])
    assert "--lora_model: no adapter directory given" in capsys.readouterr().err
    # b-ours was trained over base + a: over the bare base it is refused, unless forced
    with pytest.raises(SystemExit):
        run_generate(capsys, base, "--lora_model", str(tmp / "inputs" / "b-ours"))
    err = capsys.readouterr().err
    assert "trained on another base" in err and "--force_base" in err
    out = run_generate(capsys, base, "--lora_model", str(tmp / "inputs" / "b-ours"), "--force_base")
    assert out.startswith(PROMPT)
