"""The SFT template travels with what is trained on SFT data: adapter_config.json, the
model directory's manifest, and the chat_template of every Hugging Face export made from
them (merge_lora, convert), unless --template says otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.shards import read_meta
from model.formats import read_checkpoint
from model.tensor_io import FormatError
from tests.conftest import random_model
from tests.helpers import run, train_cmd
from tokenizer.templates import chat_template, format_prompt

STEPS = ["--optim.max_steps=1", "--checkpoint.every=0", "--optim.warmup_steps=0"]
PROMPT = "续写：今天天气很好"


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def sft(world, tmp_path_factory) -> Path:
    """One SFT step on the world's data (prepared with the default template)."""
    out = tmp_path_factory.mktemp("sft")
    run(train_cmd("sft", "sft.yaml", world, out, *STEPS))
    return out / "adapter"


def merge(*argv: str, capsys=None) -> str:
    from model.merge_lora import main

    main([*argv, "--no_progress"])
    return capsys.readouterr().err if capsys is not None else ""


def rendered(hf_dir: Path) -> tuple[str, str]:
    """(what the exported tokenizer's chat template makes of one user message, its BOS)."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                   add_generation_prompt=True, tokenize=False)
    return text, tok.bos_token


def test_sft_adapter_records_the_data_template(world, sft):
    template = read_meta(world / "sft")["options"]["template"]
    assert template == "cla_v1"  # data.prepare's default
    assert read(sft / "adapter_config.json")["template"] == template
    assert read_checkpoint(world / "base").template is None  # nothing recorded for the base


def test_merged_export_writes_the_adapter_template(world, sft, tmp_path, capsys):
    merge("--base_model", str(world / "base"), "--lora_model", str(sft),
          "--output_type", "huggingface", "--output_dir", str(tmp_path / "hf"))
    assert read(tmp_path / "hf" / "tokenizer_config.json")["chat_template"] == chat_template("cla_v1")
    text, bos = rendered(tmp_path / "hf")
    assert text == bos + format_prompt("cla_v1", PROMPT)  # BOS is part of the rendered text
    # an explicit --template wins, with a note that it differs from the recorded one
    err = merge("--base_model", str(world / "base"), "--lora_model", str(sft), "--output_type",
                "huggingface", "--output_dir", str(tmp_path / "hf2"), "--template", "alpaca",
                capsys=capsys)
    assert "--template alpaca instead of cla_v1" in err
    text, bos = rendered(tmp_path / "hf2")
    assert text == bos + format_prompt("alpaca", PROMPT)


def test_merged_model_dir_keeps_it_for_convert(world, sft, tmp_path):
    from model.convert import main as convert_main

    merge("--base_model", str(world / "base"), "--lora_model", str(sft),
          "--output_type", "zhllama", "--output_dir", str(tmp_path / "merged"))
    assert read(tmp_path / "merged" / "zhllama.json")["template"] == "cla_v1"
    assert read_checkpoint(tmp_path / "merged").template == "cla_v1"
    convert_main([str(tmp_path / "merged"), str(tmp_path / "hf"), "--to", "hf", "--no_progress"])
    text, bos = rendered(tmp_path / "hf")
    assert text == bos + format_prompt("cla_v1", PROMPT)
    convert_main([str(tmp_path / "merged"), str(tmp_path / "hf2"), "--to", "hf", "--template",
                  "llama2_cla_v2", "--no_progress"])
    text, bos = rendered(tmp_path / "hf2")
    assert text == bos + format_prompt("llama2_cla_v2", PROMPT)
    # other formats have no place for it and are written as before
    convert_main([str(tmp_path / "merged"), str(tmp_path / "meta"), "--to", "meta", "--no_progress"])
    assert not (tmp_path / "meta" / "tokenizer_config.json").exists()


def small_adapter(world: Path, out: Path, template: str | None) -> Path:
    """A LoRA on wq over the world's base, as another run might have saved it."""
    from model.lora import LoRAConfig, adapter_state_dict, apply_lora, save_adapter

    args = read_checkpoint(world / "base").args
    model, lora = random_model(args), LoRAConfig(r=2, alpha=4, targets=("wq",))
    apply_lora(model, lora)
    return save_adapter(adapter_state_dict(model, lora), lora, out, base_vocab_size=args.vocab_size,
                        vocab_size=args.vocab_size, template=template)


def test_the_last_adapter_with_a_template_wins(world, sft, tmp_path, capsys):
    untuned = small_adapter(world, tmp_path / "untuned", None)
    alpaca = small_adapter(world, tmp_path / "alpaca", "alpaca")
    err = merge("--base_model", str(world / "base"), "--lora_model", f"{sft},{untuned}",
                "--output_type", "zhllama", "--output_dir", str(tmp_path / "one"), capsys=capsys)
    assert read(tmp_path / "one" / "zhllama.json")["template"] == "cla_v1"
    assert "template" not in err
    err = merge("--base_model", str(world / "base"), "--lora_model", f"{sft},{alpaca},{untuned}",
                "--output_type", "zhllama", "--output_dir", str(tmp_path / "two"), capsys=capsys)
    assert read(tmp_path / "two" / "zhllama.json")["template"] == "alpaca"
    notes = [line for line in err.splitlines() if "template" in line]
    assert len(notes) == 1 and "alpaca" in notes[0] and "cla_v1" in notes[0], err


def test_a_full_sft_model_records_it_and_pretraining_none(world, tmp_path):
    run(train_cmd("sft", "sft.yaml", world, tmp_path / "full", *STEPS, "--stage=full"))
    assert read(tmp_path / "full" / "model" / "zhllama.json")["template"] == "cla_v1"
    run(train_cmd("pretrain", "stage2.yaml", world, tmp_path / "pt", *STEPS, "--data.block_size=32"))
    assert read(tmp_path / "pt" / "adapter" / "adapter_config.json")["template"] is None


def test_an_unknown_template_is_refused_by_name(world, sft, tmp_path):
    from model.adapters import read_adapter_weights
    from model.formats.zhllama import read_template

    (tmp_path / "zhllama.json").write_text(json.dumps({"template": "vicuna"}))
    with pytest.raises(FormatError, match=r"zhllama.json: template: expected one of"):
        read_template(tmp_path)
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        small_adapter(world, tmp_path / "bad", "vicuna")
    config = read(sft / "adapter_config.json")
    bad = tmp_path / "edited"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({**config, "template": "vicuna"}))
    (bad / "adapter_model.safetensors").write_bytes((sft / "adapter_model.safetensors").read_bytes())
    with pytest.raises(FormatError, match="adapter_config.json: template: expected one of"):
        read_adapter_weights(bad, 4, 4)
