"""Adapters from disk — ours or PEFT's — merged into a checkpoint, and ours written as PEFT's.

    python -m model.adapters ADAPTER_DIR OUT_DIR --format peft   # ours → PEFT (for peft users)

An adapter, whatever its origin, becomes `AdapterWeights`: per canonical weight name the
LoRA factors A (r, in), B (out, r) in Meta's rotary layout and their scaling, and the
tensors that replace the base's whole (PEFT's `modules_to_save`, e.g. embeddings grown
to 49,953 rows). `merge_adapter` then folds it into a `Checkpoint` lazily, tensor by
tensor: W' = W + scaling · B·A, computed in float32.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tokenizer.files import atomic_output_dir

from .checkpoint import Checkpoint
from .formats.hf import canonical_to_hf_name, hf_to_canonical_name, permute_from_hf, permute_to_hf
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TARGET_ALIASES
from .tensor_io import FormatError, TensorSpec, read_json, safe_torch_load

_PEFT_PREFIX = "base_model.model."
_PEFT_LORA = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
_PEFT_SAVED = re.compile(r"(.+?)(?:\.modules_to_save(?:\.[^.]+)?|\.original_module)?\.weight")
_OUR_LORA = re.compile(r"(.+)\.lora_([ab])")


@dataclass
class AdapterWeights:
    """An adapter in canonical terms.

    Attributes:
        lora: canonical weight name → (A, B, scaling), B rows in Meta's rotary layout.
        replace: canonical weight name → the full tensor that replaces the base's.
        tokenizer: a tokenizer.model shipped with the adapter (it wins over the base's).
        path: where it was read from.
    """

    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    replace: dict[str, torch.Tensor]
    tokenizer: Path | None
    path: Path

    @property
    def vocab_size(self) -> int | None:
        emb = self.replace.get("tok_embeddings.weight")
        return None if emb is None else emb.shape[0]


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    st, binary = path / ADAPTER_WEIGHTS, path / "adapter_model.bin"
    if st.exists():
        try:
            with safe_open(st, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise FormatError(f"{st}: not a readable safetensors file ({e})") from None
    if binary.exists():
        return dict(safe_torch_load(binary, mmap=False))
    raise FormatError(f"{path}: no {ADAPTER_WEIGHTS} or adapter_model.bin")


def read_adapter_weights(path: str | Path, n_heads: int, n_kv_heads: int) -> AdapterWeights:
    """Read one of our adapters or a PEFT LoRA adapter (detected from adapter_config.json).

    n_heads, n_kv_heads: the base model's, to bring PEFT's q/k factors to Meta's layout.
    """
    path = Path(path)
    config = read_json(path / ADAPTER_CONFIG)
    tensors = _load_tensors(path)
    if not tensors:
        raise FormatError(f"{path}: the adapter holds no tensors")
    tokenizer = path / "tokenizer.model"
    tokenizer = tokenizer if tokenizer.exists() else None
    if config.get("format") == "zhllama-lora":
        return _ours(config, tensors, tokenizer, path)
    if config.get("peft_type") == "LORA":
        return _peft(config, tensors, n_heads, n_kv_heads, tokenizer, path)
    raise FormatError(f"{path / ADAPTER_CONFIG}: neither a zhllama nor a PEFT LoRA adapter "
                      f"(peft_type {config.get('peft_type')!r})")


def _ours(config, tensors, tokenizer, path) -> AdapterWeights:
    scaling = config["alpha"] / config["r"]
    factors: dict[str, dict[str, torch.Tensor]] = {}
    replace = {}
    for name, t in tensors.items():
        if m := _OUR_LORA.fullmatch(name):
            factors.setdefault(m.group(1) + ".weight", {})[m.group(2)] = t
        else:
            replace[name] = t
    lora = {n: (f["a"], f["b"], scaling) for n, f in factors.items() if {"a", "b"} <= f.keys()}
    if len(lora) != len(factors):
        raise FormatError(f"{path}: a LoRA factor without its partner")
    return AdapterWeights(lora, replace, tokenizer, path)


def _peft_scaling(config: dict[str, Any], module: str) -> float:
    """lora_alpha / r, with PEFT's per-module patterns and rank-stabilised variant."""
    r = next((v for k, v in (config.get("rank_pattern") or {}).items() if module.endswith(k)),
             config["r"])
    alpha = next((v for k, v in (config.get("alpha_pattern") or {}).items() if module.endswith(k)),
                 config["lora_alpha"])
    return alpha / (r**0.5 if config.get("use_rslora") else r)


def _peft(config, tensors, n_heads, n_kv_heads, tokenizer, path) -> AdapterWeights:
    if config.get("use_dora"):
        raise FormatError(f"{path}: DoRA adapters are not supported (only plain LoRA)")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    replace = {}
    for key, t in tensors.items():
        name = key.removeprefix(_PEFT_PREFIX)
        if m := _PEFT_LORA.fullmatch(name):
            factors.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        m = _PEFT_SAVED.fullmatch(name)
        ours = hf_to_canonical_name(m.group(1) + ".weight") if m else None
        if ours is None:
            raise FormatError(f"{path}: unsupported adapter tensor {key}")
        replace[ours] = t
    lora = {}
    heads = {"wq": n_heads, "wk": n_kv_heads}
    for module, f in factors.items():
        ours = hf_to_canonical_name(module + ".weight")
        if ours is None or {"A", "B"} - f.keys():
            raise FormatError(f"{path}: unsupported or incomplete LoRA module {module}")
        a, b = f["A"], f["B"]
        # fan_in_fan_out describes GPT-2's transposed Conv1D weights; on nn.Linear layers
        # (all of LLaMA's) PEFT itself resets it to False, so the delta is B·A either way.
        kind = ours.split(".")[-2]
        if kind in heads:  # B's rows are HF's rotary layout; A (the input side) is unaffected
            b = permute_from_hf(b, heads[kind])
        lora[ours] = (a, b, _peft_scaling(config, module))
    return AdapterWeights(lora, replace, tokenizer, path)


def merge_adapter(ckpt: Checkpoint, adapter: AdapterWeights) -> Checkpoint:
    """The checkpoint with the adapter folded in (lazily: tensors are merged as fetched)."""
    args = ckpt.args
    vocab = adapter.vocab_size or args.vocab_size
    if vocab < args.vocab_size:
        raise FormatError(f"{adapter.path}: the adapter's vocabulary ({vocab}) is smaller than the "
                          f"base model's ({args.vocab_size}); it was made for another base")
    if vocab > args.vocab_size and "output.weight" not in adapter.replace:
        raise FormatError(f"{adapter.path}: the adapter grows the vocabulary to {vocab} but does "
                          "not carry the output layer; resize the base first")
    new_args = args.replace(vocab_size=vocab)
    specs = dict(ckpt.specs)
    for name, t in adapter.replace.items():
        if name not in specs:
            raise FormatError(f"{adapter.path}: replaces {name}, which the base does not have")
        if name not in ("tok_embeddings.weight", "output.weight") and tuple(t.shape) != specs[name].shape:
            raise FormatError(f"{adapter.path}: {name} has shape {list(t.shape)}, the base "
                              f"{list(specs[name].shape)}: the adapter was made for another base size")
        specs[name] = TensorSpec(tuple(t.shape), specs[name].dtype)
    for name, (a, b, _) in adapter.lora.items():
        if name not in specs:
            raise FormatError(f"{adapter.path}: has LoRA factors for {name}, which the base does not have")
        out_in = (b.shape[0], a.shape[1])
        if out_in != specs[name].shape or a.shape[0] != b.shape[1]:
            raise FormatError(f"{adapter.path}: LoRA factors of {name} give {list(out_in)}, the base "
                              f"weight is {list(specs[name].shape)}: made for another base size")
    get = ckpt.get

    def get_merged(name: str) -> torch.Tensor:
        dtype = specs[name].dtype
        if name in adapter.replace:
            return adapter.replace[name].to(dtype)
        w = get(name)
        if name in adapter.lora:
            a, b, scaling = adapter.lora[name]
            w = (w.float() + scaling * (b.float() @ a.float())).to(dtype)
        return w

    return ckpt.replace(args=new_args, specs=specs, get=get_merged,
                        tokenizer=adapter.tokenizer or ckpt.tokenizer)


def write_peft_adapter(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """Write one of our adapters in PEFT's layout, loadable with `PeftModel.from_pretrained`
    over our Hugging Face export of the same base."""
    src = Path(src)
    config = read_json(src / ADAPTER_CONFIG)
    if config.get("format") != "zhllama-lora":
        raise FormatError(f"{src}: not a zhllama adapter")
    params = config.get("base_params") or {}
    if "n_heads" not in params:
        raise FormatError(f"{src / ADAPTER_CONFIG}: base_params (head counts) missing; re-save the adapter")
    n_heads = params["n_heads"]
    heads = {"wq": n_heads, "wk": params.get("n_kv_heads") or n_heads}
    tensors = {}
    for name, t in _load_tensors(src).items():
        if m := _OUR_LORA.fullmatch(name):
            hf = canonical_to_hf_name(m.group(1) + ".weight").removesuffix(".weight")
            kind = m.group(1).split(".")[-1]
            if m.group(2) == "b" and kind in heads:
                t = permute_to_hf(t, heads[kind])
            tensors[f"{_PEFT_PREFIX}{hf}.lora_{m.group(2).upper()}.weight"] = t.contiguous()
        else:
            tensors[_PEFT_PREFIX + canonical_to_hf_name(name)] = t.contiguous()
    hf_names = {v: k for k, v in TARGET_ALIASES.items()}
    saved = {"tok_embeddings": "embed_tokens", "output": "lm_head"}
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config["r"],
        "lora_alpha": config["alpha"], "lora_dropout": config["dropout"],
        "target_modules": [hf_names[t] for t in config["targets"]],
        "modules_to_save": [saved.get(m, m) for m in config["modules_to_save"]] or None,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "base_model_name_or_path": None,
    }
    with atomic_output_dir(dst, overwrite) as out:
        save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        if (src / "tokenizer.model").exists():
            (out / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    return Path(dst)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m model.adapters", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", help="one of our adapter directories (adapter_config.json + "
                   "adapter_model.safetensors)")
    p.add_argument("output", help="directory to write")
    p.add_argument("--format", choices=("peft",), default="peft", help="what to write (default peft)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        write_peft_adapter(a.adapter, a.output, a.overwrite)
    except (FormatError, FileExistsError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {a.output} (PEFT LoRA adapter)")


if __name__ == "__main__":
    main()
