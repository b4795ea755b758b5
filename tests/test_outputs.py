"""No command deletes or rewrites its own inputs, and outputs get the modes the umask gives.

Every command that writes is run on small real inputs with its output pointed at an input,
at the directory holding it, inside it, and through a symlink to it, with and without
--overwrite: each must stop with one `error:` line naming both paths, and leave every file
and directory of its inputs as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from data.prepare import main as prepare_main
from model.adapters import main as adapters_main
from model.convert import main as convert_main
from model.lora import LoRAConfig, save_adapter
from model.merge_lora import main as merge_lora_main
from model.resize import main as resize_main
from tokenizer.merge import main as merge_main
from tokenizer.train import main as train_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def material(stories260k: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zhllama model (stories260K), a corpus, SFT records, a Chinese sp model, the merged
    tokenizer (which extends the model's), an adapter."""
    from model.formats import read_checkpoint
    from tests.helpers import SHARED_DATA, require_shared

    lunyu, alpaca = SHARED_DATA / "corpus" / "lunyu.txt", SHARED_DATA / "sft" / "alpaca_zh_demo.json"
    require_shared(lunyu, alpaca)
    base = tmp_path_factory.mktemp("material")
    shutil.copytree(stories260k, base / "model")  # beside the other inputs, for `place`
    ckpt = read_checkpoint(base / "model")
    lines = lunyu.read_text(encoding="utf-8").splitlines()
    (base / "zh.txt").write_text("\n".join(lines[:300]) + "\n", encoding="utf-8")
    records = json.loads(alpaca.read_text(encoding="utf-8"))
    (base / "sft.json").write_text(json.dumps(records[:20], ensure_ascii=False), encoding="utf-8")
    train_main(["--input", str(base / "zh.txt"), "--model_prefix", str(base / "zh_sp"),
                "--vocab_size", "1200", "--model_type", "bpe", "--num_threads", "1"])
    merge_main(["--llama_tokenizer_dir", str(base / "model"), "--chinese_sp_model_file",
                str(base / "zh_sp.model"), "--output_dir", str(base / "merged")])
    args = ckpt.args
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(args.n_layers):
        state[f"layers.{i}.attention.wq.lora_a"] = torch.randn(4, args.dim, generator=g)
        state[f"layers.{i}.attention.wq.lora_b"] = torch.randn(args.dim, 4, generator=g)
    save_adapter(state, LoRAConfig(r=4, alpha=8, targets=("wq",)), base / "adapter",
                 base_vocab_size=args.vocab_size, vocab_size=args.vocab_size,
                 base_params=args.to_params())
    return base


def place(material: Path, root: Path, *names: str) -> None:
    """Copy pieces of the material under `root` (the test's own inputs)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = material / name
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, root / name)


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`: a file's sha256, a directory or link as such."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_main(main: Callable[[list[str]], None], argv: list[str],
             capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """(exit status, stderr) of a command's main() run in this process."""
    capsys.readouterr()
    try:
        main(argv)
        code: int | str | None = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # SystemExit("error: ...") prints its message at exit
        return 1, err + code + "\n"
    return code or 0, err


# Each command: its main, the inputs it is given (copied from the material under in/), the
# input X the output is aimed at, and its arguments for an output path. X/"sub" is the
# "inside" case, X.parent the "parent" case; `suffix` is what the output's name must end with.
Command = tuple[Callable, tuple[str, ...], str, Callable[[Path, str], list[str]], str]


def _train_input(root: Path) -> None:
    # sentencepiece writes PREFIX.model: a corpus file and a directory named *.model let
    # that output be the input, or a directory holding it
    (root / "d.model").mkdir(parents=True)
    shutil.move(root / "zh.txt", root / "d.model" / "zh.model")


COMMANDS: dict[str, Command] = {
    **{f"convert-{fmt}": (
        convert_main, ("model",), "model",
        lambda r, o, fmt=fmt: [str(r / "model"), o, "--to", fmt, "--no_progress"],
        ".gguf" if fmt == "gguf" else "")
       for fmt in ("zhllama", "hf", "meta", "gguf")},
    "convert-tokenizer-dir": (
        convert_main, ("model", "merged"), "merged",
        lambda r, o: [str(r / "model"), o, "--to", "hf", "--tokenizer", str(r / "merged"),
                      "--no_progress"], ""),
    "resize": (
        resize_main, ("model",), "model",
        lambda r, o: [str(r / "model"), "--tokenizer", str(r / "model"), "--output", o,
                      "--init", "mean", "--no_progress"], ""),
    "resize-tokenizer": (
        resize_main, ("model", "merged"), "merged",
        lambda r, o: [str(r / "model"), "--tokenizer", str(r / "merged"), "--output", o,
                      "--init", "mean", "--no_progress"], ""),
    "prepare": (
        prepare_main, ("zh.txt", "model"), "zh.txt",
        lambda r, o: ["--tokenizer", str(r / "model"), "--input", str(r / "zh.txt"),
                      "--output_dir", o, "--num_workers", "1"], ""),
    "prepare-tokenizer-dir": (
        prepare_main, ("zh.txt", "model"), "model",
        lambda r, o: ["--tokenizer", str(r / "model"), "--input", str(r / "zh.txt"),
                      "--output_dir", o, "--num_workers", "1"], ""),
    "prepare-sft": (
        prepare_main, ("sft.json", "model"), "sft.json",
        lambda r, o: ["--sft", "--tokenizer", str(r / "model" / "tokenizer.model"),
                      "--input", str(r / "sft.json"), "--output_dir", o, "--num_workers", "1"],
        ""),
    "tokenizer-merge": (
        merge_main, ("model", "zh_sp.model"), "model",
        lambda r, o: ["--llama_tokenizer_dir", str(r / "model"), "--chinese_sp_model_file",
                      str(r / "zh_sp.model"), "--output_dir", o], ""),
    "tokenizer-merge-chinese": (
        merge_main, ("model", "zh_sp.model"), "zh_sp.model",
        lambda r, o: ["--llama_tokenizer_dir", str(r / "model"), "--chinese_sp_model_file",
                      str(r / "zh_sp.model"), "--output_dir", o], ""),
    "tokenizer-train": (
        train_main, ("zh.txt",), "d.model/zh.model",
        lambda r, o: ["--input", str(r / "d.model" / "zh.model"),
                      "--model_prefix", o.removesuffix(".model"), "--vocab_size", "1200",
                      "--num_threads", "1"], ".model"),
    "merge-lora-base": (
        merge_lora_main, ("model", "adapter"), "model",
        lambda r, o: ["--base_model", str(r / "model"), "--lora_model", str(r / "adapter"),
                      "--output_type", "zhllama", "--output_dir", o, "--no_progress"], ""),
    "merge-lora-adapter": (
        merge_lora_main, ("model", "adapter"), "adapter",
        lambda r, o: ["--base_model", str(r / "model"), "--lora_model", str(r / "adapter"),
                      "--output_type", "huggingface", "--output_dir", o, "--no_progress"], ""),
    "merge-lora-gguf": (
        merge_lora_main, ("model", "adapter"), "model",
        lambda r, o: ["--base_model", str(r / "model"), "--lora_model", str(r / "adapter"),
                      "--output_type", "gguf", "--output_dir", o, "--no_progress"], ""),
    "adapters-peft": (
        adapters_main, ("adapter",), "adapter",
        lambda r, o: [str(r / "adapter"), o], ""),
}
# A .gguf goes into --output_dir: into the directory holding the base is allowed (it
# replaces nothing of it), so only the cases that land inside the base apply.
_SKIP = {("merge-lora-gguf", "parent"), ("merge-lora-gguf", "symlink")}
CASES = [(c, how, ow) for c in COMMANDS for how in ("is", "parent", "inside", "symlink")
         for ow in (False, True) if (c, how) not in _SKIP]


@pytest.mark.parametrize("command,how,overwrite", CASES,
                         ids=[f"{c}-{h}{'-overwrite' if o else ''}" for c, h, o in CASES])
def test_output_over_an_input_is_refused_and_the_inputs_stay(material, tmp_path, capsys,
                                                              command, how, overwrite):
    main, names, target, argv, suffix = COMMANDS[command]
    root = tmp_path / "in"
    place(material, root, *names)
    if command == "tokenizer-train":
        _train_input(root)
    x = root / target
    if how == "is":
        out = x
    elif how == "parent":
        out = x.parent
    elif how == "inside":
        out = x / f"sub{suffix}"
    else:  # a link elsewhere to the directory holding the input
        (tmp_path / "other").mkdir()
        out = tmp_path / "other" / f"link{suffix}"
        out.symlink_to(x.parent, target_is_directory=True)
    before = snapshot(tmp_path)
    code, err = run_main(main, argv(root, str(out)) + ["--overwrite"] * overwrite, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1, err
    line = errors[0]
    assert f"output {out}" in line and "the input " in line and "refusing" in line, line
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before  # nothing changed, nothing created


def test_refusal_from_the_command_line_has_no_traceback(material, tmp_path):
    place(material, tmp_path / "in", "model")
    before = snapshot(tmp_path)
    r = subprocess.run([sys.executable, "-m", "model.convert", str(tmp_path / "in" / "model"),
                        str(tmp_path / "in"), "--to", "zhllama", "--overwrite", "--no_progress"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: output {tmp_path / 'in'} contains the input {tmp_path / 'in' / 'model'}: "
        "refusing to replace it (choose another output)")
    assert snapshot(tmp_path) == before


def test_an_input_reached_through_a_link_inside_the_output_is_kept(material, tmp_path, capsys):
    """Replacing the output would delete the link the input is given by."""
    place(material, tmp_path / "real", "model")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model").symlink_to(tmp_path / "real" / "model")
    before = snapshot(tmp_path)
    code, err = run_main(convert_main, [str(tmp_path / "out" / "model"), str(tmp_path / "out"),
                                        "--to", "hf", "--overwrite", "--no_progress"], capsys)
    assert code != 0 and "contains the input" in err
    assert snapshot(tmp_path) == before


# --- modes -------------------------------------------------------------------------------

@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(path: Path) -> set[tuple[str, int]]:
    """(kind, permission bits) of `path` and of everything under it."""
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in entries}


def expected(mask: int, *kinds: str) -> set[tuple[str, int]]:
    return {(k, (0o777 if k == "dir" else 0o666) & ~mask) for k in kinds}


def test_outputs_get_the_modes_of_the_umask(material, tmp_path, capsys, umask):
    model = material / "model"
    runs = [
        (convert_main, [str(model), str(tmp_path / "m"), "--to", "zhllama", "--no_progress"],
         tmp_path / "m", ("dir", "file")),
        (convert_main, [str(model), str(tmp_path / "hf"), "--to", "hf", "--no_progress"],
         tmp_path / "hf", ("dir", "file")),
        (convert_main, [str(model), str(tmp_path / "g" / "m.gguf"), "--to", "gguf", "--no_progress"],
         tmp_path / "g" / "m.gguf", ("file",)),
        (merge_main, ["--llama_tokenizer_dir", str(model), "--chinese_sp_model_file",
                      str(material / "zh_sp.model"), "--output_dir", str(tmp_path / "tok")],
         tmp_path / "tok", ("dir", "file")),
        (prepare_main, ["--tokenizer", str(model), "--input", str(material / "zh.txt"),
                        "--output_dir", str(tmp_path / "tokens"), "--num_workers", "1"],
         tmp_path / "tokens", ("dir", "file")),
        (merge_lora_main, ["--base_model", str(model), "--lora_model", str(material / "adapter"),
                           "--output_type", "gguf", "--output_dir", str(tmp_path / "merged"),
                           "--no_progress"], tmp_path / "merged", ("dir", "file")),
    ]
    for main, argv, out, kinds in runs:
        code, err = run_main(main, argv, capsys)
        assert code == 0, err
        assert modes(out) == expected(umask, *kinds), out
    code, err = run_main(train_main, ["--input", str(material / "zh.txt"), "--model_prefix",
                                      str(tmp_path / "sp" / "zh"), "--vocab_size", "1200",
                                      "--num_threads", "1"], capsys)
    assert code == 0, err
    for out in (tmp_path / "sp" / "zh.model", tmp_path / "sp" / "zh.vocab"):
        assert modes(out) == expected(umask, "file"), out
    assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == ["zh.model", "zh.vocab"]


# --- tokenizer.train leaves nothing behind ---------------------------------------------------

def test_tokenizer_train_failure_leaves_no_directory(material, tmp_path, capsys):
    code, err = run_main(train_main, ["--input", str(material / "zh.txt"), "--model_prefix",
                                      str(tmp_path / "new" / "deeper" / "zh"), "--vocab_size",
                                      "100000", "--num_threads", "1"], capsys)
    assert code != 0 and any(line.startswith("error:") for line in err.splitlines()), err
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_train_removes_temporaries_of_killed_runs(material, tmp_path, capsys):
    p = subprocess.Popen(["true"])
    p.wait()
    stale = tmp_path / f".zh.model.tmp-{p.pid}-abcdefgh"
    stale.mkdir()
    (stale / "zh.model").write_text("half")
    live = tmp_path / f".zh.model.tmp-{os.getppid()}-ijklmnop"  # a run still going
    live.mkdir()
    code, err = run_main(train_main, ["--input", str(material / "zh.txt"), "--model_prefix",
                                      str(tmp_path / "zh"), "--vocab_size", "1200",
                                      "--num_threads", "1"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "zh.model", "zh.vocab"]
