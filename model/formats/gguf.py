"""GGUF files for llama.cpp, written with llama.cpp's own `gguf` package.

    python -m model.convert MODEL out.gguf --to gguf --dtype f32|f16|q8_0

What goes in: the `llama` architecture's hyper-parameters, the sentencepiece vocabulary
(pieces, scores, token types — padded with unused `[PADn]` entries up to the embedding's
row count, so a padded vocabulary loads), the special token ids and the add-BOS flag, and
the tensors under llama.cpp's names. GGUF keeps Meta's rotary layout, which is ours, so q
and k go in unpermuted (llama.cpp's own converter un-permutes Hugging Face's). Norms stay
float32; with q8_0, a matrix whose rows are not a multiple of the 32-value block falls
back to f16. The file is written tensor by tensor into a temporary path, then renamed.

The SFT template (`--template`, else the one the checkpoint records) goes in as
`tokenizer.chat_template`, the same Jinja text a Hugging Face export carries
(`tokenizer.templates.chat_template`): without it llama.cpp's chat front ends fall back to
a format of their own choosing (llama-cpp-python's is Llama-2's), which a model tuned on
Alpaca's prompt was never shown.

Token types are sentencepiece's own, so an added `<pad>` (a CONTROL piece, see
`tokenizer.merge.add_pad_piece`) is written as CONTROL, and `tokenizer.ggml.padding_token_id`
names it. That is deliberate, not USER_DEFINED: llama.cpp matches user-defined pieces in
any text, so the literal text "<pad>" in a prompt would become the pad id, whereas it
parses control pieces only when asked to parse special tokens — by default "<pad>" is
tokenized as text, exactly as sentencepiece (and our data preparation and HF export) do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenizer.files import Inputs, atomic_output_file
from tokenizer.spm_io import read_proto
from tokenizer.templates import chat_template

from ..source import Checkpoint, pad_vocab
from ..tensor_io import FormatError
from .options import WriteOptions

GGUF_TYPES = ("f32", "f16", "q8_0")
# --dtype as the commands take it → the GGUF type written (default f16)
GGUF_DTYPES = {"float32": "f32", "f32": "f32", "float16": "f16", "f16": "f16", "q8_0": "q8_0"}
_TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
        "output.weight": "output.weight"}
_LAYER = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
          "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate",
          "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
          "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise FormatError("writing GGUF needs llama.cpp's gguf package: pip install 'zhllama[gguf]'") from None
    return gguf


def gguf_name(name: str) -> str:
    """'layers.3.attention.wq.weight' → 'blk.3.attn_q.weight'."""
    if name in _TOP:
        return _TOP[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{_LAYER[rest.removesuffix('.weight')]}.weight"


def _ggml_type(shape: tuple[int, ...], ftype: str, gguf):
    """The GGML type a tensor of this shape is stored as."""
    q = gguf.GGMLQuantizationType
    if len(shape) == 1 or ftype == "f32":  # norms: always f32
        return q.F32
    if ftype == "q8_0" and shape[-1] % 32 == 0:  # Q8_0 packs rows in blocks of 32 values
        return q.Q8_0
    return q.F16


def _encode(t: torch.Tensor, qtype, gguf, chunk_bytes: int = 32 << 20) -> np.ndarray:
    """The bytes of a tensor in its GGML type (a numpy array the writer can dump).

    Cast straight from the checkpoint's dtype (bf16 → f16 is one pass): a float32 copy
    first would double the largest allocation of the export, a 49,953-row embedding.
    Q8_0 quantizes float32 input, so rows are converted a block at a time.
    """
    q = gguf.GGMLQuantizationType
    t = t.detach()
    if qtype != q.Q8_0:
        return t.to(torch.float32 if qtype == q.F32 else torch.float16).numpy()
    rows = t.reshape(-1, t.shape[-1])
    out = np.empty(gguf.quants.quant_shape_to_byte_shape(tuple(rows.shape), qtype), np.uint8)
    step = max(1, chunk_bytes // (4 * rows.shape[1]))
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = gguf.quants.quantize(rows[i:i + step].float().numpy(), qtype)
    return out.reshape(gguf.quants.quant_shape_to_byte_shape(tuple(t.shape), qtype))


def _vocab(tokenizer: Path, n_rows: int, gguf) -> tuple[list[bytes], list[float], list[int], dict]:
    proto = read_proto(tokenizer)
    T = gguf.TokenType
    kinds = {1: T.NORMAL, 2: T.UNKNOWN, 3: T.CONTROL, 4: T.USER_DEFINED, 5: T.UNUSED, 6: T.BYTE}
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(kinds[p.type]) for p in proto.pieces]
    if len(tokens) > n_rows:
        raise FormatError(f"{tokenizer}: {len(tokens)} pieces but the embedding has {n_rows} rows")
    for i in range(1, n_rows - len(tokens) + 1):  # rows added to pad the vocabulary
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(T.UNUSED))
    spec = proto.trainer_spec
    ids = {"unk": spec.unk_id, "bos": spec.bos_id, "eos": spec.eos_id, "pad": spec.pad_id}
    specials = {k: v for k, v in ids.items() if 0 <= v < len(proto.pieces)}
    specials["add_space_prefix"] = proto.normalizer_spec.add_dummy_prefix
    return tokens, scores, types, specials


def _metadata(w, ckpt: Checkpoint, ftype: str, gguf, template: str | None) -> None:
    a = ckpt.args
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    w.add_name(ckpt.path.name if ckpt.path else "zhllama")
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_block_count(a.n_layers)
    w.add_feed_forward_length(a.hidden_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_rope_dimension_count(a.head_dim)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_vocab_size(a.vocab_size)
    w.add_file_type(file_types[ftype])
    if ckpt.tokenizer is None:
        raise FormatError("GGUF needs the model's tokenizer and none was found beside it: "
                          "pass --tokenizer PATH")
    tokens, scores, types, specials = _vocab(ckpt.tokenizer, a.vocab_size, gguf)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for key, add in (("unk", w.add_unk_token_id), ("bos", w.add_bos_token_id),
                     ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        if key in specials:
            add(specials[key])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(specials["add_space_prefix"])
    if template is not None:
        w.add_chat_template(chat_template(template))


def write_gguf(ckpt: Checkpoint, dst: str | Path, ftype: str = "f16", *, overwrite: bool = False,
               progress: bool = True, inputs: Inputs = (), template: str | None = None) -> Path:
    """Write `ckpt` as one GGUF file. Tensor data is streamed: one tensor in memory at a time.

    `dst` may not overlap the checkpoint's own path and tokenizer, nor `inputs`.
    `template`: the SFT template written as the chat template; None: the checkpoint's own
    (`ckpt.template`), if it records one.
    """
    template = template if template is not None else ckpt.template
    if ftype not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {ftype!r}; choose from {', '.join(GGUF_TYPES)}")
    gguf = _gguf()
    with atomic_output_file(dst, overwrite, inputs=(ckpt.path, ckpt.tokenizer, *inputs)) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        _metadata(w, ckpt, ftype, gguf, template)
        types = {n: _ggml_type(spec.shape, ftype, gguf) for n, spec in ckpt.specs.items()}
        for name, spec in ckpt.specs.items():  # the header lists every tensor before any data
            qtype = types[name]
            if qtype == gguf.GGMLQuantizationType.Q8_0:
                shape, np_dtype = gguf.quants.quant_shape_to_byte_shape(spec.shape, qtype), np.uint8
                nbytes = int(np.prod(shape))
            else:
                shape, np_dtype = spec.shape, (np.float32 if qtype == gguf.GGMLQuantizationType.F32
                                               else np.float16)
                nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
            w.add_tensor_info(gguf_name(name), shape, np_dtype, nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name in tqdm(ckpt.specs, desc="writing gguf", unit="tensor", disable=not progress):
            w.write_tensor_data(_encode(ckpt.get(name), types[name], gguf))
        w.close()
    return Path(dst)


# The registry's protocol (model/formats/__init__.py); write only: a GGUF is for llama.cpp.
def write(ckpt: Checkpoint, dst: Path, opts: WriteOptions) -> Checkpoint:
    if opts.dtype is not None and opts.dtype not in GGUF_DTYPES:
        raise ValueError(f"--dtype {opts.dtype} is not a GGUF type; use f32, f16 or q8_0")
    ckpt = pad_vocab(ckpt, opts.pad_vocab_to_multiple_of)
    write_gguf(ckpt, dst, GGUF_DTYPES[opts.dtype or "f16"], overwrite=opts.overwrite,
               progress=opts.progress, inputs=opts.inputs, template=opts.template)
    return ckpt


def file_name(dtype: str | None) -> str:
    """The file written inside an output directory (merge_lora's --output_dir)."""
    return f"model-{GGUF_DTYPES.get(dtype or 'f16', dtype)}.gguf"
