"""The canonical model directory, which every converter reads and writes.

    params.json          Meta's keys, with the real vocab size (never -1)
    model.safetensors    Meta's tensor names and rotary layout (or model-0000k-of-0000n
                         .safetensors + model.safetensors.index.json past --max_shard_size)
    tokenizer.model      the sentencepiece model, when known
    zhllama.json         manifest: format version, dtype, tokenizer sha256, source, and the
                         SFT template the model was tuned with (null when none is known)

Loading is strict: every tensor must be present with the shape params.json implies.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tokenizer.files import Inputs, atomic_output_dir, sha256_file
from tokenizer.schema import Field, check_fields
from tokenizer.templates import TEMPLATES

from ..llama import ModelArgs
from ..source import Checkpoint, check_specs
from ..tensor_io import (
    MODEL_DTYPES, FormatError, Reopening, TensorSpec, dtype_name, open_safetensors, read_json,
    read_weight_index, safetensors_dtype, write_sharded_safetensors,
)
from .meta import read_params
from .options import ReadOptions, WriteOptions, refuse_shards, tensors_as_asked
from .progress import tensor_progress

FORMAT_VERSION = 1
MANIFEST = "zhllama.json"
# The manifest keys a reader uses; the others only describe the directory to a person.
MANIFEST_FIELDS = {"template": Field("string", choices=tuple(TEMPLATES), required=False,
                                     nullable=True)}


def is_model_dir(path: Path) -> bool:
    return (path / "params.json").exists() and (
        (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()
    )


def _weight_files(path: Path) -> dict[str, str]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return read_weight_index(index)
    f = path / "model.safetensors"
    if not f.exists():
        raise FormatError(f"{path}: model.safetensors is missing")
    with open_safetensors(f) as st:
        return {k: f.name for k in st.keys()}


def _open_safetensors(f: Path):
    if not f.exists():
        raise FormatError(f"{f}: listed in the weight index but missing")
    return open_safetensors(f)


def read_template(path: Path) -> str | None:
    """The SFT template the manifest records; None without one (older directories have none)."""
    where = path / MANIFEST
    if not where.exists():
        return None
    manifest = read_json(where)
    if not isinstance(manifest, dict):
        raise FormatError(f"{where}: not a JSON object")
    return check_fields(manifest, MANIFEST_FIELDS, where, FormatError).get("template")


def read_model_dir(path: str | Path) -> Checkpoint:
    """Open a canonical model directory lazily, checking every shape against params.json."""
    path = Path(path)
    params = read_params(path)
    try:
        args = ModelArgs.from_params(params)
    except (ValueError, TypeError) as e:
        raise FormatError(f"{path / 'params.json'}: {e}") from None
    weight_map = _weight_files(path)
    files = {f: Reopening(lambda f=f: _open_safetensors(path / f)) for f in set(weight_map.values())}
    specs = {}
    for name, fname in weight_map.items():
        sl = files[fname].get().get_slice(name)
        dtype = safetensors_dtype(sl.get_dtype(), MODEL_DTYPES, path / fname, name)
        specs[name] = TensorSpec(tuple(sl.get_shape()), dtype)
    specs = check_specs(specs, args, path, declared="params.json n_layers")

    def get(name: str) -> torch.Tensor:
        opener = files[weight_map[name]]
        try:
            t = opener.get(specs[name].nbytes).get_tensor(name)
        except Exception as e:
            raise FormatError(f"{path / weight_map[name]}: cannot read {name} ({e})") from None
        opener.account(t.nbytes)
        return t

    tokenizer = path / "tokenizer.model"
    return Checkpoint("zhllama", path, args, specs, get, tokenizer if tokenizer.exists() else None,
                      read_template(path))


def write_model_dir(
    ckpt: Checkpoint,
    dst: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 5 << 30,
    progress: bool = True,
    inputs: Inputs = (),
) -> Path:
    """Write the canonical directory (atomically: a temporary directory renamed at the end).

    `dst` may not overlap the checkpoint's own path and tokenizer, nor `inputs` (other
    paths it was made from): a replaced output would take them with it.
    """
    manifest = {
        "format": "zhllama-model",
        "format_version": FORMAT_VERSION,
        "dtype": dtype_name(ckpt.main_dtype()),
        "num_params": sum(int(torch.Size(s.shape).numel()) for s in ckpt.specs.values()),
        "tokenizer_sha256": sha256_file(ckpt.tokenizer) if ckpt.tokenizer else None,
        "source": {"format": ckpt.format, "name": ckpt.path.name if ckpt.path else None},
        # so that a Hugging Face export made from this directory gets its chat_template
        "template": ckpt.template,
    }
    with atomic_output_dir(dst, overwrite, inputs=(ckpt.path, ckpt.tokenizer, *inputs)) as out, \
            tensor_progress(ckpt.specs, "model", progress) as tick:
        write_sharded_safetensors(out, "model", ckpt.specs, ckpt.get, max_shard_bytes,
                                  metadata={"format": "pt"}, on_tensor=tick)
        (out / "params.json").write_text(json.dumps(ckpt.args.to_params(), indent=2) + "\n")
        if ckpt.tokenizer is not None:
            shutil.copyfile(ckpt.tokenizer, out / "tokenizer.model")
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(dst)


# The registry's protocol (model/formats/__init__.py).
detect = is_model_dir


def read(path: Path, opts: ReadOptions) -> Checkpoint:
    return read_model_dir(path)


def write(ckpt: Checkpoint, dst: Path, opts: WriteOptions) -> Checkpoint:
    ckpt = tensors_as_asked(ckpt, opts)
    refuse_shards(opts)
    write_model_dir(ckpt, dst, overwrite=opts.overwrite, max_shard_bytes=opts.max_shard_bytes,
                    progress=opts.progress, inputs=opts.inputs)
    return ckpt
