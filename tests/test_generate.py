"""Sampling rules against transformers' logits processors, and the generation loop."""

from __future__ import annotations

import pytest
import torch

from model.generate import (
    SamplingConfig, apply_repetition_penalty, filter_top_k_top_p, generate_ids, stream_text,
)
from model.llama import named_args
from tests.conftest import random_model

transformers = pytest.importorskip("transformers")


def test_top_k_and_top_p_match_transformers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    for _ in range(20):
        logits = torch.randn(200) * 3
        ours = filter_top_k_top_p(logits, 17, None)
        theirs = TopKLogitsWarper(17)(None, logits[None].clone())[0]
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        ours = filter_top_k_top_p(logits, None, 0.8)
        theirs = TopPLogitsWarper(0.8)(None, logits[None].clone())[0]
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(50)
    seen = torch.tensor([3, 7, 7, 20])
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(seen[None], logits[None].clone())[0]
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), theirs)


def test_sampling_is_seeded_and_stops_at_eos():
    model = random_model(named_args("tiny"), std=0.3)
    cfg = SamplingConfig(temperature=1.0, top_k=50)

    def run(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return list(generate_ids(model, [1], 30, cfg, generator=g))

    assert run(5) == run(5)
    assert run(5) != run(6)
    greedy = list(generate_ids(model, [1, 5, 9], 30, SamplingConfig(temperature=0)))
    stop = greedy[3]
    stopped = list(generate_ids(model, [1, 5, 9], 30, SamplingConfig(temperature=0), stop_ids=(stop,)))
    assert stopped == greedy[: greedy.index(stop)]


def test_generation_never_exceeds_max_seq_len_or_padded_vocab():
    model = random_model(named_args("tiny", max_seq_len=20), std=0.3)
    ids = list(generate_ids(model, [1, 2, 3], 100, SamplingConfig(temperature=1.0),
                            allowed_vocab=100, generator=torch.Generator().manual_seed(0)))
    assert len(ids) == 17 and max(ids) < 100
    with pytest.raises(ValueError, match="at least one token"):
        list(generate_ids(model, [], 5))


def test_stream_text_waits_for_whole_characters(shared_data):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(shared_data / "tokenizers" / "llama_tokenizer.model"))
    text = "Hello 世界 🦙 and 㐀 rare"
    ids = sp.encode(text)
    pieces = list(stream_text(sp, iter(ids)))
    assert "".join(pieces) == sp.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_interactive_and_help(shared_data, tmp_path):
    import subprocess
    import sys

    from model.convert import convert

    src = shared_data / "models" / "stories260K"
    convert(src / "stories260K.bin", tmp_path / "m", "zhllama", tokenizer=src / "tok512.model",
            progress=False)
    r = subprocess.run([sys.executable, "-m", "model.generate", str(tmp_path / "m"), "--interactive",
                        "--temperature", "0", "--max_new_tokens", "20"],
                       input="Once upon a time\nThe dog\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Once upon a time") and lines[1].startswith("The dog")
    for module in ("model.generate", "model.resize", "model.convert", "train.recipe"):
        h = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
        assert h.returncode == 0 and "usage:" in h.stdout, module


def test_template_wraps_the_instruction_and_prints_the_response(shared_data, tmp_path):
    import subprocess
    import sys

    import sentencepiece as spm

    from model.convert import convert
    from model.formats import read_checkpoint
    from model.source import load_model
    from tokenizer.templates import format_prompt

    src = shared_data / "models" / "stories260K"
    convert(src / "stories260K.bin", tmp_path / "m", "zhllama", tokenizer=src / "tok512.model",
            progress=False)
    r = subprocess.run([sys.executable, "-m", "model.generate", str(tmp_path / "m"), "--template",
                        "alpaca", "--prompt", "Tell a story.", "--temperature", "0",
                        "--max_new_tokens", "12"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    sp = spm.SentencePieceProcessor(model_file=str(src / "tok512.model"))
    ids = [sp.bos_id()] + sp.encode(format_prompt("alpaca", "Tell a story."))
    model = load_model(read_checkpoint(tmp_path / "m")).eval()
    out = list(generate_ids(model, ids, 12, SamplingConfig(temperature=0), stop_ids=(sp.eos_id(),)))
    assert r.stdout == sp.decode(out) + "\n" and "### Instruction" not in r.stdout


@pytest.fixture(scope="module")
def llama_vocab_model(tmp_path_factory):
    """A tiny random model over LLaMA's 32,000 pieces, its Hugging Face export, and the
    English prompt whose greedy continuation starts with a ▁ piece (the space at stake)."""
    import sentencepiece as spm

    from model.convert import convert
    from model.formats import write_model_dir
    from model.source import from_state_dict
    from tests.conftest import SHARED_DATA, require_shared

    tok = SHARED_DATA / "tokenizers" / "llama_tokenizer.model"
    require_shared(tok)
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    args = named_args("tiny", vocab_size=sp.vocab_size())
    tmp = tmp_path_factory.mktemp("llama-vocab")
    for seed in range(20):  # a random model: find one whose continuation shows the space
        model = random_model(args, seed=seed, std=0.3)
        first = greedy_continuation(model, sp, "The cat", 1)
        if first and sp.id_to_piece(first[0]).startswith("▁"):
            break
    else:
        pytest.fail("no seed gave a continuation starting with ▁")
    write_model_dir(from_state_dict(model.state_dict(), args, tokenizer=tok), tmp / "m", progress=False)
    convert(tmp / "m", tmp / "hf", "hf", progress=False)
    return tmp / "m", tmp / "hf", sp


def greedy_continuation(model, sp, text: str, n: int, template: str | None = None) -> list[int]:
    from tokenizer.templates import format_prompt

    prompt = format_prompt(template, text) if template else text
    return list(generate_ids(model, [sp.bos_id()] + sp.encode(prompt), n, SamplingConfig(temperature=0),
                             stop_ids=(sp.eos_id(),), allowed_vocab=sp.vocab_size()))


@pytest.mark.parametrize("prompt", ["The cat", "我爱北京天安门，"])
def test_printed_text_is_prompt_and_continuation_decoded_together(llama_vocab_model, prompt, capsys):
    from model.formats import read_checkpoint
    from model.generate import main
    from model.source import load_model

    model_dir, hf_dir, sp = llama_vocab_model
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = load_model(read_checkpoint(model_dir)).eval()
    ids = [sp.bos_id()] + sp.encode(prompt)
    gen = greedy_continuation(model, sp, prompt, 16)
    capsys.readouterr()
    main([str(model_dir), "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "16",
          "--device", "cpu"])
    out = capsys.readouterr().out
    assert len(gen) > 3 and out == sp.decode(ids + gen) + "\n"
    assert out == hf.decode(ids + gen, skip_special_tokens=True) + "\n"
    assert out.startswith(prompt)
    if prompt == "The cat":  # what decoding the continuation alone printed: "The catand …"
        assert out.startswith("The cat ") and out != prompt + sp.decode(gen) + "\n"

    # With a template only the response is printed, decoded alone as training encoded it
    # (`sp.encode(output)`): as transformers' decode of the response ids.
    capsys.readouterr()
    main([str(model_dir), "--prompt", prompt, "--template", "cla_v1", "--temperature", "0",
          "--max_new_tokens", "16", "--device", "cpu"])
    response = greedy_continuation(model, sp, prompt, 16, template="cla_v1")
    out = capsys.readouterr().out
    assert out == sp.decode(response) + "\n" == hf.decode(response, skip_special_tokens=True) + "\n"


def test_stream_text_joins_to_the_decoding_of_prefix_and_ids(shared_data):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(shared_data / "tokenizers" / "llama_tokenizer.model"))
    prefix = [sp.bos_id()] + sp.encode("The cat")
    for text in (" and a boy 世界", "世界 🦙"):
        ids = sp.encode(text)
        ids = ids[1:] if sp.id_to_piece(ids[0]) == "▁" else ids  # as a model continues: no dummy ▁
        for cut in range(len(ids) + 1):  # also ending inside a character (byte fallback)
            pieces = list(stream_text(sp, iter(ids[:cut]), prefix))
            assert "".join(pieces) == sp.decode(prefix + ids[:cut])
            assert pieces[0] == "The cat" and all("\ufffd" not in p for p in pieces[1:-1])
