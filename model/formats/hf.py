"""Hugging Face Llama directories: `config.json` + safetensors (or `pytorch_model*.bin`).

Two differences from the canonical layout: the names (a rename table), and q/k. Hugging
Face's rotary code rotates the two halves of each head ("rotate_half"), where Meta's
rotates adjacent pairs, so the rows of wq and wk are permuted per head; wk is permuted
with its own head count (n_kv_heads) under grouped-query attention.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from tokenizer.files import Inputs, atomic_output_dir
from tokenizer.hf_files import special_tokens, write_hf_tokenizer_files
from tokenizer.schema import Field, check_fields

from ..llama import ModelArgs, ffn_params_for
from ..source import Checkpoint, check_specs
from ..tensor_io import (
    SAFETENSORS_DTYPES, FormatError, Reopening, TensorSpec, dtype_name, open_safetensors,
    read_json, read_weight_index, safe_torch_load, safetensors_dtype, write_sharded_safetensors,
)
from .options import ReadOptions, WriteOptions, refuse_shards, tensors_as_asked
from .progress import tensor_progress

# Hugging Face's Llama names against ours (Meta's): the one table, read by conversion, by
# the adapter reader (PEFT names modules after Hugging Face) and by the PEFT export.
_PROJECTIONS = {  # inside a block: the linear layers, which LoRA may adapt
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}
_LAYER_NAMES = {
    **_PROJECTIONS,
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_MODULES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
_TOP_NAMES = {f"{hf}.weight": f"{ours}.weight" for hf, ours in _TOP_MODULES.items()}
# PEFT's configs name a module by its last component: target_modules q_proj is our wq,
# modules_to_save embed_tokens our tok_embeddings.
TARGET_ALIASES = {hf.rsplit(".", 1)[-1]: ours.rsplit(".", 1)[-1] for hf, ours in _PROJECTIONS.items()}
MODULE_ALIASES = {hf.rsplit(".", 1)[-1]: ours for hf, ours in _TOP_MODULES.items()}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")
# Buffers some old exports saved; they are recomputed, never loaded.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")
# Hugging Face checkpoints come in any floating dtype, float64 included.
_FLOAT_DTYPES = frozenset(d for d in SAFETENSORS_DTYPES if d.is_floating_point)


def hf_to_canonical_name(name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' → 'layers.3.attention.wq.weight'."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _HF_LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def canonical_to_hf_name(name: str) -> str:
    """Inverse of `hf_to_canonical_name`."""
    for hf, ours in _TOP_NAMES.items():
        if name == ours:
            return hf
    m = _OUR_LAYER.fullmatch(name)
    inverse = {v: k for k, v in _LAYER_NAMES.items()}
    if not m or m.group(2) not in inverse:
        raise KeyError(name)
    return f"model.layers.{m.group(1)}.{inverse[m.group(2)]}.weight"


def rotary_heads(name: str, n_heads: int, n_kv_heads: int) -> int | None:
    """The head count to permute a canonical weight's rows with between the layouts: wq's
    n_heads, wk's n_kv_heads (grouped-query attention), None for every other weight."""
    kind = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return {"wq": n_heads, "wk": n_kv_heads}.get(kind) if name.startswith("layers.") else None


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary rows → Hugging Face's half-split rows, per head.

    Within a head, Meta's rows are pairs (x0, y0, x1, y1, ...); HF wants (x0, x1, ..., y0, y1, ...).
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_to_hf`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# What each key of config.json that we read may hold (the others are transformers' own).
_ROPE_FIELDS = {"rope_type": Field("string", required=False),
                "type": Field("string", required=False),
                "rope_theta": Field("number", above=0, required=False)}
CONFIG_FIELDS = {
    "hidden_size": Field("integer", min=1),
    "num_hidden_layers": Field("integer", min=1),
    "num_attention_heads": Field("integer", min=1),
    "num_key_value_heads": Field("integer", min=1, required=False, nullable=True),
    "intermediate_size": Field("integer", min=1),
    "vocab_size": Field("integer", min=1),
    "head_dim": Field("integer", min=1, required=False, nullable=True),
    "rms_norm_eps": Field("number", above=0, max=1, required=False),
    "rope_theta": Field("number", above=0, required=False),
    "max_position_embeddings": Field("integer", min=1, required=False),
    "hidden_act": Field("string", required=False),
    "attention_bias": Field("boolean", required=False),
    "mlp_bias": Field("boolean", required=False),
    "tie_word_embeddings": Field("boolean", required=False),
    "rope_scaling": Field("object", required=False, nullable=True, fields=_ROPE_FIELDS),
    "rope_parameters": Field("object", required=False, nullable=True, fields=_ROPE_FIELDS),
}


def _rope_theta(config: dict[str, Any]) -> float:
    # transformers 5 writes rope_parameters; earlier versions a top-level rope_theta.
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def args_from_config(config: Any, where: Path) -> ModelArgs:
    """ModelArgs from a LlamaConfig dictionary, refusing variants this model does not run.

    Every key read is checked for its type and range first (`CONFIG_FIELDS`).
    """
    if not isinstance(config, dict):
        raise FormatError(f"{where}: expected a JSON object")
    if config.get("model_type") != "llama":
        raise FormatError(f"{where}: model_type is {config.get('model_type')!r}, not 'llama'")
    check_fields(config, CONFIG_FIELDS, where, FormatError)
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise FormatError(f"{where}: rope scaling {rope} is not supported (LLaMA-1/2 rotary only)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise FormatError(f"{where}: {key}=true is not a LLaMA-1/2 layout")
    if config.get("hidden_act", "silu") != "silu":
        raise FormatError(f"{where}: hidden_act {config['hidden_act']!r} is not silu")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        raise FormatError(f"{where}: head_dim {config['head_dim']} != hidden_size / "
                          f"num_attention_heads ({dim} / {n_heads})")
    multiple_of, multiplier = ffn_params_for(dim, config["intermediate_size"])
    try:
        return ModelArgs(
            dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            vocab_size=config["vocab_size"], multiple_of=multiple_of,
            ffn_dim_multiplier=multiplier, norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(config),
            max_seq_len=config.get("max_position_embeddings", 2048),
        )
    except ValueError as e:  # e.g. hidden_size not divisible by num_attention_heads
        raise FormatError(f"{where}: {e} (from hidden_size, num_attention_heads, "
                          "num_key_value_heads)") from None


def _weight_map(path: Path) -> dict[str, str]:
    """HF tensor name → file name, from an index or the single weights file."""
    for fname in WEIGHT_FILES:
        f = path / fname
        if not f.exists():
            continue
        if fname.endswith(".index.json"):
            return read_weight_index(f)
        if fname.endswith(".safetensors"):
            with open_safetensors(f) as st:
                return {k: fname for k in st.keys()}
        return {k: fname for k in safe_torch_load(f)}
    raise FormatError(f"{path}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


class _HFFiles:
    """Lazy, bounded-memory access to the tensors of one HF directory."""

    def __init__(self, path: Path, weight_map: dict[str, str]) -> None:
        self.path, self.weight_map = path, weight_map
        self._files = {f: Reopening(lambda f=f: self._open(f)) for f in set(weight_map.values())}

    def _open(self, fname: str) -> Any:
        f = self.path / fname
        if not f.exists():
            raise FormatError(f"{f}: listed in the weight index but missing")
        if fname.endswith(".safetensors"):
            return open_safetensors(f)
        return safe_torch_load(f)

    def spec(self, hf_name: str) -> TensorSpec:
        handle = self._files[self.weight_map[hf_name]].get()
        if isinstance(handle, dict):
            t = handle[hf_name]
            return TensorSpec(tuple(t.shape), t.dtype)
        sl = handle.get_slice(hf_name)
        dtype = safetensors_dtype(sl.get_dtype(), _FLOAT_DTYPES, self.path / self.weight_map[hf_name],
                                  hf_name)
        return TensorSpec(tuple(sl.get_shape()), dtype)

    def get(self, hf_name: str) -> torch.Tensor:
        opener = self._files[self.weight_map[hf_name]]
        handle = opener.get(self.spec(hf_name).nbytes)
        try:
            t = handle[hf_name].clone() if isinstance(handle, dict) else handle.get_tensor(hf_name)
        except Exception as e:
            raise FormatError(f"{self.path / self.weight_map[hf_name]}: cannot read {hf_name} ({e})") from None
        opener.account(t.nbytes)
        return t


def read_hf(path: str | Path) -> Checkpoint:
    """Open a Hugging Face Llama directory as a canonical checkpoint (lazily)."""
    path = Path(path)
    config_file = path / "config.json"
    config = read_json(config_file)
    args = args_from_config(config, config_file)
    files = _HFFiles(path, _weight_map(path))
    names: dict[str, str] = {}  # canonical → HF
    for hf_name in files.weight_map:
        ours = hf_to_canonical_name(hf_name)
        if ours is None:
            if _IGNORED.fullmatch(hf_name):
                continue
            raise FormatError(f"{path}: unexpected tensor {hf_name}")
        names[ours] = hf_name
    if "output.weight" not in names and config.get("tie_word_embeddings"):
        names["output.weight"] = names.get("tok_embeddings.weight", "model.embed_tokens.weight")
    specs = check_specs({n: files.spec(h) for n, h in names.items()}, args, path,
                        declared="config.json num_hidden_layers")

    def get(name: str) -> torch.Tensor:
        t = files.get(names[name])
        heads = rotary_heads(name, args.n_heads, args.kv_heads)
        return t if heads is None else permute_from_hf(t, heads)

    tokenizer = path / "tokenizer.model"
    return Checkpoint("hf", path, args, specs, get, tokenizer if tokenizer.exists() else None)


def hf_config(args: ModelArgs, dtype: torch.dtype, tokenizer: Path | None) -> dict[str, Any]:
    """A complete LlamaConfig dictionary, readable by transformers 4.x and 5.x."""
    specials = special_tokens(tokenizer) if tokenizer else {}
    token_id = {k: (v["id"] if v else None) for k, v in specials.items()}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "initializer_range": 0.02,
        "rms_norm_eps": args.norm_eps,
        # Both spellings: rope_theta for transformers 4 and llama.cpp, rope_parameters for 5.
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": args.vocab_size,
        "bos_token_id": token_id.get("bos", 1),
        "eos_token_id": token_id.get("eos", 2),
        "pad_token_id": token_id.get("pad"),
        "torch_dtype": dtype_name(dtype),
        "dtype": dtype_name(dtype),
    }


def write_hf(
    ckpt: Checkpoint,
    dst: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 5 << 30,
    progress: bool = True,
    inputs: Inputs = (),
    template: str | None = None,
) -> Path:
    """Write a Hugging Face directory that `LlamaForCausalLM.from_pretrained` loads as is.

    `dst` may not overlap the checkpoint's own path and tokenizer, nor `inputs`.
    `template`: the SFT template the model was tuned with (`tokenizer.templates`), written
    as the tokenizer's `chat_template`; None: the one the checkpoint records, if any.
    """
    template = template if template is not None else ckpt.template
    args = ckpt.args
    config = hf_config(args, ckpt.main_dtype(), ckpt.tokenizer)
    hf_names = {canonical_to_hf_name(n): n for n in ckpt.specs}
    specs = {h: ckpt.specs[n] for h, n in hf_names.items()}

    def get(hf_name: str) -> torch.Tensor:
        name = hf_names[hf_name]
        t = ckpt.get(name)
        heads = rotary_heads(name, args.n_heads, args.kv_heads)
        return t if heads is None else permute_to_hf(t, heads)

    with atomic_output_dir(dst, overwrite, inputs=(ckpt.path, ckpt.tokenizer, *inputs)) as out, \
            tensor_progress(specs, "hf", progress) as tick:
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        write_sharded_safetensors(out, "model", specs, get, max_shard_bytes,
                                  metadata={"format": "pt"}, on_tensor=tick)
        if ckpt.tokenizer is not None:
            write_hf_tokenizer_files(ckpt.tokenizer, out, model_max_length=args.max_seq_len,
                                     template=template)
    return Path(dst)


# The registry's protocol (model/formats/__init__.py).
def detect(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def read(path: Path, opts: ReadOptions) -> Checkpoint:
    return read_hf(path)


def write(ckpt: Checkpoint, dst: Path, opts: WriteOptions) -> Checkpoint:
    ckpt = tensors_as_asked(ckpt, opts)
    refuse_shards(opts)
    write_hf(ckpt, dst, overwrite=opts.overwrite, max_shard_bytes=opts.max_shard_bytes,
             progress=opts.progress, inputs=opts.inputs, template=opts.template)
    return ckpt
