"""Meta's original checkpoints: `consolidated.NN.pth` model-parallel shards + `params.json`.

Meta's code splits each weight over N model-parallel ranks the way fairscale's parallel
layers do: column-parallel projections (wq, wk, wv, w1, w3, output) by output rows (dim
0), row-parallel ones (wo, w2) by input columns (dim 1), the embedding by its feature
columns (dim 1); norms are replicated. Reading concatenates along that dimension;
writing slices along it, so every shard is the same size.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tokenizer.files import Inputs, atomic_output_dir
from tokenizer.schema import check_fields

from ..llama import PARAMS_FIELDS, ModelArgs
from ..source import Checkpoint, check_specs
from ..tensor_io import FormatError, Reopening, TensorSpec, read_json, safe_torch_load
from .options import ReadOptions, WriteOptions, tensors_as_asked
from .progress import tensor_progress

_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
_DROPPED = {"rope.freqs"}  # a precomputed buffer some releases saved; recomputed instead


def split_dim(name: str) -> int | None:
    """The dimension a tensor is split along across model-parallel shards (None: replicated)."""
    if name == "tok_embeddings.weight":
        return 1
    if name == "output.weight":
        return 0
    kind = name.split(".")[-2] if name.startswith("layers.") else ""
    if kind in ("wq", "wk", "wv", "w1", "w3"):
        return 0
    if kind in ("wo", "w2"):
        return 1
    return None


def shard_files(path: Path) -> list[Path]:
    """`consolidated.00.pth` … in order, checking that the numbering has no gaps."""
    found = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _SHARD.fullmatch(p.name)))
    if not found:
        raise FormatError(f"{path}: no consolidated.NN.pth files")
    numbers = [n for n, _ in found]
    if numbers != list(range(len(found))):
        raise FormatError(f"{path}: shard numbers {numbers} are not 00..{len(found) - 1:02d}")
    return [p for _, p in found]


def verify_checklist(path: Path, progress: bool = True) -> None:
    """Check the md5 sums in `checklist.chk` (Meta's download ships one), if present."""
    chk = path / "checklist.chk"
    if not chk.exists():
        return
    entries = []
    for lineno, line in enumerate(chk.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2:
                raise FormatError(f"{chk}:{lineno}: expected 'md5  filename', got {line!r}")
            entries.append((parts[0].lower(), path / parts[1].lstrip("*")))
    missing = [f.name for _, f in entries if not f.exists()]
    if missing:  # before hours of hashing, not after
        raise FormatError(f"{chk}: lists {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} missing")
    total = sum(f.stat().st_size for _, f in entries)
    with tqdm(total=total, desc="md5", unit="B", unit_scale=True, disable=not progress) as bar:
        for expected, f in entries:
            if md5_file(f, bar.update) != expected:
                raise FormatError(f"{f}: md5 does not match checklist.chk (corrupt or truncated download?)")


def md5_file(path: Path, on_chunk=None, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
            if on_chunk:
                on_chunk(len(chunk))
    return digest.hexdigest()


def read_params(path: Path) -> dict[str, Any]:
    """params.json of a Meta or canonical directory, every key checked for type and range
    (before any checksum, shard or tensor is read)."""
    params_file = path / "params.json"
    return check_fields(read_json(params_file), PARAMS_FIELDS, params_file, FormatError)


def check_shard_count(path: Path, params: dict[str, Any], shards: list[dict[str, torch.Tensor]]) -> None:
    """Name the shards that are missing, which the numbering alone cannot show when the
    last ones are gone: each shard holds dim / n columns of the embedding."""
    emb, dim = shards[0].get("tok_embeddings.weight"), params.get("dim")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or not isinstance(dim, int):
        return  # the shape checks that follow explain these
    cols = emb.shape[1]
    if 0 < cols < dim and dim % cols == 0 and dim // cols > len(shards):
        n = dim // cols
        missing = [f"consolidated.{i:02d}.pth" for i in range(len(shards), n)]
        raise FormatError(f"{path}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          f"missing: params.json's dim {dim} over {cols} embedding columns per "
                          f"shard makes {n} shards, found {len(shards)}")


def _merged_specs(shards: list[dict[str, torch.Tensor]], where: Path) -> dict[str, TensorSpec]:
    """Shapes after concatenating the shards, checking every shard has the same tensors."""
    names = [n for n in shards[0] if n not in _DROPPED]
    for i, shard in enumerate(shards[1:], 1):
        if set(shard) != set(shards[0]):
            diff = sorted(set(shard) ^ set(shards[0]))
            raise FormatError(f"{where}: consolidated.{i:02d}.pth and .00 hold different tensors ({diff[0]})")
    specs = {}
    for name in names:
        t0, dim = shards[0][name], split_dim(name)
        shape = list(t0.shape)
        if dim is not None:
            if t0.dim() <= dim:
                raise FormatError(f"{where}: tensor {name} has shape {shape}, expected a matrix")
            shape[dim] = sum(s[name].shape[dim] for s in shards)
        specs[name] = TensorSpec(tuple(shape), t0.dtype)
    return specs


def read_meta(
    path: str | Path, *, verify_checksum: bool = True, progress: bool = True
) -> Checkpoint:
    """Open Meta's checkpoint directory lazily (tensors are mapped, not read, until fetched)."""
    path = Path(path)
    params = read_params(path)
    files = shard_files(path)
    opened = [Reopening(lambda f=f: safe_torch_load(f)) for f in files]
    try:
        shards = [o.get() for o in opened]
        for f, shard in zip(files, shards):
            if not isinstance(shard, dict) or not all(isinstance(t, torch.Tensor) for t in shard.values()):
                raise FormatError(f"{f}: expected a dictionary of tensors")
    except FormatError:
        if verify_checksum:  # a corrupt download explains an unreadable shard best
            verify_checklist(path, progress)
        raise
    check_shard_count(path, params, shards)
    specs = _merged_specs(shards, path)
    if "tok_embeddings.weight" not in specs:
        raise FormatError(f"{path}: tensor tok_embeddings.weight is missing")
    try:
        args = ModelArgs.from_params(params, vocab_size=specs["tok_embeddings.weight"].shape[0])
    except (ValueError, TypeError) as e:
        raise FormatError(f"{path / 'params.json'}: {e}") from None
    specs = check_specs(specs, args, path, declared="params.json n_layers")
    del shards
    if verify_checksum:  # after the headers: parameters that cannot fit cost no md5 pass
        verify_checklist(path, progress)

    def get(name: str) -> torch.Tensor:
        dim = split_dim(name)
        part_bytes = specs[name].nbytes // (1 if dim is None else len(opened))
        parts = [o.get(part_bytes)[name] for o in opened]
        t = parts[0].clone() if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
        for o, p in zip(opened, parts):
            o.account(p.nbytes)
        return t

    return Checkpoint("meta", path, args, specs, get, _find_tokenizer(path))


def _find_tokenizer(path: Path) -> Path | None:
    # Meta's download puts tokenizer.model beside the model folders, not inside them.
    for candidate in (path / "tokenizer.model", path.parent / "tokenizer.model"):
        if candidate.exists():
            return candidate
    return None


def check_divisible(ckpt: Checkpoint, n_shards: int) -> None:
    """Refuse a split that would give shards of unequal size (llama.cpp and Meta's code need equal)."""
    args = ckpt.args
    if args.vocab_size % n_shards:
        raise FormatError(
            f"vocab_size {args.vocab_size} does not divide into {n_shards} equal shards: "
            f"Meta's loader and llama.cpp need every shard the same size. Pass "
            f"--pad_vocab_to_multiple_of {n_shards} (or 64, friendlier to GPUs) to add zero rows, "
            f"or use --shards 1."
        )
    checks = {"dim": args.dim, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
              "hidden_dim": args.hidden_dim}
    for what, size in checks.items():
        if size % n_shards:
            raise FormatError(f"{what} {size} does not split into {n_shards} shards; choose another --shards")


def _skeleton(ckpt: Checkpoint, n_shards: int) -> dict[str, torch.Tensor]:
    """Uninitialised tensors with one shard's shapes (torch.empty touches no memory)."""
    out = {}
    for name, spec in ckpt.specs.items():
        shape, dim = list(spec.shape), split_dim(name)
        if dim is not None:
            shape[dim] //= n_shards
        out[name] = torch.empty(shape, dtype=spec.dtype)
    return out


def _write_shards(ckpt: Checkpoint, out: Path, n_shards: int, tick) -> None:
    """Write every shard's skeleton, then fill all shards tensor by tensor.

    `torch.save` needs a shard's whole dictionary in memory. Instead, the file layout is
    written first without data (`skip_data`), then the files are mapped shared and each
    tensor is copied into place: the full model is never in memory.
    """
    files = [out / f"consolidated.{i:02d}.pth" for i in range(n_shards)]
    skeleton = _skeleton(ckpt, n_shards)
    with torch.serialization.skip_data():
        for f in files:
            torch.save(skeleton, f)
    del skeleton
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        opened = [Reopening(lambda f=f: torch.load(f, mmap=True, weights_only=True)) for f in files]
        for name in ckpt.specs:
            full, dim = ckpt.get(name), split_dim(name)
            pieces = [full] * n_shards if dim is None else full.chunk(n_shards, dim=dim)
            for o, piece in zip(opened, pieces):
                o.get(piece.nbytes)[name].copy_(piece)
                o.account(piece.nbytes)
            tick(name)


def meta_params(args: ModelArgs) -> dict[str, Any]:
    """params.json as Meta writes it: only the keys Meta's own files carry, so that Meta's
    `ModelArgs(max_seq_len=..., max_batch_size=..., **params)` accepts it.

    n_kv_heads only under GQA and ffn_dim_multiplier only when set (Llama 2 70B's files);
    rope_theta only when it is not 10,000 (Code Llama's files; Llama 2's ModelArgs has no
    such field); never max_seq_len, which Meta's code takes as an argument. The vocabulary
    size is the real one, not Meta's -1 (the tokenizer decides it there).
    """
    params: dict[str, Any] = {"dim": args.dim, "multiple_of": args.multiple_of}
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    params["n_heads"] = args.n_heads
    if args.n_kv_heads is not None and args.n_kv_heads != args.n_heads:
        params["n_kv_heads"] = args.n_kv_heads
    params.update(n_layers=args.n_layers, norm_eps=args.norm_eps, vocab_size=args.vocab_size)
    if args.rope_theta != 10000.0:
        params["rope_theta"] = args.rope_theta
    return params


def write_meta(
    ckpt: Checkpoint,
    dst: str | Path,
    *,
    n_shards: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    inputs: Inputs = (),
) -> Path:
    """Write Meta's layout: N equal `consolidated.NN.pth`, `params.json`, `checklist.chk`.

    `dst` may not overlap the checkpoint's own path and tokenizer, nor `inputs`.
    """
    check_divisible(ckpt, n_shards)
    with atomic_output_dir(dst, overwrite, inputs=(ckpt.path, ckpt.tokenizer, *inputs)) as out, \
            tensor_progress(ckpt.specs, "meta", progress) as tick:
        _write_shards(ckpt, out, n_shards, tick)
        (out / "params.json").write_text(json.dumps(meta_params(ckpt.args), indent=2) + "\n")
        if ckpt.tokenizer is not None:
            shutil.copyfile(ckpt.tokenizer, out / "tokenizer.model")
        sums = [f"{md5_file(f)}  {f.name}" for f in sorted(out.iterdir())]
        (out / "checklist.chk").write_text("\n".join(sums) + "\n")
    return Path(dst)


# The registry's protocol (model/formats/__init__.py).
def detect(path: Path) -> bool:
    """A directory of consolidated.NN.pth; one of its shards alone is refused by name."""
    if path.is_file() and path.name.startswith("consolidated.") and path.suffix == ".pth":
        raise FormatError(f"{path}: give the directory holding the consolidated.*.pth and params.json")
    return path.is_dir() and any(path.glob("consolidated.*.pth"))


def read(path: Path, opts: ReadOptions) -> Checkpoint:
    return read_meta(path, verify_checksum=opts.verify_checksum, progress=opts.progress)


def write(ckpt: Checkpoint, dst: Path, opts: WriteOptions) -> Checkpoint:
    ckpt = tensors_as_asked(ckpt, opts)
    write_meta(ckpt, dst, n_shards=opts.shards, overwrite=opts.overwrite, progress=opts.progress,
               inputs=opts.inputs)
    return ckpt
