"""LoRA: low-rank adapters on the model's linear layers, written out in full.

A `LoRALinear` is an `nn.Linear` (its frozen `weight` keeps its key, so base checkpoints
load into it unchanged) plus two small matrices: y = x Wᵀ + (α/r) · dropout(x) Aᵀ Bᵀ,
with A (r, in) random and B (out, r) zero, so training starts exactly at the base model.

The API: `apply_lora` swaps named projections for LoRA ones, `mark_trainable` freezes
everything but LoRA and the `modules_to_save` (for Chinese-LLaMA: the grown embeddings and
output layer), `save_adapter` / `load_adapter` write and read the trainable tensors only,
`fold_lora` folds B·A into W.

The LoRA vocabulary lives here once: `LoRAConfig` (what a model is adapted with),
`LoRASettings` (what a training config asks for, the defaults filled by `resolve`),
`is_adapter_key` (which tensors an adapter holds), and our adapter format, written by
`save_adapter` and read by `open_adapter` alone (whole by `read_adapter`, lazily by
`model.adapters` for merging and PEFT export).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from tokenizer.files import atomic_output_dir, sha256_file
from tokenizer.schema import Field, check_fields
from tokenizer.templates import TEMPLATES

# Users' configs come from PEFT, which names modules after Hugging Face's Llama.
from .formats.hf import MODULE_ALIASES, TARGET_ALIASES
from .llama import PARAMS_FIELDS
from .quant import is_nf4
from .source import BASE_FINGERPRINT_TENSORS, Checkpoint, tensor_fingerprint
from .tensor_io import FormatError, TensorFile, read_json

ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # PEFT's older files
ADAPTER_CONFIG = "adapter_config.json"
LORA_FACTORS = ("lora_a", "lora_b")  # A (r, in) and B (out, r), by their parameter names
FORMAT = "zhllama-lora"

# What each key of our adapter_config.json may hold, checked before a tensor is read.
ADAPTER_FIELDS = MappingProxyType({
    "format": Field("string", choices=(FORMAT,)),
    "format_version": Field("integer", choices=(1,)),
    "r": Field("integer", min=1),
    "alpha": Field("number", above=0),
    "dropout": Field("number", min=0, max=1, required=False),
    "targets": Field("list", items=Field("string")),
    "modules_to_save": Field("list", items=Field("string"), required=False),
    "base_vocab_size": Field("integer", min=1, required=False, nullable=True),
    "vocab_size": Field("integer", min=1, required=False, nullable=True),
    "tokenizer_sha256": Field("string", required=False, nullable=True),
    "base_params": Field("object", required=False, nullable=True, fields=PARAMS_FIELDS),
    "base_tensors_sha256": Field("string", required=False, nullable=True),
    "base_tensors_hashed": Field("list", items=Field("string"), required=False, nullable=True),
    "template": Field("string", choices=tuple(TEMPLATES), required=False, nullable=True),
})


@dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how. Names may be ours (wq, tok_embeddings) or PEFT's (q_proj, lm_head)."""

    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ALL_TARGETS
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        object.__setattr__(self, "targets", tuple(canonical_target(t) for t in self.targets))
        object.__setattr__(self, "modules_to_save",
                           tuple(MODULE_ALIASES.get(m, m) for m in self.modules_to_save))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def canonical_target(name: str) -> str:
    """'q_proj' → 'wq'; our names pass through; anything else is an error."""
    name = TARGET_ALIASES.get(name, name)
    if name not in ALL_TARGETS:
        raise ValueError(f"unknown LoRA target {name!r}; use {', '.join(ALL_TARGETS)} "
                         f"or {', '.join(TARGET_ALIASES)}")
    return name


# Chinese-LLaMA trains its grown embeddings and output layer in full beside the LoRA
# factors: what a training config saves unless it says otherwise. Plain LoRA (a bare
# `LoRAConfig`) saves no whole module.
RECIPE_MODULES_TO_SAVE = ("tok_embeddings", "output")
# What `LoRASettings.resolve` takes from an adapter being continued.
ADAPTER_SETTINGS = ("r", "alpha", "targets", "modules_to_save")


class SettingsConflict(ValueError):
    """A setting given that contradicts the adapter being continued."""

    def __init__(self, key: str, given: Any, found: Any) -> None:
        super().__init__(f"{key}: {given!r} is set, the adapter has {found!r}")
        self.key, self.given, self.found = key, given, found


@dataclass
class LoRASettings:
    """What a training config asks of LoRA (its `lora:` section), before defaults.

    A field left None is the adapter's when one is continued (`init_from`), else the
    default: `LoRAConfig`'s r, alpha and targets (Chinese-LLaMA's r 8, α 32, all seven
    projections) and `RECIPE_MODULES_TO_SAVE`. Names stay as written (ours or PEFT's);
    `resolve` makes them ours.
    """

    r: int | None = None
    alpha: float | None = None
    dropout: float = LoRAConfig.dropout
    targets: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    # An adapter to continue training (ours or PEFT's, e.g. Chinese-Alpaca's): its LoRA
    # factors and embeddings are the starting point.
    init_from: str | None = None

    def resolve(self, adapter: Mapping[str, Any] | None = None) -> LoRAConfig:
        """The LoRA to train.

        Args:
            adapter: the `ADAPTER_SETTINGS` of the adapter being continued (as read from
                its tensors); they fill the unset fields, and a set field must agree with
                them (compared in our names: q_proj is wq, order aside).

        Raises:
            SettingsConflict: a set field that contradicts `adapter`.
            ValueError: an unknown target name.
        """
        given = {k: getattr(self, k) for k in ADAPTER_SETTINGS}
        if adapter is None:
            defaults = {"r": LoRAConfig.r, "alpha": LoRAConfig.alpha, "targets": LoRAConfig.targets,
                        "modules_to_save": RECIPE_MODULES_TO_SAVE}
            return self._config({k: defaults[k] if v is None else v for k, v in given.items()})
        theirs = self._config(adapter)
        for key, value in given.items():
            if value is None:
                continue
            mine = getattr(self._config({**adapter, key: value}), key)
            if _unordered(mine) != _unordered(getattr(theirs, key)):
                raise SettingsConflict(key, value, adapter[key])
        return theirs

    def _config(self, values: Mapping[str, Any]) -> LoRAConfig:
        return LoRAConfig(r=values["r"], alpha=float(values["alpha"]), dropout=self.dropout,
                          targets=tuple(values["targets"]),
                          modules_to_save=tuple(values["modules_to_save"]))


def _unordered(value: Any) -> Any:
    return sorted(value) if isinstance(value, tuple) else value


def is_lora_key(name: str) -> bool:
    """Whether a parameter (or state-dict key) is a LoRA factor: `*.lora_a`, `*.lora_b`."""
    return name.endswith(tuple("." + f for f in LORA_FACTORS))


def in_module(name: str, module: str) -> bool:
    """Whether a parameter belongs to `module` (a module's name, as `tok_embeddings`)."""
    return name.startswith(module + ".")


def is_adapter_key(name: str, modules_to_save: Iterable[str]) -> bool:
    """Whether an adapter holds this tensor: a LoRA factor, or one of a module saved whole.

    `modules_to_save` in our names (`LoRAConfig` has made them so).
    """
    return is_lora_key(name) or any(in_module(name, m) for m in modules_to_save)


def adapter_keys(names: Iterable[str], config: LoRAConfig) -> set[str]:
    """The names among `names` (a state dict's keys) that an adapter of `config` holds."""
    return {n for n in names if is_adapter_key(n, config.modules_to_save)}


class LoRALinear(nn.Linear):
    """nn.Linear with a low-rank update: y = x Wᵀ + (α/r) · dropout(x) Aᵀ Bᵀ.

    The frozen W may be stored as NF4 (QLoRA, `model.quant`): `F.linear` then dequantizes it
    per call, through torchao's own linear. Such a layer cannot merge: folding B·A into a
    4-bit weight would quantize the update away; merge into the unquantized base instead.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float,
                 dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # LoRA factors are float32 whatever the base's dtype: they are what is trained.
        self.lora_a = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_b = nn.Parameter(torch.empty(out_features, r, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # A as nn.Linear initialises its weight (and PEFT its lora_A); B zero: no change at start.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if self.merged:
            return out
        a, b = self.lora_a, self.lora_b
        update = F.linear(F.linear(self.lora_dropout(x).to(a.dtype), a), b) * self.scaling
        return out + update.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(α/r) · B · A, in float32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + (α/r)·B·A (computed in float32); forward then skips the LoRA branch.

        Raises:
            ValueError: W is NF4 (see the class docstring).
        """
        if is_nf4(self.weight):
            raise ValueError("cannot merge LoRA into an NF4 weight (it would quantize the update "
                             "away); merge the adapter into the unquantized base: zhllama merge-lora")
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}"


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Replace every nn.Linear whose name ends in a target with a LoRALinear (in place).

    The base weight Parameter is moved over as is (no copy), so this works on the meta
    device and on loaded models alike.
    """
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] not in config.targets:
            continue
        parent_name, _, child = name.rpartition(".")
        lora = LoRALinear(module.in_features, module.out_features, config.r, config.alpha,
                          config.dropout, device=module.weight.device)
        lora.weight = module.weight
        lora.train(module.training)  # a new module would otherwise start in training mode
        model.get_submodule(parent_name).register_module(child, lora)
        replaced += 1
    if replaced == 0:
        raise ValueError(f"no linear layer matched the LoRA targets {list(config.targets)}")
    return model


def lora_modules(model: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def mark_trainable(model: nn.Module, modules_to_save: Iterable[str] = ()) -> list[str]:
    """Freeze everything except LoRA factors and whole `modules_to_save`; return trainable names."""
    modules_to_save = [MODULE_ALIASES.get(m, m) for m in modules_to_save]
    names = dict(model.named_modules())
    for m in modules_to_save:
        if m not in names:
            raise ValueError(f"modules_to_save: the model has no module {m!r}")
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_key(name, modules_to_save))
        if p.requires_grad:
            trainable.append(name)
    return trainable


def adapter_state_dict(model: nn.Module, config: LoRAConfig) -> dict[str, torch.Tensor]:
    """The tensors an adapter holds: every LoRA factor and the modules to save, by name."""
    state = model.state_dict()
    keys = adapter_keys(state, config)
    return {name: t for name, t in state.items() if name in keys}


def save_adapter(
    state: dict[str, torch.Tensor], config: LoRAConfig, out_dir: str | Path, *,
    base_vocab_size: int, vocab_size: int, tokenizer_sha256: str | None = None,
    tokenizer: Path | None = None, base_params: dict[str, Any] | None = None,
    base: Checkpoint | None = None, template: str | None = None, overwrite: bool = False,
) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` (atomically).

    Refuses an empty state: an adapter file without tensors (PEFT's "443-byte adapter")
    is the classic silent failure of LoRA training.

    Args:
        base: the checkpoint the adapter was trained on. When given, a hash of a few of
            its tensors is recorded (`model.source.tensor_fingerprint`), and its
            parameters and tokenizer hash where not given, so that merging refuses another
            base. Reads two small tensors; nothing when None.
        template: the SFT template the adapter was tuned with (a name in
            `tokenizer.templates.TEMPLATES`), carried by merging into the merged model
            and its Hugging Face chat_template; None for pretraining.
    """
    if template is not None and template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
    if not any(is_lora_key(n) for n in state):
        raise ValueError("refusing to save an adapter with no LoRA tensors")
    missing = [m for m in config.modules_to_save if not any(in_module(n, m) for n in state)]
    with_a = {n.removesuffix(".lora_a") for n in state if n.endswith(".lora_a")}
    with_b = {n.removesuffix(".lora_b") for n in state if n.endswith(".lora_b")}
    unpaired = sorted(with_a ^ with_b)
    if missing or unpaired:
        raise ValueError(f"refusing to save an incomplete adapter: modules to save without "
                         f"tensors {missing}, LoRA layers without both A and B {unpaired}")
    fingerprint = None
    if base is not None:
        fingerprint = tensor_fingerprint(base)
        base_params = base_params if base_params is not None else base.args.to_params()
        if tokenizer_sha256 is None and base.tokenizer is not None:
            tokenizer_sha256 = sha256_file(base.tokenizer)
    meta = {"format": FORMAT, "format_version": 1, **asdict(config),
            "base_vocab_size": base_vocab_size, "vocab_size": vocab_size,
            "tokenizer_sha256": tokenizer_sha256,
            # head counts let the adapter be exported for Hugging Face (q/k permutation)
            "base_params": base_params,
            # what merging compares to tell the base it was trained on from another
            "base_tensors_sha256": fingerprint,
            "base_tensors_hashed": list(BASE_FINGERPRINT_TENSORS) if fingerprint else None,
            "template": template}
    with atomic_output_dir(out_dir, overwrite, inputs=(tokenizer,)) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            (tmp / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return Path(out_dir)


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """adapter_config.json of one of our adapters, every key checked (`ADAPTER_FIELDS`)."""
    where = Path(path) / ADAPTER_CONFIG
    meta = read_json(where)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FormatError(f"{where}: not a zhllama adapter")
    return check_fields(meta, ADAPTER_FIELDS, where, FormatError)


@dataclass(frozen=True)
class StoredAdapter:
    """One of our adapters on disk, checked: its config, its whole adapter_config.json,
    and its tensors (shapes known, data read when asked for)."""

    path: Path
    config: LoRAConfig
    meta: dict[str, Any]
    tensors: TensorFile


def adapter_tensors(path: str | Path) -> TensorFile:
    """An adapter directory's tensors: adapter_model.safetensors, else PEFT's adapter_model.bin.

    Raises:
        FormatError: neither file is there, or the one there holds no tensors.
    """
    path = Path(path)
    st, binary = path / ADAPTER_WEIGHTS, path / ADAPTER_WEIGHTS_BIN
    if not st.exists() and not binary.exists():
        raise FormatError(f"{path}: no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN}")
    tensors = TensorFile(st if st.exists() else binary)
    if not tensors.shapes:
        raise FormatError(f"{tensors.file}: the adapter holds no tensors")
    return tensors


def open_adapter(path: str | Path) -> StoredAdapter:
    """Open one of our adapters: the only reader of the format `save_adapter` writes.

    Every key of adapter_config.json is checked (`ADAPTER_FIELDS`), its targets must be
    LoRA targets, and the factors' shapes must agree with its r, all before a tensor is read.
    """
    path = Path(path)
    where = path / ADAPTER_CONFIG
    meta = read_adapter_config(path)
    try:
        config = LoRAConfig(r=meta["r"], alpha=meta["alpha"], dropout=meta.get("dropout", 0.0),
                            targets=tuple(meta["targets"]),
                            modules_to_save=tuple(meta.get("modules_to_save", ())))
    except ValueError as e:  # an unknown target name
        raise FormatError(f"{where}: {e}") from None
    tensors = adapter_tensors(path)
    check_rank(tensors.shapes, config.r, where)
    return StoredAdapter(path, config, meta, tensors)


def read_adapter(path: str | Path) -> tuple[LoRAConfig, dict[str, Any], dict[str, torch.Tensor]]:
    """(config, the whole adapter_config.json, tensors) of one of our adapters, read whole."""
    stored = open_adapter(path)
    return stored.config, stored.meta, stored.tensors.load(list(stored.tensors.shapes))


def check_rank(shapes: dict[str, tuple[int, ...]], r: int, where: str | Path) -> None:
    """Refuse LoRA factors whose shapes disagree with the rank the config states.

    Our factors are `*.lora_a` (r, in) and `*.lora_b` (out, r); checked on the shapes of
    the file's header, before any tensor is read.

    Raises:
        FormatError: naming the config file, r and the first tensor that disagrees.
    """
    for name, shape in shapes.items():
        kind = name.rsplit(".", 1)[-1]
        if not is_lora_key(name):
            continue
        if len(shape) != 2 or shape[0 if kind == "lora_a" else 1] != r:
            want = f"[{r}, in]" if kind == "lora_a" else f"[out, {r}]"
            raise FormatError(f"{where}: r: {r}, but tensor {name} has shape {list(shape)} "
                              f"(expected {want})")


def load_adapter(model: nn.Module, path: str | Path) -> LoRAConfig:
    """Apply LoRA to `model` (if not yet) and load an adapter's tensors, strictly."""
    config, meta, tensors = read_adapter(path)
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if vocab is not None and meta.get("vocab_size") not in (None, vocab):
        raise FormatError(f"{path}: the adapter was trained with a vocabulary of "
                          f"{meta['vocab_size']} rows, the model has {vocab}; resize the model first")
    if not any(True for _ in lora_modules(model)):
        apply_lora(model, config)
    expected = adapter_state_dict(model, config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{path}: adapter does not fit the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, t in tensors.items():
            target = expected[name]
            if target.shape != t.shape:
                raise FormatError(f"{path}: tensor {name} has shape {list(t.shape)}, the model "
                                  f"expects {list(target.shape)}")
            target.copy_(t)
    return config


def fold_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight and put plain nn.Linear layers back."""
    for name, module in list(lora_modules(model)):
        module.merge()
        plain = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        plain.weight = module.weight
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, plain)
    return model


def init_lora_parameters(model: nn.Module) -> None:
    """Re-initialise every LoRA factor (after building on the meta device and `to_empty`)."""
    for _, module in lora_modules(model):
        module.reset_lora_parameters()


__all__ = [
    "LoRAConfig", "LoRASettings", "LoRALinear", "apply_lora", "mark_trainable",
    "is_adapter_key", "adapter_keys", "adapter_state_dict", "save_adapter", "open_adapter",
    "read_adapter", "load_adapter", "fold_lora", "init_lora_parameters", "canonical_target",
]
