"""Hugging Face tokenizer files: the published keys, EOS as the published SFT script writes
it, and chat templates, checked with the installed transformers (and optionally 4.x)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import CHINESE_ALPACA_VOCAB, CHINESE_LLAMA_VOCAB, SHARED_DATA, require_shared
from tokenizer.hf_files import hf_tokenizer_config, write_hf_tokenizer_files
from tokenizer.merge import MergeOptions, merge
from tokenizer.templates import TEMPLATES, chat_template, format_prompt

TOKENIZERS = SHARED_DATA / "tokenizers"
PUBLISHED = TOKENIZERS / "chinese_llama2_hf"  # Chinese-LLaMA-Alpaca-2's scripts/tokenizer/

# Responses as Chinese-Alpaca's data has them: Chinese, English, newlines, code, digits,
# ending in punctuation, a space or a newline (what precedes "</s>" matters to the split).
OUTPUTS = ["好的。", "李白（701年—762年），字太白。\n他是唐代诗人", "Sure! Here is a list:\n1. one\n2. two",
           "def f(x):\n    return x  ", "结尾是换行\n", "x < y > z", "5"]
INSTRUCTIONS = ["介绍一下北京。", "Translate into English:\n我爱北京天安门", "写一首诗，\n\n主题：春天 🌸",
                "Braces {instruction} and {{x}} stay as they are", "  leading spaces, trailing\n"]
SYSTEM = "你是一个诗人。Answer in verse."

# The keys where our files differ from the published ones, each for a reason given in
# tokenizer/hf_files.py; every other key must hold the published value.
OURS_ONLY = {"legacy", "chat_template", "model_max_length"}
DIFFERENT = {"pad_token", "model_max_length"}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """The published merge with <pad> (49,954), exported with each template."""
    base, zh = TOKENIZERS / "llama_tokenizer.model", TOKENIZERS / "chinese_sp.model"
    require_shared(base, zh, PUBLISHED)
    root = tmp_path_factory.mktemp("hf_tok")
    merge(MergeOptions(llama_tokenizer_dir=base, chinese_sp_model_file=zh,
                       output_dir=root / "merged", add_pad_token=True))
    dirs = {}
    for name in TEMPLATES:
        dirs[name] = root / name
        dirs[name].mkdir()
        write_hf_tokenizer_files(root / "merged" / "tokenizer.model", dirs[name],
                                 model_max_length=4096, template=name)
    return SimpleNamespace(merged=root / "merged", dirs=dirs, root=root)


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_key_has_the_published_value_or_a_stated_reason(export):
    published = read(PUBLISHED / "tokenizer_config.json")
    ours = read(export.dirs["cla_v1"] / "tokenizer_config.json")
    assert "split_special_tokens" not in ours
    assert set(ours) - set(published) <= OURS_ONLY
    assert set(published) - set(ours) <= DIFFERENT
    for key in set(published) & set(ours) - DIFFERENT:
        assert ours[key] == published[key], key
    assert ours["pad_token"] == "<pad>" and ours["model_max_length"] == 4096
    assert ours["legacy"] is True and ours["chat_template"] == chat_template("cla_v1")
    # special_tokens_map.json: the published file exactly (its <pad> is ours too)
    assert read(export.dirs["cla_v1"] / "special_tokens_map.json") == \
        read(PUBLISHED / "special_tokens_map.json")
    # written by the merge (no template, no length): only `legacy` beyond the published keys
    merged = read(export.merged / "tokenizer_config.json")
    assert set(merged) - set(published) == {"legacy"}
    assert read(export.merged / "special_tokens_map.json") == \
        read(PUBLISHED / "special_tokens_map.json")


def test_without_a_pad_piece_no_pad_is_named(shared_data):
    require_shared(TOKENIZERS / "llama_tokenizer.model", PUBLISHED)
    config, token_map = hf_tokenizer_config(TOKENIZERS / "llama_tokenizer.model")
    published = read(PUBLISHED / "tokenizer_config.json")
    assert config["pad_token"] is None is published["pad_token"]
    assert set(token_map) == {"bos_token", "eos_token", "unk_token"}  # no pad_token
    with pytest.raises(ValueError, match="unknown template"):
        hf_tokenizer_config(TOKENIZERS / "llama_tokenizer.model", template="vicuna")


def build_dataset_ids(tok, prompt: str, output: str) -> tuple[list[int], list[int]]:
    """Chinese-LLaMA-Alpaca's build_dataset.py: source with BOS, then
    `f"{output}{tokenizer.eos_token}"` without special tokens."""
    source = tok(prompt, return_attention_mask=False)["input_ids"]
    target = tok(f"{output}{tok.eos_token}", return_attention_mask=False,
                 add_special_tokens=False)["input_ids"]
    return source, target


@pytest.mark.parametrize("use_fast", [False, True])
def test_the_text_eos_appended_to_a_response_is_the_eos_id(export, use_fast):
    """transformers 5 has one Llama tokenizer (its `tokenizers` backend) whatever
    use_fast says; both are asked, as the published scripts ask for the slow one."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(export.dirs["cla_v1"], use_fast=use_fast)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == \
        (1, 2, CHINESE_LLAMA_VOCAB, CHINESE_ALPACA_VOCAB)  # <pad> appended to the 49,953
    for output in OUTPUTS:
        source, target = build_dataset_ids(tok, format_prompt("cla_v1", "问题"), output)
        assert source[0] == 1 and 2 not in source
        assert target[-1] == 2 and target.count(2) == 1, (output, target)
        alone = tok(output, add_special_tokens=False)["input_ids"]
        assert target[:-1] == alone, output  # the text before "</s>" is split as without it


def rendered(tok, messages: list[dict[str, str]], **kw):
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, **kw)


@pytest.mark.parametrize("use_fast", [False, True])
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_template_is_format_prompt(export, name, use_fast):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(export.dirs[name], use_fast=use_fast)
    has_system = "{system}" in TEMPLATES[name].no_input
    for x in INSTRUCTIONS:
        user = [{"role": "user", "content": x}]
        # BOS is part of the text: transformers tokenizes a rendered chat without adding it
        assert rendered(tok, user, tokenize=False) == tok.bos_token + format_prompt(name, x)
        # the ids are the prompt's as training saw them: BOS, then the prompt
        assert rendered(tok, user, tokenize=True) == tok(format_prompt(name, x))["input_ids"]
        with_system = rendered(tok, [{"role": "system", "content": SYSTEM}, *user], tokenize=False)
        expected = format_prompt(name, x, system=SYSTEM) if has_system else format_prompt(name, x)
        assert with_system == tok.bos_token + expected
    assert has_system == (SYSTEM in with_system)


def published_chat_prompt(messages: list[dict[str, str]]) -> str:
    """Chinese-LLaMA-Alpaca-2's openai_api_server.py `generate_chat_prompt`, written out
    (its tokenizer adds the first BOS, shown here as text)."""
    system = next((m["content"] for m in messages if m["role"] == "system"),
                  TEMPLATES["llama2_cla_v2"].default_system)
    prompt, first = "<s>", True
    for m in messages:
        if m["role"] == "user" and first:
            prompt += f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{m['content']} [/INST]"
            first = False
        elif m["role"] == "user":
            prompt += "<s>" + f"[INST] {m['content']} [/INST]"
        elif m["role"] == "assistant":
            prompt += f" {m['content']}" + "</s>"
    return prompt


def test_conversations(export):
    transformers = pytest.importorskip("transformers")
    turns = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"},
             {"role": "user", "content": "写一首诗\n关于春天"}]
    tok = transformers.AutoTokenizer.from_pretrained(export.dirs["llama2_cla_v2"])
    for messages in (turns, [{"role": "system", "content": SYSTEM}, *turns]):
        assert rendered(tok, messages, tokenize=False) == published_chat_prompt(messages)
    # the Alpaca templates: each turn a whole record, as in training (BOS prompt response EOS)
    tok = transformers.AutoTokenizer.from_pretrained(export.dirs["cla_v1"])
    assert rendered(tok, turns, tokenize=False) == (
        f"<s>{format_prompt('cla_v1', '你好')}你好！有什么可以帮你？</s>"
        f"<s>{format_prompt('cla_v1', '写一首诗' + chr(10) + '关于春天')}")
    without = tok.apply_chat_template(turns[:1], add_generation_prompt=False, tokenize=False)
    assert without + "### Response: " == "<s>" + format_prompt("cla_v1", "你好")
    for bad in ([{"role": "assistant", "content": "a"}],
                [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]):
        with pytest.raises(Exception, match="roles must alternate"):
            rendered(tok, bad, tokenize=False)


# Run by the python of another transformers (e.g. 4.35, Chinese-LLaMA-Alpaca-2's pin): it
# imports nothing of ours and reports what that version makes of our files.
_PROBE = r"""
import json, sys
import transformers
cases = json.load(open(sys.argv[1], encoding="utf-8"))
out = {"version": transformers.__version__, "results": []}
for use_fast in (False, True):
    for name, case in cases.items():
        tok = transformers.AutoTokenizer.from_pretrained(case["dir"], use_fast=use_fast)
        target = [tok(o + tok.eos_token, add_special_tokens=False)["input_ids"]
                  for o in case["outputs"]]
        alone = [tok(o, add_special_tokens=False)["input_ids"] for o in case["outputs"]]
        chats = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                 for m in case["chats"]]
        prompts = [tok(p)["input_ids"] for p in case["prompts"]]
        chat_ids = [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True))
                    for m in case["chats"][:len(case["prompts"])]]
        out["results"].append({"name": name, "use_fast": use_fast, "class": type(tok).__name__,
                               "ids": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                       len(tok)],
                               "target": target, "alone": alone, "chats": chats,
                               "prompts": prompts, "chat_ids": chat_ids})
print(json.dumps(out))
"""


def test_another_transformers_reads_our_files_alike(export, tmp_path):
    """Set ZHLLAMA_TRANSFORMERS_4_PYTHON to the python of a venv with e.g. transformers
    4.35, sentencepiece 0.1.99, numpy<2, protobuf 3.20.3 and jinja2 (see the README)."""
    python = os.environ.get("ZHLLAMA_TRANSFORMERS_4_PYTHON")
    if not python:
        pytest.skip("ZHLLAMA_TRANSFORMERS_4_PYTHON is not set")
    cases, expected = {}, {}
    for name in TEMPLATES:
        users = [[{"role": "user", "content": x}] for x in INSTRUCTIONS]
        chats = users + [[{"role": "system", "content": SYSTEM}, *u] for u in users]
        system = SYSTEM if "{system}" in TEMPLATES[name].no_input else None
        cases[name] = {"dir": str(export.dirs[name]), "outputs": OUTPUTS, "chats": chats,
                       "prompts": [format_prompt(name, x) for x in INSTRUCTIONS]}
        expected[name] = ["<s>" + format_prompt(name, x) for x in INSTRUCTIONS] + \
                         ["<s>" + format_prompt(name, x, system=system) for x in INSTRUCTIONS]
    (tmp_path / "cases.json").write_text(json.dumps(cases, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "probe.py").write_text(_PROBE)
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run([python, str(tmp_path / "probe.py"), str(tmp_path / "cases.json")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.splitlines()[-1])
    assert report["version"].startswith("4.")
    assert {res["class"] for res in report["results"]} == {"LlamaTokenizer", "LlamaTokenizerFast"}
    for res in report["results"]:
        where = (res["name"], res["use_fast"])
        assert res["ids"] == [1, 2, CHINESE_LLAMA_VOCAB, CHINESE_ALPACA_VOCAB], where
        for target, alone in zip(res["target"], res["alone"]):
            assert target[-1] == 2 and target.count(2) == 1 and target[:-1] == alone, where
        assert res["chats"] == expected[res["name"]], where
        assert res["chat_ids"] == res["prompts"], where


def test_export_commands_take_the_template(shared_data, tmp_path, capsys):
    """`model.convert --to hf --template` and `model.merge_lora --output_type huggingface|gguf
    --template` write the chat template; other outputs refuse it."""
    from model.convert import main as convert_main
    from model.formats import write_model_dir
    from model.llama import named_args
    from model.merge_lora import main as merge_main
    from model.source import from_state_dict
    from tests.conftest import random_model

    tok = shared_data / "models" / "stories260K" / "tok512.model"
    require_shared(tok)
    args = named_args("tiny", vocab_size=512)  # tok512's pieces (SOURCES.md)
    write_model_dir(from_state_dict(random_model(args).state_dict(), args, tokenizer=tok),
                    tmp_path / "canon", progress=False)
    convert_main([str(tmp_path / "canon"), str(tmp_path / "hf"), "--to", "hf", "--template",
                  "llama2_cla_v2", "--no_progress"])
    config = read(tmp_path / "hf" / "tokenizer_config.json")
    assert config["chat_template"] == chat_template("llama2_cla_v2")
    with pytest.raises(SystemExit):
        convert_main([str(tmp_path / "canon"), str(tmp_path / "meta"), "--to", "meta",
                      "--template", "cla_v1", "--no_progress"])
    assert "--template: a chat template goes into Hugging Face or GGUF output only, not meta" in (
        capsys.readouterr().err)
    assert not (tmp_path / "meta").exists()
    # an adapter of ours over the same base, merged and shipped with its template
    from model.lora import LoRAConfig, adapter_state_dict, apply_lora, save_adapter

    model, lora = random_model(args), LoRAConfig(r=2, alpha=4, targets=("wq",))
    apply_lora(model, lora)
    save_adapter(adapter_state_dict(model, lora), lora, tmp_path / "adapter",
                 base_vocab_size=512, vocab_size=512)
    merge_main(["--base_model", str(tmp_path / "canon"), "--lora_model", str(tmp_path / "adapter"),
                "--output_type", "huggingface", "--output_dir", str(tmp_path / "merged"),
                "--template", "alpaca", "--no_progress"])
    config = read(tmp_path / "merged" / "tokenizer_config.json")
    assert config["chat_template"] == chat_template("alpaca")
    # the same merge shipped to llama.cpp carries the same text (read with llama.cpp's reader)
    gguf = pytest.importorskip("gguf")
    merge_main(["--base_model", str(tmp_path / "canon"), "--lora_model", str(tmp_path / "adapter"),
                "--output_type", "gguf", "--output_dir", str(tmp_path / "gguf"),
                "--template", "alpaca", "--no_progress"])
    reader = gguf.GGUFReader(tmp_path / "gguf" / "model-f16.gguf")
    assert reader.fields["tokenizer.chat_template"].contents() == chat_template("alpaca")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert hf.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  tokenize=False) == "<s>" + format_prompt("alpaca", "Hi")
