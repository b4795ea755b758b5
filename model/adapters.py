"""Adapters from disk — ours or PEFT's — merged into a checkpoint, and ours written as PEFT's.

    python -m model.adapters ADAPTER_DIR OUT_DIR --format peft   # ours → PEFT (for peft users)

An adapter, whatever its origin, becomes `AdapterWeights`: per canonical weight name the
LoRA factors A (r, in), B (out, r) in Meta's rotary layout and their scaling, and the
tensors that replace the base's whole (PEFT's `modules_to_save`, e.g. embeddings grown
to 49,953 rows). `merge_adapter` then folds it into a `Checkpoint` lazily, tensor by
tensor: W' = W + scaling · B·A, computed in float32. Whole tensors stay on disk until the
merge writes them. An adapter that does not fit its base — another model size, a
vocabulary or tokenizer its embeddings do not cover, conflicting or unknown tensors — is
refused with one FormatError saying why, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tokenizer.cli import ArgumentParser, command_errors
from tokenizer.files import atomic_output_dir, sha256_file
from tokenizer.schema import Field, check_fields
from tokenizer.spm_io import load_sp

from .formats.hf import (
    MODULE_ALIASES, TARGET_ALIASES, canonical_to_hf_name, hf_to_canonical_name, permute_from_hf,
    permute_to_hf, rotary_heads,
)
from .llama import ModelArgs, ffn_hidden_dim
from .lora import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT, StoredAdapter, adapter_tensors, is_lora_key,
    open_adapter,
)
from .source import BASE_FINGERPRINT_TENSORS, Checkpoint, tensor_fingerprint
from .tensor_io import FormatError, TensorFile, TensorSpec, read_json

_PEFT_PREFIX = "base_model.model."
_PEFT_LORA = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
# A whole weight: plain (`embed_tokens.weight`), PEFT's trained copy
# (`embed_tokens.modules_to_save[.default].weight`) or its untrained copy of the base's
# (`embed_tokens.original_module.weight`), which must never be merged.
_PEFT_SAVED = re.compile(r"(.+?)(\.modules_to_save(?:\.[^.]+)?|\.original_module)?\.weight")
_PEFT_FACTORS = {"lora_a": "lora_A", "lora_b": "lora_B"}  # our factors' names in PEFT's files
_VOCAB_ROWS = ("tok_embeddings.weight", "output.weight")
_RESIZE_HINT = "resize the base first (python -m model.resize)"


@dataclass
class AdapterWeights:
    """An adapter in canonical terms.

    Attributes:
        lora: canonical weight name → (A, B, scaling), B rows in Meta's rotary layout.
        replace: canonical weight name → shape of the full tensor that replaces the base's.
        fetch: reads one of those replacing tensors from disk (they can be 49,953-row
            embeddings: they are read when the merge writes them, not held all along).
        tokenizer: a tokenizer.model shipped with the adapter (it wins over the base's).
        path: where it was read from.
        base: what our adapters record of the base they were trained over (adapter_config's
            base_vocab_size, vocab_size, base_params); empty for PEFT's.
        template: the SFT template ours record having been tuned with; None for PEFT's.
    """

    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    replace: dict[str, tuple[int, ...]]
    fetch: Callable[[str], torch.Tensor]
    tokenizer: Path | None
    path: Path
    base: dict[str, Any] = field(default_factory=dict)
    template: str | None = None

    @property
    def vocab_size(self) -> int | None:
        """Rows of the embeddings (or output layer) it carries; None if it carries neither."""
        return next((self.replace[n][0] for n in _VOCAB_ROWS if n in self.replace), None)


def read_adapter_weights(path: str | Path, n_heads: int, n_kv_heads: int) -> AdapterWeights:
    """Read one of our adapters or a PEFT LoRA adapter (detected from adapter_config.json).

    n_heads, n_kv_heads: the base model's, to bring PEFT's q/k factors to Meta's layout.
    """
    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"{path}: no such adapter directory")
    config = read_json(path / ADAPTER_CONFIG)
    if not isinstance(config, dict):
        raise FormatError(f"{path / ADAPTER_CONFIG}: not a JSON object")
    tokenizer = path / "tokenizer.model"
    tokenizer = tokenizer if tokenizer.exists() else None
    if config.get("format") == FORMAT:
        return _ours(open_adapter(path), tokenizer)
    tensors = adapter_tensors(path)  # a directory without weights says so before anything else
    if config.get("peft_type") == "LORA":
        return _peft(config, tensors, n_heads, n_kv_heads, tokenizer, path)
    raise FormatError(f"{path / ADAPTER_CONFIG}: neither a zhllama nor a PEFT LoRA adapter "
                      f"(peft_type {config.get('peft_type')!r})")


# What each key of PEFT's adapter_config.json that we read may hold.
PEFT_FIELDS = {
    "r": Field("integer", min=1),
    "lora_alpha": Field("number", above=0),
    "rank_pattern": Field("object", required=False, nullable=True, values=Field("integer", min=1)),
    "alpha_pattern": Field("object", required=False, nullable=True, values=Field("number", above=0)),
    "use_rslora": Field("boolean", required=False, nullable=True),
    "use_dora": Field("boolean", required=False, nullable=True),
    "modules_to_save": Field("list", required=False, nullable=True, items=Field("string")),
    "lora_dropout": Field("number", min=0, max=1, required=False, nullable=True),
    "fan_in_fan_out": Field("boolean", required=False, nullable=True),
}


def _ours(stored: StoredAdapter, tokenizer: Path | None) -> AdapterWeights:
    tensors, path = stored.tensors, stored.path
    factors: dict[str, dict[str, torch.Tensor]] = {}
    lora_keys = [k for k in tensors.shapes if is_lora_key(k)]
    for name, t in tensors.load(lora_keys).items():
        stem, _, factor = name.rpartition(".")
        factors.setdefault(stem + ".weight", {})[factor] = t
    replace = {k: shape for k, shape in tensors.shapes.items() if k not in lora_keys}
    scaling = stored.config.scaling
    lora = {n: (f["lora_a"], f["lora_b"], scaling) for n, f in factors.items()
            if {"lora_a", "lora_b"} <= f.keys()}
    if len(lora) != len(factors):
        raise FormatError(f"{path}: a LoRA factor without its partner")
    meta = stored.meta
    base = {k: meta.get(k) for k in ("base_vocab_size", "vocab_size", "base_params",
                                     "tokenizer_sha256", "base_tensors_sha256")}
    return AdapterWeights(lora, replace, tensors.get, tokenizer, path, base, meta.get("template"))


def _peft_rank(config: dict[str, Any], module: str) -> tuple[int, str]:
    """A module's rank and where it comes from: `r`, unless PEFT's rank_pattern names the module."""
    return next(((v, f"rank_pattern.{k}") for k, v in (config.get("rank_pattern") or {}).items()
                 if module.endswith(k)), (config["r"], "r"))


def _peft_scaling(config: dict[str, Any], module: str) -> float:
    """lora_alpha / r, with PEFT's per-module patterns and rank-stabilised variant."""
    r, _ = _peft_rank(config, module)
    alpha = next((v for k, v in (config.get("alpha_pattern") or {}).items() if module.endswith(k)),
                 config["lora_alpha"])
    return alpha / (r**0.5 if config.get("use_rslora") else r)


def _check_peft_rank(config: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: Path) -> None:
    """Every lora_A (r, in) and lora_B (out, r) against the module's rank in the config."""
    for key, shape in shapes.items():
        m = _PEFT_LORA.fullmatch(key.removeprefix(_PEFT_PREFIX))
        if m is None:
            continue
        r, key_name = _peft_rank(config, m.group(1))
        if len(shape) != 2 or shape[0 if m.group(2) == "A" else 1] != r:
            want = f"[{r}, in]" if m.group(2) == "A" else f"[out, {r}]"
            raise FormatError(f"{where}: {key_name}: {r}, but tensor {key} has shape "
                              f"{list(shape)} (expected {want})")


def _peft_whole_weights(config: dict[str, Any], tensors: TensorFile, path: Path) -> dict[str, str]:
    """Canonical name → file key of each whole weight that replaces the base's.

    PEFT saves a `modules_to_save` layer up to three times: the trained copy, the same
    under the plain name (when the embeddings were resized), and `original_module`, the
    base's untrained copy, which is skipped. Two trained copies that differ are refused
    rather than guessed between.
    """
    listed = config.get("modules_to_save") or []
    found: dict[str, dict[str, str]] = {}
    for key in tensors.shapes:
        name = key.removeprefix(_PEFT_PREFIX)
        if _PEFT_LORA.fullmatch(name):
            continue
        m = _PEFT_SAVED.fullmatch(name)
        if m and m.group(2) == ".original_module":
            continue
        module = m.group(1) if m else name
        ours = hf_to_canonical_name(module + ".weight")
        # peft saves embeddings it resized even when unlisted; any other unlisted weight
        # it would not load, so neither do we
        if ours is None or not (ours in _VOCAB_ROWS or any(module == s or module.endswith("." + s)
                                                           for s in listed)):
            raise FormatError(f"{path}: unsupported adapter tensor {key}")
        found.setdefault(ours, {})["trained" if m.group(2) else "plain"] = key
    for keys in found.values():
        if len(keys) == 2 and not tensors.equal(keys["plain"], keys["trained"]):
            raise FormatError(f"{path}: {keys['plain']} and {keys['trained']} differ; "
                              "cannot tell which one was trained")
    return {ours: keys.get("trained", keys.get("plain")) for ours, keys in found.items()}


def _peft(config: dict[str, Any], tensors: TensorFile, n_heads: int, n_kv_heads: int,
          tokenizer: Path | None, path: Path) -> AdapterWeights:
    where = path / ADAPTER_CONFIG
    check_fields(config, PEFT_FIELDS, where, FormatError)
    _check_peft_rank(config, tensors.shapes, where)
    if config.get("use_dora"):
        raise FormatError(f"{path}: DoRA adapters are not supported (only plain LoRA)")
    whole = _peft_whole_weights(config, tensors, path)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    lora_keys = [k for k in tensors.shapes if _PEFT_LORA.fullmatch(k.removeprefix(_PEFT_PREFIX))]
    for key, t in tensors.load(lora_keys).items():
        m = _PEFT_LORA.fullmatch(key.removeprefix(_PEFT_PREFIX))
        factors.setdefault(m.group(1), {})[m.group(2)] = t
    lora = {}
    for module, f in factors.items():
        ours = hf_to_canonical_name(module + ".weight")
        if ours is None or {"A", "B"} - f.keys():
            raise FormatError(f"{path}: unsupported or incomplete LoRA module {module}")
        a, b = f["A"], f["B"]
        # fan_in_fan_out describes GPT-2's transposed Conv1D weights; on nn.Linear layers
        # (all of LLaMA's) PEFT itself resets it to False, so the delta is B·A either way.
        heads = rotary_heads(ours, n_heads, n_kv_heads)
        if heads is not None:  # B's rows are HF's rotary layout; A (the input side) is unaffected
            b = permute_from_hf(b, heads)
        lora[ours] = (a, b, _peft_scaling(config, module))
    replace = {ours: tensors.shapes[key] for ours, key in whole.items()}
    return AdapterWeights(lora, replace, lambda name: tensors.get(whole[name]), tokenizer, path)


def _check_recorded_base(args: ModelArgs, adapter: AdapterWeights) -> None:
    """Hold what our adapter recorded of its base (adapter_config.json) against this base."""
    where, rec = adapter.path / ADAPTER_CONFIG, adapter.base
    params = rec.get("base_params") or {}
    want = {**params, "n_kv_heads": params.get("n_kv_heads") or params.get("n_heads")}
    have = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
            "n_kv_heads": args.kv_heads}
    for key, value in have.items():
        if want.get(key) is not None and want[key] != value:
            raise FormatError(f"{where}: made for a base with {key} {want[key]}, this base has "
                              f"{value}: the adapter was made for another base size")
    rows = adapter.vocab_size
    if rows is not None:  # it carries its embeddings: they replace the base's whatever its size
        if rec.get("vocab_size") not in (None, rows):
            raise FormatError(f"{where}: says vocab_size {rec['vocab_size']}, but its embeddings "
                              f"have {rows} rows")
        return
    for key in ("base_vocab_size", "vocab_size"):
        n = rec.get(key)
        if n is not None and n != args.vocab_size:
            hint = _RESIZE_HINT if n > args.vocab_size else "it was made for another base"
            raise FormatError(f"{where}: trained with a {n}-row vocabulary ({key}), but this base "
                              f"has {args.vocab_size} rows; {hint}")


def _base_differences(ckpt: Checkpoint, adapter: AdapterWeights) -> list[str]:
    """What differs between the base our adapter recorded and this one, beyond the sizes
    `_check_recorded_base` refuses outright: other parameters, the tokenizer, the tensors."""
    rec, args, found = adapter.base, ckpt.args, []
    params = rec.get("base_params") or {}
    want: dict[str, Any] = {k: params[k] for k in ("norm_eps", "rope_theta", "max_seq_len")
                            if params.get(k) is not None}
    if "dim" in params and "multiple_of" in params:
        # the hidden size, not its knobs: conversions may pick other knobs for the same size
        want["hidden_dim"] = ffn_hidden_dim(params["dim"], params["multiple_of"],
                                            params.get("ffn_dim_multiplier"))
    for key, value in want.items():
        if getattr(args, key) != value:
            found.append(f"{key} {value} (this base: {getattr(args, key)})")
    # The tokenizer whose ids the merged rows follow: the adapter's when it carries the rows.
    tok = adapter.tokenizer if adapter.vocab_size is not None else ckpt.tokenizer
    if rec.get("tokenizer_sha256") and tok is not None:
        sha = sha256_file(tok)
        if sha != rec["tokenizer_sha256"]:
            found.append(f"tokenizer sha256 {rec['tokenizer_sha256'][:12]}… ({tok} has {sha[:12]}…)")
    if rec.get("base_tensors_sha256"):
        sha = tensor_fingerprint(ckpt)
        if sha != rec["base_tensors_sha256"]:
            found.append(f"weights: sha256 of {', '.join(BASE_FINGERPRINT_TENSORS)} "
                         f"{rec['base_tensors_sha256'][:12]}… (this base: {sha[:12]}…)")
    return found


def _check_same_base(ckpt: Checkpoint, adapter: AdapterWeights, force_base: bool) -> None:
    """Refuse (or, forced, warn about) a base other than the one the adapter was trained on."""
    found = _base_differences(ckpt, adapter)
    if not found:
        return
    where = adapter.path / ADAPTER_CONFIG
    what = f"{where}: trained on another base: {'; '.join(found)}"
    if not force_base:
        raise FormatError(f"{what}. Merge into the base it was trained on, or pass --force_base "
                          "to merge anyway")
    print(f"warning: {what} (merging anyway: --force_base)", file=sys.stderr)


def _check_vocab(args: ModelArgs, adapter: AdapterWeights) -> int:
    """The vocabulary size after merging the adapter, or a FormatError saying why it does not fit."""
    carried = {n: adapter.replace[n] for n in _VOCAB_ROWS if n in adapter.replace}
    for name, shape in carried.items():
        if len(shape) != 2 or shape[1] != args.dim:
            raise FormatError(f"{adapter.path}: {name} has shape {list(shape)}, but the base's rows "
                              f"have {args.dim} values: the adapter was made for another base size")
    if len({shape[0] for shape in carried.values()}) > 1:
        raise FormatError(f"{adapter.path}: its embeddings and output layer have different "
                          f"vocabularies ({', '.join(str(s[0]) for s in carried.values())} rows)")
    vocab = adapter.vocab_size or args.vocab_size
    if vocab < args.vocab_size:
        raise FormatError(f"{adapter.path}: the adapter's vocabulary ({vocab}) is smaller than the "
                          f"base model's ({args.vocab_size}); it was made for another base")
    if vocab > args.vocab_size and len(carried) < 2:
        missing = next(n for n in _VOCAB_ROWS if n not in carried)
        raise FormatError(f"{adapter.path}: the adapter grows the vocabulary to {vocab} but does "
                          f"not carry {missing}; {_RESIZE_HINT}")
    pieces = load_sp(adapter.tokenizer).vocab_size() if adapter.tokenizer else 0
    if pieces > vocab and not carried:
        raise FormatError(f"{adapter.path}: the adapter carries no embeddings for its {pieces}-piece "
                          f"tokenizer (the base has {vocab} rows); {_RESIZE_HINT}")
    if pieces > vocab:
        raise FormatError(f"{adapter.path}: its tokenizer has {pieces} pieces, its embeddings only "
                          f"{vocab} rows")
    return vocab


def _merged_specs(specs: dict[str, TensorSpec], adapter: AdapterWeights) -> dict[str, TensorSpec]:
    """The base's tensor specs with the adapter's replacements, checked against the base."""
    specs = dict(specs)
    for name, shape in adapter.replace.items():
        if name not in specs:
            raise FormatError(f"{adapter.path}: replaces {name}, which the base does not have")
        if name not in _VOCAB_ROWS and shape != specs[name].shape:
            raise FormatError(f"{adapter.path}: {name} has shape {list(shape)}, the base "
                              f"{list(specs[name].shape)}: the adapter was made for another base size")
        specs[name] = TensorSpec(shape, specs[name].dtype)
    for name, (a, b, _) in adapter.lora.items():
        if name not in specs:
            raise FormatError(f"{adapter.path}: has LoRA factors for {name}, which the base does not have")
        out_in = (b.shape[0], a.shape[1])
        if out_in != specs[name].shape or a.shape[0] != b.shape[1]:
            raise FormatError(f"{adapter.path}: LoRA factors of {name} give {list(out_in)}, the base "
                              f"weight is {list(specs[name].shape)}: made for another base size")
    return specs


def merge_adapter(ckpt: Checkpoint, adapter: AdapterWeights, *, force_base: bool = False
                  ) -> Checkpoint:
    """The checkpoint with the adapter folded in (lazily: tensors are merged as fetched).

    The result records the adapter's SFT template, or keeps the checkpoint's when the
    adapter has none: adapters merged in order leave the last one's (with a note when an
    earlier one said another).

    Args:
        force_base: merge even when our adapter recorded another base than this one
            (other parameters, tokenizer or weights); sizes that do not fit are refused
            regardless.

    Raises:
        FormatError: the adapter does not fit this base (size, vocabulary, tokenizer), or
            was trained on another base.
    """
    if adapter.base:
        _check_recorded_base(ckpt.args, adapter)
    vocab = _check_vocab(ckpt.args, adapter)
    specs = _merged_specs(ckpt.specs, adapter)
    if adapter.base:
        _check_same_base(ckpt, adapter, force_base)
    get, fetch = ckpt.get, adapter.fetch

    def get_merged(name: str) -> torch.Tensor:
        dtype = specs[name].dtype
        if name in adapter.replace:
            return fetch(name).to(dtype)
        w = get(name)
        if name not in adapter.lora:
            return w
        a, b, scaling = adapter.lora[name]
        delta = b.float() @ a.float()  # (out, r) @ (r, in): the update, in float32
        return delta.mul_(scaling).add_(w).to(dtype)  # one float32 matrix, not three

    if adapter.template and ckpt.template and adapter.template != ckpt.template:
        print(f"note: {adapter.path} was tuned with template {adapter.template}, the model it is "
              f"merged into with {ckpt.template}: the merged model records {adapter.template}",
              file=sys.stderr)
    return ckpt.replace(args=ckpt.args.replace(vocab_size=vocab), specs=specs, get=get_merged,
                        tokenizer=adapter.tokenizer or ckpt.tokenizer,
                        template=adapter.template or ckpt.template)


def write_peft_adapter(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """Write one of our adapters in PEFT's layout, loadable with `PeftModel.from_pretrained`
    over our Hugging Face export of the same base."""
    src = Path(src)
    stored = open_adapter(src)
    config, params = stored.config, stored.meta.get("base_params") or {}
    if "n_heads" not in params:
        raise FormatError(f"{src / ADAPTER_CONFIG}: base_params (head counts) missing; re-save the adapter")
    n_heads = params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    tensors = {}
    for name, t in stored.tensors.load(list(stored.tensors.shapes)).items():
        if is_lora_key(name):
            stem, _, factor = name.rpartition(".")
            hf = canonical_to_hf_name(stem + ".weight").removesuffix(".weight")
            heads = rotary_heads(stem + ".weight", n_heads, n_kv_heads)
            if factor == "lora_b" and heads is not None:
                t = permute_to_hf(t, heads)
            tensors[f"{_PEFT_PREFIX}{hf}.{_PEFT_FACTORS[factor]}.weight"] = t.contiguous()
        else:
            tensors[_PEFT_PREFIX + canonical_to_hf_name(name)] = t.contiguous()
    hf_targets = {ours: hf for hf, ours in TARGET_ALIASES.items()}
    hf_modules = {ours: hf for hf, ours in MODULE_ALIASES.items()}
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r,
        "lora_alpha": stored.meta["alpha"], "lora_dropout": config.dropout,
        "target_modules": [hf_targets[t] for t in config.targets],
        "modules_to_save": [hf_modules.get(m, m) for m in config.modules_to_save] or None,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "base_model_name_or_path": None,
    }
    with atomic_output_dir(dst, overwrite, inputs=(src,)) as out:
        save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        if (src / "tokenizer.model").exists():
            (out / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    return Path(dst)


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m model.adapters", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", help="one of our adapter directories (adapter_config.json + "
                   "adapter_model.safetensors)")
    p.add_argument("output", help="directory to write")
    p.add_argument("--format", choices=("peft",), default="peft", help="what to write (default peft)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    with command_errors(output=a.output):
        write_peft_adapter(a.adapter, a.output, a.overwrite)
        print(f"wrote {a.output} (PEFT LoRA adapter)")


if __name__ == "__main__":
    main()
