"""data.prepare --sft: templates to the character, prompt lengths, EOS kept when truncating,
field maps (BELLE), bad records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from data.datasets import SFTDataset
from data.prepare import parse_options, prepare
from data.sft import Record, encode_sample
from data.shards import DataError
from tokenizer.templates import TEMPLATES, format_prompt

REPO = Path(__file__).resolve().parents[1]
HEAD = "Below is an instruction that describes a task. Write a response that appropriately " \
       "completes the request.\n\n"


@pytest.fixture
def tok(shared_data: Path) -> Path:
    """Chinese-LLaMA-2's tokenizer (55,296 pieces), the one its SFT template was used with."""
    return shared_data / "tokenizers" / "chinese_llama2_hf" / "tokenizer.model"


def run(*args) -> dict:
    return prepare(parse_options(["--sft", *map(str, args)]))


def test_templates_exact():
    assert format_prompt("cla_v1", "翻译") == HEAD + "### Instruction:\n翻译\n\n### Response: "
    assert format_prompt("cla_v1", "翻译", "hello") == HEAD + "### Instruction:\n翻译\nhello\n\n### Response: "
    # Stanford Alpaca's PROMPT_DICT (train.py): no newline after "### Response:"
    assert format_prompt("alpaca", "Add") == HEAD + "### Instruction:\nAdd\n\n### Response:"
    assert format_prompt("alpaca", "Add", "1, 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd\n\n### Input:\n1, 2\n\n### Response:")
    assert format_prompt("llama2_cla_v2", "你好") == (
        "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n你好 [/INST]")
    assert format_prompt("llama2_cla_v2", "你好", "世界", system="{x}") == (
        "[INST] <<SYS>>\n{x}\n<</SYS>>\n\n你好\n世界 [/INST]")
    assert format_prompt("cla_v1", "用{花括号}").count("{花括号}") == 1
    with pytest.raises(ValueError, match="unknown template"):
        format_prompt("vicuna", "x")


def template_ends(template: str) -> list[tuple[str, str]]:
    """(text before the user content, text after it) with and without an input."""
    no_input = format_prompt(template, "\0").split("\0")
    with_input = format_prompt(template, "\0", "\1")
    return [tuple(no_input), (with_input.split("\0")[0], with_input.split("\1")[1])]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_prompt_lengths_and_eos_on_alpaca_zh(tok, shared_data, tmp_path, template):
    src = shared_data / "sft" / "alpaca_zh_demo.json"
    limit = 128
    meta = run("--template", template, "--tokenizer", tok, "--input", src,
               "--output_dir", tmp_path / "s", "--max_seq_length", limit)
    records = json.loads(src.read_text(encoding="utf-8"))
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    data = SFTDataset(tmp_path / "s")
    assert meta["kind"] == "sft" and meta["options"]["template"] == template
    assert len(records) == 1000  # SOURCES.md: 1000 records, none with an empty output
    assert meta["options"]["max_seq_length"] == limit and len(data.starts) == len(records)
    truncated = 0
    for i, r in enumerate(records):
        tokens, plen = data.sample(i)
        tokens = tokens.tolist()
        assert tokens[0] == 1 and tokens[-1] == 2 and len(tokens) <= limit  # EOS kept, always
        assert tokens.count(1) == 1 and tokens.count(2) == 1 and 1 < plen < len(tokens)
        prompt = format_prompt(template, r["instruction"], r["input"])
        target = sp.encode(r["output"]) + [2]
        if len(sp.encode(prompt)) + 1 + len(target) <= limit:
            assert tokens[1:plen] == sp.encode(prompt) and sp.decode(tokens[1:plen]) == prompt
            assert tokens[plen:] == target
            continue
        truncated += 1
        kept = tokens[plen:-1]
        assert kept == target[: len(kept)] and len(kept) + 1 >= min(len(target), limit // 2)
        text = sp.decode(tokens[1:plen])  # the template around shortened user content is whole
        assert any(text.startswith(head) and text.endswith(tail) for head, tail in template_ends(template))
    assert truncated == meta["truncated"] > 50


def sample(sp, instruction: str, input: str, output: str, limit: int, template: str = "cla_v1"):
    opts = {"template": template, "max_seq_length": limit, "system_prompt": None}
    tokens, plen, cut = encode_sample(sp, Record("test", instruction, input, output), opts)
    return tokens, plen, cut


def test_truncation_rules(tok):
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    long_text = "长文本" * 200
    # a long input goes first; the instruction stays whole while that suffices
    tokens, plen, cut = sample(sp, "总结下文", long_text, "好的", 96)
    prompt = sp.decode(tokens[1:plen])
    assert cut and len(tokens) <= 96 and tokens[plen:] == sp.encode("好的") + [2]
    assert prompt.startswith(HEAD + "### Instruction:\n总结下文\n长文本") and prompt.endswith("### Response: ")
    assert len(tokens) >= 90  # the bisection leaves little room unused
    # a long response keeps at least half of the budget, and its EOS
    tokens, plen, cut = sample(sp, "写一篇长文", "", long_text, 96)
    assert cut and len(tokens) == 96 and tokens[-1] == 2
    assert tokens[plen:-1] == sp.encode(long_text)[: 96 - plen - 1]
    # both long: the response gets 48 tokens (EOS included), the prompt the rest
    tokens, plen, cut = sample(sp, long_text, long_text, long_text, 96)
    assert cut and len(tokens) == 96 and len(tokens) - plen == 48 and tokens[-1] == 2
    assert sp.decode(tokens[1:plen]).endswith("\n\n### Response: ")
    # too short for the template itself: one clear error
    with pytest.raises(DataError, match="no room for the template"):
        sample(sp, long_text, "", "好的", 16)


def test_belle_eval_set_through_field_map(tok, shared_data, tmp_path):
    src = shared_data / "sft" / "belle_eval_set.jsonl"
    meta = run("--tokenizer", tok, "--input", src, "--output_dir", tmp_path / "eval",
               "--field_map", "instruction=question,output=std_answer")
    assert meta["num_documents"] == 631 and meta["skipped"] == {"no_response": 369}
    first = json.loads(src.read_text(encoding="utf-8").split("\n")[0])
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    tokens, plen = SFTDataset(tmp_path / "eval").sample(0)
    assert sp.decode(tokens[1:plen].tolist()) == format_prompt("cla_v1", first["question"])


def test_belle_seed_tasks_through_dotted_paths(tok, shared_data, tmp_path):
    src = shared_data / "sft" / "belle_zh_seed_tasks.jsonl"
    meta = run("--template", "llama2_cla_v2", "--tokenizer", tok, "--input", src,
               "--output_dir", tmp_path / "seed", "--system_prompt", "你是助手。", "--field_map",
               "instruction=instruction,input=instances.0.input,output=instances.0.output")
    assert meta["num_documents"] == 175 and meta["skipped"] == {}
    records = [json.loads(line) for line in src.read_text(encoding="utf-8").split("\n") if line]
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    data = SFTDataset(tmp_path / "seed")
    for i in (0, 100, 174):
        r, (tokens, plen) = records[i], data.sample(i)
        inst = r["instances"][0]
        assert tokens[1:plen].tolist() == sp.encode(
            format_prompt("llama2_cla_v2", r["instruction"], inst["input"], "你是助手。"))
        assert tokens[plen:].tolist() == sp.encode(inst["output"]) + [2]


@pytest.mark.parametrize("name, content, args, message", [
    ("a.json", '[{"instruction": "a", "output": "b"},\n {"question": "c", "output": "d"}]', [],
     "a.json record 1: no 'instruction' field (map it with --field_map)"),
    ("a.jsonl", '{"instruction": "a", "output": "b"}\n{"question": "c", "output": "d"}\n', [],
     "a.jsonl:2: no 'instruction' field"),
    ("a.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": 5}\n', [],
     "a.jsonl:3: field 'output' is int, not text"),
    ("a.json", '[{"instruction": "a",\n  "output": "b",}]', [], "a.json:2: invalid JSON"),
    ("a.json", '{"instruction": "a", "output": "b"}', [], "expected a JSON list of records"),
    ("a.jsonl", '{"q": "a", "output": ""}\n{"q": "b"}\n', ["--field_map", "instruction=q"],
     "no documents in"),
    ("a.jsonl", '{"instruction": "a", "output": "b"}\n', ["--field_map", "prompt=q"],
     "--field_map: 'prompt=q' is not one of instruction, input, output=FIELD"),
    ("a.txt", "x\n", [], "unsupported input type"),
    # a mistyped field name is one error, not a thousand skipped records
    ("a.jsonl", '{"instruction": "a", "output": "b"}\n', ["--field_map", "output=answer"],
     "a.jsonl: no record has a 'answer' field (name the output field with --field_map output=FIELD)"),
    ("a.jsonl", '{"instruction": "a", "output": "b"}\n', ["--field_map", "input=context"],
     "a.jsonl: no record has a 'context' field"),
])
def test_bad_records(tok, tmp_path, name, content, args, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as e:
        run("--tokenizer", tok, "--input", tmp_path / name, "--output_dir", tmp_path / "out", *args)
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_bad_records_cli(tok, tmp_path):
    """The command line: one message with file and line, no traceback, nothing written."""
    (tmp_path / "a.jsonl").write_bytes('{"instruction": "好", "output": "对"}\n'.encode() + b'{"instruction": "\xff"}\n')
    r = subprocess.run([sys.executable, "-m", "data.prepare", "--sft", "--tokenizer", str(tok),
                        "--input", str(tmp_path / "a.jsonl"), "--output_dir", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and "a.jsonl:2: not valid UTF-8" in r.stderr
    assert "Traceback" not in r.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_empty_records_are_skipped_and_counted(tok, tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([
        {"instruction": "一", "input": "", "output": "甲"},
        {"instruction": " ", "input": "x", "output": "乙"},
        {"instruction": "三", "output": "  "},
        {"instruction": "四", "input": None, "output": "丁"},
    ]), encoding="utf-8")
    meta = run("--tokenizer", tok, "--input", tmp_path / "a.json", "--output_dir", tmp_path / "o")
    assert meta["num_documents"] == 2 and meta["skipped"] == {"no_instruction": 1, "no_response": 1}
    assert meta["truncated"] == 0 and meta["files"][0]["plen"] == "tokens-00000.plen"


def test_undecodable_lines_replace_and_skip(tok, tmp_path):
    good = '{"instruction": "好", "output": "对"}\n'.encode()
    bad = b'{"instruction": "\xff\xfe", "output": "x"}\n'
    (tmp_path / "a.jsonl").write_bytes(good + bad + b'{"instruction": "c", "output": oops}\n')
    with pytest.raises(DataError, match=r"a.jsonl:3: invalid JSON"):  # line numbers survive a skip
        run("--tokenizer", tok, "--input", tmp_path / "a.jsonl", "--output_dir", tmp_path / "o",
            "--errors", "skip")
    (tmp_path / "a.jsonl").write_bytes(good + bad + good)
    meta = run("--tokenizer", tok, "--input", tmp_path / "a.jsonl", "--output_dir", tmp_path / "s",
               "--errors", "skip")
    assert meta["num_documents"] == 2 and meta["skipped"] == {"undecodable_lines": 1}
    meta = run("--tokenizer", tok, "--input", tmp_path / "a.jsonl", "--output_dir", tmp_path / "r",
               "--errors", "replace")
    assert meta["num_documents"] == 3 and meta["skipped"] == {"undecodable_lines": 1}
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    tokens, plen = SFTDataset(tmp_path / "r").sample(1)
    assert "\ufffd\ufffd" in sp.decode(tokens[:plen].tolist())
    # a JSON list cannot lose a line: skip is refused there, replace works
    (tmp_path / "b.json").write_bytes(b"[" + bad.strip() + b"]")
    with pytest.raises(DataError, match="use --errors replace for a JSON list"):
        run("--tokenizer", tok, "--input", tmp_path / "b.json", "--output_dir", tmp_path / "b",
            "--errors", "skip")
    assert run("--tokenizer", tok, "--input", tmp_path / "b.json", "--output_dir", tmp_path / "b",
               "--errors", "replace")["num_documents"] == 1
