"""The LoRA a run trains: from the config, or continued from an existing adapter.

`lora.init_from: DIR` continues an adapter — ours, or PEFT's (e.g. Chinese-Alpaca's
`adapter_model.bin` with 49,954-row embeddings over a 32,000-row base), as the published
`run_clm_sft_with_peft.py --peft_path` does. Its rank, alpha, targets and modules_to_save
are the run's (a config value that says otherwise is an error naming both); its
embeddings and output layer replace the base's first, as merging does, and its LoRA
factors are the starting values of the trained ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from model.adapters import AdapterWeights, merge_adapter, read_adapter_weights
from model.lora import LoRAConfig, LoRASettings, SettingsConflict
from model.source import Checkpoint

from .config import ConfigError


@dataclass
class LoRAPlan:
    config: LoRAConfig
    base: Checkpoint  # what the frozen weights come from (the adapter's embeddings in)
    init: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name → start value


def plan_lora(section: LoRASettings, base: Checkpoint) -> LoRAPlan:
    """The LoRA to train over `base`, per the config section."""
    if section.init_from is None:
        return LoRAPlan(_resolve(section), base)
    adapter = read_adapter_weights(section.init_from, base.args.n_heads, base.args.kv_heads)
    found = adapter_settings(adapter)
    config = _resolve(section, found)
    grown = merge_adapter(base, dataclasses.replace(adapter, lora={}))  # only its embeddings
    init: dict[str, torch.Tensor] = {}
    for weight, (a, b, _) in adapter.lora.items():
        stem = weight.removesuffix(".weight")
        init[f"{stem}.lora_a"], init[f"{stem}.lora_b"] = a, b
    return LoRAPlan(config, grown, init)


def adapter_settings(adapter: AdapterWeights) -> dict[str, Any]:
    """r, alpha, targets and modules_to_save of an adapter, read from its tensors."""
    where = adapter.path
    if not adapter.lora:
        raise ConfigError(f"lora.init_from: {where} holds no LoRA factors")
    ranks = {a.shape[0] for a, _, _ in adapter.lora.values()}
    scalings = {round(s, 12) for _, _, s in adapter.lora.values()}
    if len(ranks) > 1 or len(scalings) > 1:
        raise ConfigError(f"lora.init_from: {where} uses different ranks or alphas per module "
                          f"(ranks {sorted(ranks)}); zhllama trains one r and alpha for all")
    r = ranks.pop()
    targets = sorted({w.removesuffix(".weight").rsplit(".", 1)[-1] for w in adapter.lora})
    layers = {w.split(".")[1] for w in adapter.lora if w.startswith("layers.")}
    per_layer = {w for w in adapter.lora if w.startswith("layers.")}
    if len(per_layer) != len(layers) * len(targets):
        raise ConfigError(f"lora.init_from: {where} adapts {targets} in only some layers; "
                          "zhllama adapts every layer")
    saved = tuple(sorted({n.removesuffix(".weight") for n in adapter.replace}))
    return {"r": r, "alpha": scalings.pop() * r, "targets": tuple(targets), "modules_to_save": saved}


def _resolve(section: LoRASettings, found: dict[str, Any] | None = None) -> LoRAConfig:
    """`section.resolve`, its errors in the config's words."""
    try:
        return section.resolve(found)
    except SettingsConflict as e:
        raise ConfigError(f"lora.{e.key}: the config says {_show(e.given)}, the adapter "
                          f"{section.init_from} has {_show(e.found)}; leave lora.{e.key} unset "
                          "to take the adapter's, or choose another adapter") from None
    except ValueError as e:
        raise ConfigError(f"lora: {e}") from None


def _show(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (tuple, list)) else repr(value)

