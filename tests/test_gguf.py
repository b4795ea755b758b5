"""GGUF export read back with llama.cpp's gguf reader, and (marker `llamacpp`) run in llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

from model.convert import convert
from model.formats import read_checkpoint, write_model_dir
from model.formats.gguf import gguf_name
from model.llama import named_args
from model.source import from_state_dict, load_model
from tests.conftest import random_model
from tests.helpers import CHINESE_ALPACA_VOCAB, CHINESE_LLAMA_VOCAB, SHARED_DATA, require_shared

gguf = pytest.importorskip("gguf")


def field(reader, key):
    return reader.fields[key].contents()


def tensors(reader):
    return {t.name: t for t in reader.tensors}


@pytest.fixture
def stories(stories260k):
    """stories260K as a model directory (read only: outputs go under each test's tmp_path)."""
    return stories260k


def test_f32_gguf_holds_every_tensor_and_key_as_written(stories, tmp_path):
    out = tmp_path / "s.gguf"
    convert(stories, out, "gguf", dtype="f32", progress=False)
    r = gguf.GGUFReader(out)
    ckpt = read_checkpoint(stories)
    a = ckpt.args
    # stories260K's header as SOURCES.md gives it: dim 64, hidden 172, 5 layers, 8 heads,
    # 4 kv heads, seq_len 512 (rotary over head_dim 64 / 8 = 8)
    expected = {
        "general.architecture": "llama", "llama.context_length": 512, "llama.embedding_length": 64,
        "llama.block_count": 5, "llama.feed_forward_length": 172, "llama.attention.head_count": 8,
        "llama.attention.head_count_kv": 4, "llama.rope.dimension_count": 8,
        "llama.rope.freq_base": 10000.0, "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
    }
    for key, value in expected.items():
        assert field(r, key) == value, key
    assert abs(field(r, "llama.attention.layer_norm_rms_epsilon") - a.norm_eps) < 1e-10
    sp = spm.SentencePieceProcessor(model_file=str(ckpt.tokenizer))
    n = sp.vocab_size()
    assert field(r, "tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(n)]
    assert np.allclose(field(r, "tokenizer.ggml.scores"), [sp.get_score(i) for i in range(n)])
    types = field(r, "tokenizer.ggml.token_type")
    # tok512 (SOURCES.md): <unk> 0, <s> 1 and </s> 2 control, byte pieces at ids 3..258
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6} and set(types[259:]) == {1}
    written = tensors(r)
    assert len(written) == len(ckpt.specs)
    for name in ckpt.specs:
        t = written[gguf_name(name)]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(t.data).reshape(ckpt.specs[name].shape), ckpt.get(name).numpy())


def test_q8_0_and_padded_vocabulary(tmp_path, shared_data):
    tok = shared_data / "models" / "stories260K" / "tok512.model"
    args = named_args("tiny", vocab_size=512, dim=64)
    model = random_model(args)
    write_model_dir(from_state_dict(model.state_dict(), args, tokenizer=tok), tmp_path / "m",
                    progress=False)
    out = tmp_path / "q.gguf"
    convert(tmp_path / "m", out, "gguf", dtype="q8_0", pad_vocab_to_multiple_of=96, progress=False)
    r = gguf.GGUFReader(out)
    expected = {
        "general.architecture": "llama", "llama.context_length": 256, "llama.embedding_length": 64,
        "llama.block_count": 2, "llama.feed_forward_length": args.hidden_dim,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 4,
        "llama.rope.dimension_count": 16, "llama.rope.freq_base": 10000.0,
        "llama.vocab_size": 576, "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
    }
    for key, value in expected.items():
        assert field(r, key) == value, key
    assert abs(field(r, "llama.attention.layer_norm_rms_epsilon") - 1e-6) < 1e-12
    assert "tokenizer.ggml.padding_token_id" not in r.fields  # tok512 has no pad piece
    # the vocabulary is padded to the embedding's 576 rows, in every per-token array
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == 576 and tokens[512:515] == ["[PAD1]", "[PAD2]", "[PAD3]"]
    assert len(field(r, "tokenizer.ggml.scores")) == 576
    types = field(r, "tokenizer.ggml.token_type")
    assert len(types) == 576 and set(types[512:]) == {int(gguf.TokenType.UNUSED)}
    written = tensors(r)
    assert [int(n) for n in written["token_embd.weight"].shape] == [64, 576]  # GGML: (cols, rows)
    for name, t in model.state_dict().items():
        g = written[gguf_name(name)]
        if t.ndim == 1:
            assert g.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert g.tensor_type == gguf.GGMLQuantizationType.Q8_0
        back = gguf.quants.dequantize(np.asarray(g.data), g.tensor_type)
        rows = t.shape[0] if "tok_embeddings" not in name and name != "output.weight" else 576
        back = back.reshape(rows, t.shape[1])[: t.shape[0]]
        assert np.abs(back - t.numpy()).max() <= np.abs(t.numpy()).max() / 127 + 1e-6


def test_tensors_are_encoded_without_a_float32_detour_and_exactly():
    """bf16 goes straight to f16, and Q8_0 is quantized a block of rows at a time: both give
    exactly what gguf's own conversion of the whole float32 tensor gives."""
    from model.formats.gguf import _encode

    q = gguf.GGMLQuantizationType
    t = (torch.randn(301, 96, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    whole = t.float().numpy()
    f16 = _encode(t, q.F16, gguf)
    assert f16.dtype == np.float16 and np.array_equal(f16, gguf.quants.quantize(whole, q.F16))
    q8 = _encode(t, q.Q8_0, gguf, chunk_bytes=4096)  # 10 rows a block: 31 blocks, the last short
    assert np.array_equal(q8, gguf.quants.quantize(whole, q.Q8_0))
    assert np.array_equal(_encode(t.float(), q.F32, gguf), whole)


def test_q8_0_falls_back_to_f16_for_odd_rows(stories, tmp_path):
    out = tmp_path / "q.gguf"
    convert(stories, out, "gguf", dtype="q8_0", progress=False)
    written = tensors(gguf.GGUFReader(out))
    assert written["blk.0.ffn_gate.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert written["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # 172 columns


@pytest.mark.llamacpp
def test_llama_cpp_runs_our_gguf_like_we_do(stories, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "s.gguf"
    convert(stories, out, "gguf", dtype="f32", progress=False)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, logits_all=True, verbose=False,
                          type_k=0, type_v=0, n_threads=2, seed=0)  # f32 KV cache
    ours = load_model(read_checkpoint(stories)).eval()
    prompt = [1] + spm.SentencePieceProcessor(model_file=str(stories / "tokenizer.model")).encode(
        "Once upon a time, there was a")
    llm.eval(prompt)
    theirs = torch.tensor(np.array(llm.scores[: len(prompt)]))
    with torch.no_grad():
        mine = ours(torch.tensor([prompt]))[0]
    assert (mine - theirs).abs().max() <= 1e-3
    llm.reset()
    greedy = [t for _, t in zip(range(40), llm.generate(prompt, temp=0.0))]
    from model.generate import SamplingConfig, generate_ids

    assert greedy == list(generate_ids(ours, prompt, 40, SamplingConfig(temperature=0)))[: len(greedy)]


@pytest.fixture(scope="module")
def zh_pad_model(tmp_path_factory):
    """A tiny model over the published Chinese-LLaMA tokenizer merge with `<pad>` appended
    (tokenizer.merge.add_pad_piece), as a zhllama directory."""
    from tokenizer.merge import MergeOptions, merge

    base = SHARED_DATA / "tokenizers" / "llama_tokenizer.model"
    zh = SHARED_DATA / "tokenizers" / "chinese_sp.model"
    require_shared(base, zh)
    tmp = tmp_path_factory.mktemp("zh_pad")
    merge(MergeOptions(llama_tokenizer_dir=base, chinese_sp_model_file=zh, output_dir=tmp / "tok",
                       add_pad_token=True))
    tok = tmp / "tok" / "tokenizer.model"
    args = named_args("tiny", vocab_size=spm.SentencePieceProcessor(model_file=str(tok)).vocab_size())
    write_model_dir(from_state_dict(random_model(args).state_dict(), args, tokenizer=tok),
                    tmp / "m", progress=False)
    return tmp / "m"


def test_pad_token_is_one_id_in_sft_data_hf_export_and_gguf(zh_pad_model, shared_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    sp = spm.SentencePieceProcessor(model_file=str(zh_pad_model / "tokenizer.model"))
    pad = sp.pad_id()
    assert pad == CHINESE_LLAMA_VOCAB and sp.id_to_piece(pad) == "<pad>" and sp.is_control(pad)
    # SFT data: the ids the trainer pads and masks with
    records = json.loads((shared_data / "sft" / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    (tmp_path / "sft.json").write_text(json.dumps(records[:20], ensure_ascii=False), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "data.prepare", "--sft", "--tokenizer",
                        str(zh_pad_model / "tokenizer.model"), "--input", str(tmp_path / "sft.json"),
                        "--output_dir", str(tmp_path / "sft"), "--num_workers", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "sft" / "meta.json").read_text())["special_ids"]["pad"] == pad
    # Hugging Face export: the model's config and the tokenizer transformers builds
    convert(zh_pad_model, tmp_path / "hf", "hf", progress=False)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["pad_token_id"] == pad
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").pad_token_id == pad
    # GGUF: the same id, and the piece stays a CONTROL token (see model/formats/gguf.py)
    convert(zh_pad_model, tmp_path / "zh.gguf", "gguf", dtype="f16", progress=False)
    reader = gguf.GGUFReader(tmp_path / "zh.gguf")
    assert field(reader, "tokenizer.ggml.padding_token_id") == pad
    assert field(reader, "tokenizer.ggml.tokens")[pad] == "<pad>"
    assert field(reader, "tokenizer.ggml.token_type")[pad] == int(gguf.TokenType.CONTROL)
    assert len(field(reader, "tokenizer.ggml.tokens")) == field(reader, "llama.vocab_size") == \
        CHINESE_ALPACA_VOCAB


@pytest.mark.llamacpp
def test_llama_cpp_tokenizes_chinese_like_sentencepiece(zh_pad_model, shared_data, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    # the published Chinese-LLaMA merge (+ pad): its appended pieces all score 0, a tie
    # that llama.cpp must break as sentencepiece does
    sp = spm.SentencePieceProcessor(model_file=str(zh_pad_model / "tokenizer.model"))
    convert(zh_pad_model, tmp_path / "zh.gguf", "gguf", dtype="f16", progress=False)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "zh.gguf"), vocab_only=True, verbose=False)
    assert llm.token_eos() == 2 and llm.n_vocab() == CHINESE_ALPACA_VOCAB
    assert llama_cpp.llama_vocab_pad(llama_cpp.llama_model_get_vocab(llm.model)) == sp.pad_id()
    lines = (shared_data / "corpus" / "lunyu.txt").read_text(encoding="utf-8").splitlines()[:50]
    lines += (shared_data / "corpus" / "cmrc2018_contexts.txt").read_text(encoding="utf-8").splitlines()[:50]
    # "<pad>" as text stays text (the piece is CONTROL, not USER_DEFINED), as in sentencepiece
    lines += ["Hello world, 你好世界! 2023年", "李白（701年—762年），字太白", "text with <pad> in it"]
    for text in lines:
        assert llm.tokenize(text.encode("utf-8"), add_bos=True) == [sp.bos_id()] + sp.encode(text), text
    assert sp.pad_id() not in llm.tokenize(b"text with <pad> in it")


@pytest.mark.parametrize("template", ["alpaca", "llama2_cla_v2"])
def test_llama_cpp_chats_with_the_sft_template(stories, tmp_path, template):
    """The SFT template goes into the GGUF as `tokenizer.chat_template`: llama-cpp-python
    picks it instead of its Llama-2 fallback, its Jinja rendering tokenizes to exactly the
    ids training saw (BOS + format_prompt), and its greedy chat answer is what
    model.generate prints for the same instruction and template."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from model.generate import main as generate_main
    from tokenizer.templates import chat_template, format_prompt

    out = tmp_path / "s.gguf"
    convert(stories, out, "gguf", dtype="f32", progress=False, template=template)
    convert(stories, tmp_path / "plain.gguf", "gguf", dtype="f32", progress=False)
    assert "tokenizer.chat_template" not in gguf.GGUFReader(tmp_path / "plain.gguf").fields
    assert field(gguf.GGUFReader(out), "tokenizer.chat_template") == chat_template(template)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=512, verbose=False, type_k=0, type_v=0,
                          n_threads=2, seed=0)
    assert llm.chat_format == "chat_template.default"
    sp = spm.SentencePieceProcessor(model_file=str(stories / "tokenizer.model"))
    question = "Tell me about the little dog."
    rendered = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>",
                                   bos_token="<s>")(messages=[{"role": "user", "content": question}])
    ids = llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)
    assert ids == [sp.bos_id()] + sp.encode(format_prompt(template, question))
    answer = llm.create_chat_completion([{"role": "user", "content": question}], temperature=0.0,
                                        max_tokens=24)["choices"][0]["message"]["content"]
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        generate_main([str(stories), "--prompt", question, "--template", template, "--temperature", "0",
                       "--max_new_tokens", "24", "--device", "cpu"])
    # generate prints the response and a newline; llama.cpp keeps the space of the first
    # piece (▁...), which generate, decoding the response alone as training encoded it, drops
    assert answer.removeprefix(" ") == printed.getvalue().removesuffix("\n") and len(answer) > 10
