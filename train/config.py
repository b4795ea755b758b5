"""Training configuration: YAML → typed dataclasses, with command-line overrides.

    torchrun train/pretrain.py cfg.yaml --optim.lr=1e-4 --parallel.precision=fp32

Every key is checked: an unknown key or a value of the wrong type is an error that names
the key (`optim.lrr: unknown key`), never a silently ignored setting. The resolved config
is saved as YAML beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data.mixing import Source
from model.llama import PACKED_ATTENTION
from model.lora import LoRASettings


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    path: str = ""  # model directory (or any checkpoint model.convert reads)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # of the frozen weights
    # stage "embeddings": train only rows >= this id (the new tokens); None: all rows
    new_rows_from: int | None = None
    # QLoRA: the frozen base weights stored as NF4 (torchao), LoRA and modules_to_save in
    # higher precision; "none": as model.dtype says
    quantize: Literal["none", "nf4"] = "none"
    # how packed SFT rows and document-masked blocks attend: auto (flex on CUDA, the dense
    # mask elsewhere); flex (a BlockMask); varlen (torch's varlen flash kernel: CUDA with
    # parallel.precision bf16 or fp16); sdpa (SDPA with the dense mask, the exact reference)
    packed_attention: Literal[PACKED_ATTENTION] = "auto"  # type: ignore[valid-type]


@dataclass
class DataConfig:
    path: str = ""  # a directory made by `zhllama prepare`; or, instead, data.sources:
    # a mixture, e.g. English replay: [{path: tokens/zh, weight: 0.8}, {path: tokens/en,
    # weight: 0.2}] (optional name: per source, default the directory's name). Each block
    # (pretraining), sample or packed row (SFT) comes from the source furthest below its
    # share (data/mixing.py); each source has its own epochs and shuffle; metrics.jsonl
    # logs the realised share/NAME. Exactly one of path and sources (--data.path= clears
    # a config's path). Sources share one tokenizer and kind (and SFT template).
    sources: tuple[Source, ...] = ()
    # named validation sets, each directory read whole, in order: {zh: DIR, en: DIR},
    # logged as val/NAME/loss, ppl, acc every log.eval_every steps
    val_sets: dict[str, str] = field(default_factory=dict)
    block_size: int = 512  # pretraining: packed block length
    # held out for evaluation: pretraining, the tail of the token stream (whole documents);
    # SFT, the last samples. Logged as val_loss etc.; with data.sources, every source's
    # own tail, as val/NAME/loss etc.
    val_fraction: float = 0.0
    pack: bool = False  # SFT: several samples per row, attention kept inside each
    # pretraining: attention stays inside each document of a block and positions restart
    # at its start (the shards' document index), as Llama 3 trains
    document_mask: bool = False
    # SFT: the longest sample (and packed row); data prepared with a longer
    # --max_seq_length is refused. None: the data's own.
    max_seq_length: int | None = None

    def primary_path(self) -> str:
        """The directory that speaks for the run's data where one must (the SFT template an
        export records): data.path, or the first of data.sources."""
        return self.sources[0].path if self.sources else self.path

    def inputs(self) -> list[tuple[str, str]]:
        """(key, directory) of every token directory the run reads, training data first."""
        trained = [(f"data.sources[{i}].path", s.path) for i, s in enumerate(self.sources)]
        return (trained or [("data.path", self.path)]) + [(f"data.val_sets.{name}", path)
                                                          for name, path in self.val_sets.items()]


@dataclass
class OptimConfig:
    lr: float = 2e-4
    # the Hugging Face Trainer's schedules, step for step (see train/optim.py)
    schedule: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    min_lr_ratio: float = 0.0  # cosine decays to lr · min_lr_ratio (the Trainer: 0)
    warmup_ratio: float = 0.05  # of max_steps, rounded up; warmup_steps wins when set
    warmup_steps: int | None = None
    max_steps: int = 1000
    # passes over the training data instead (steps derived from its rows and the global
    # batch, rounded up); max_steps is then ignored
    epochs: float | None = None
    weight_decay: float = 0.01  # not applied to norms, biases and other 1-D parameters
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    micro_batch_size: int = 8  # sequences per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    clip_grad_norm: float | None = 1.0
    # adamw: torch's (fused on CUDA); adamw8bit: torchao's 8-bit AdamW (moments in 8 bits)
    name: Literal["adamw", "adamw8bit"] = "adamw"
    # tok_embeddings and output at their own rate (new rows often want another than LoRA's);
    # None: optim.lr. Scheduled like lr.
    embedding_lr: float | None = None


@dataclass
class ParallelConfig:
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    # none; full: every block; selective: every selective_every-th block; op: every block,
    # keeping the outputs of the costly ops (matmuls, attention) and recomputing the rest
    activation_checkpointing: Literal["none", "full", "selective", "op"] = "none"
    selective_every: int = 2  # "selective": checkpoint every n-th block
    # the checkpointed blocks' saved inputs kept in CPU memory until backward needs them
    activation_offload: bool = False
    # HSDP: shard within groups of world_size / replicate ranks (a node), replicate the
    # groups (across nodes); 1: plain FSDP over every rank
    replicate: int = 1
    compile: bool = False  # torch.compile each block
    loss_chunk_size: int = 4096  # tokens per chunk of the output layer + loss; 0: whole
    backend: Literal["auto", "nccl", "gloo"] = "auto"


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (0: only at the end)
    keep_last: int = 3


@dataclass
class LogConfig:
    every: int = 10
    eval_every: int = 0  # 0: no evaluation
    eval_batches: int = 20
    peak_tflops: float = 0.0  # per device, for MFU (e.g. 989 for an H100 in bf16); 0: not shown
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    plot: bool = True  # loss.png beside metrics.jsonl, redrawn at each evaluation (matplotlib)
    tensorboard: bool = False  # TensorBoard scalars in output_dir/tensorboard (tensorboard)


@dataclass
class TrainConfig:
    # embeddings: only tok_embeddings and output train (stage 1); lora: LoRA + modules_to_save
    # (stage 2, and instruction tuning); full: every parameter
    stage: Literal["embeddings", "lora", "full"] = "lora"
    output_dir: str = "runs/train"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # the model's own LoRA settings (model/lora.py): null fields take the defaults, or the
    # adapter's with lora.init_from
    lora: LoRASettings = field(default_factory=LoRASettings)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple and dataclasses.is_dataclass(args[0]):  # a list of mappings
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of mappings, got {value!r}")
        return tuple(_build(args[0], v, f"{key}[{i}].") for i, v in enumerate(value))
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, args[0], key) for v in items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], f"{key} (a name)"): _coerce(v, args[1], f"{key}.{k}")
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name in fields & set(data):
        tp, key = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key + ".")
        else:
            kwargs[name] = _coerce(data[name], tp, key)
    return cls(**kwargs)


def _set_override(data: dict[str, Any], override: str) -> None:
    """Apply '--section.key=value' (value parsed as YAML) to the raw dictionary."""
    if not override.startswith("--") or "=" not in override:
        raise ConfigError(f"override {override!r}: expected --section.key=value")
    path, _, raw = override[2:].partition("=")
    keys = path.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: {k} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw else ""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file (or start from defaults) and apply overrides; validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from None
    for o in overrides:
        _set_override(data, o)
    cfg = _build(TrainConfig, data, "")
    check(cfg)
    return cfg


def check(cfg: TrainConfig) -> None:
    """Cross-field and range checks that types alone cannot express."""
    o, p, lg = cfg.optim, cfg.parallel, cfg.log
    positive = [("optim.max_steps", o.max_steps), ("optim.micro_batch_size", o.micro_batch_size),
                ("optim.grad_accum", o.grad_accum), ("optim.lr", o.lr), ("data.block_size", cfg.data.block_size),
                ("lora.r", cfg.lora.r), ("lora.alpha", cfg.lora.alpha), ("log.every", lg.every),
                ("log.eval_batches", lg.eval_batches), ("log.max_bad_steps", lg.max_bad_steps),
                ("parallel.selective_every", p.selective_every), ("data.max_seq_length", cfg.data.max_seq_length),
                ("optim.epochs", o.epochs), ("optim.embedding_lr", o.embedding_lr), ("parallel.replicate", p.replicate)]
    for key, value in positive:
        if value is not None and value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    non_negative = [("optim.weight_decay", o.weight_decay), ("optim.warmup_steps", o.warmup_steps),
                    ("optim.eps", o.eps), ("optim.clip_grad_norm", o.clip_grad_norm),
                    ("parallel.loss_chunk_size", p.loss_chunk_size), ("log.eval_every", lg.eval_every),
                    ("log.peak_tflops", lg.peak_tflops), ("checkpoint.every", cfg.checkpoint.every),
                    ("checkpoint.keep_last", cfg.checkpoint.keep_last), ("model.new_rows_from", cfg.model.new_rows_from)]
    for key, value in non_negative:
        if value is not None and value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
    for key, value, top in (("data.val_fraction", cfg.data.val_fraction, 1), ("optim.warmup_ratio", o.warmup_ratio, 1),
                            ("optim.beta1", o.beta1, 1), ("optim.beta2", o.beta2, 1),
                            ("lora.dropout", cfg.lora.dropout, 1)):
        if not 0 <= value < top:
            raise ConfigError(f"{key}: must be in [0, {top}), got {value}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    if cfg.model.new_rows_from is not None and cfg.stage != "embeddings":
        raise ConfigError(f"model.new_rows_from: only for stage embeddings (stage is {cfg.stage!r})")
    if not cfg.model.path:
        raise ConfigError("model.path: required (a model directory)")
    if cfg.model.packed_attention == "varlen" and p.precision == "fp32":
        raise ConfigError("model.packed_attention: varlen (flash attention) needs parallel.precision "
                          "bf16 or fp16, not fp32")
    check_data(cfg.data)


def check_data(d: DataConfig) -> None:
    """data.path or data.sources (one of them), each source and validation set."""
    if d.path and d.sources:
        raise ConfigError("data.sources: set with data.path too; give one of them (--data.path= "
                          "clears a config's path)")
    if not d.path and not d.sources:
        raise ConfigError("data.path: required (a directory made by zhllama prepare), or "
                          "data.sources (a mixture of several)")
    named: dict[str, str] = {}
    for i, s in enumerate(d.sources):
        key = f"data.sources[{i}]"
        if not s.path:
            raise ConfigError(f"{key}.path: required (a directory made by zhllama prepare)")
        if not s.weight > 0 or not math.isfinite(s.weight):
            raise ConfigError(f"{key}.weight: must be positive{' and finite' if s.weight > 0 else ''}, "
                              f"got {s.weight}")
        _check_name(f"{key}.name" if s.name else f"{key}.path", s.label, named, key)
    for name, path in d.val_sets.items():
        key = f"data.val_sets.{name}"
        if not path:
            raise ConfigError(f"{key}: required (a directory made by zhllama prepare)")
        # with data.val_fraction, each source's held-out tail is validated under its name
        _check_name(key, name, named if d.val_fraction else {}, key)


def _check_name(key: str, name: str, taken: dict[str, str], owner: str) -> None:
    """A name for metrics.jsonl (share/NAME, val/NAME/loss): one path segment, not taken."""
    if not name or "/" in name or name != name.strip():
        raise ConfigError(f"{key}: {name!r} cannot name a source or validation set in the logs "
                          "(no '/', no surrounding spaces, not empty); set a name")
    if name in taken:
        why = " (its held-out tail, data.val_fraction, is validated under it)" if "val_sets" in key else ""
        raise ConfigError(f"{key}: the name {name!r} is {taken[name]}'s already{why}; choose another")
    taken[name] = owner


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)

    def lists(x: Any) -> Any:  # YAML-friendly: tuples as lists
        if isinstance(x, dict):
            return {k: lists(v) for k, v in x.items()}
        return list(x) if isinstance(x, tuple) else x

    return lists(d)


def dump(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
