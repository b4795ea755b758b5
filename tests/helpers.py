"""What several test files share: where the real test material lives and the one check for
its absence, the published figures the tests compare against, the training tests' helpers,
and the session fixtures (registered in conftest.py) that are built once per test run.

Session fixtures are read-only for the tests: a test copies what it wants to change into its
own `tmp_path`. Each one hashes its directory when built and again at the end of the run,
and reports an error naming the files if a test changed them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The real test material (tokenizers, corpus, stories260K) lies beside the checkout.
SHARED_DATA = Path(os.environ.get("ZHLLAMA_SHARED_DATA", REPO.parent / "shared" / "data"))
# Set to 1 (`make test` does under CI) and missing material fails the test instead of
# skipping it: a run that has the files cannot pass by skipping the tests that need them.
REQUIRE_SHARED_DATA = "ZHLLAMA_REQUIRE_SHARED_DATA"

# Vocabulary sizes as published, for the tests that check our files against them.
LLAMA_VOCAB = 32_000  # Meta's tokenizer.model (SOURCES.md: vocab_size 32000)
# Chinese-LLaMA's merged tokenizer.model: Chinese-LLaMA-Alpaca's wiki (训练细节, 词表扩充)
# and SHA256.md; the Chinese-Alpaca tokenizer is the same plus <pad> at id 49,953
# (Chinese-LLaMA-Alpaca issue #510; its run_clm_sft_with_peft.py checks for 49,954).
CHINESE_LLAMA_VOCAB = 49_953
CHINESE_ALPACA_VOCAB = 49_954
CHINESE_LLAMA2_VOCAB = 55_296  # Chinese-LLaMA-Alpaca-2's README (SOURCES.md: 55,296 pieces)


def require_shared(*paths: Path) -> None:
    """Skip the test when some real test material is absent, or fail it when
    ZHLLAMA_REQUIRE_SHARED_DATA=1. Every test that needs the material checks through here."""
    missing = [str(p) for p in (paths or (SHARED_DATA,)) if not p.exists()]
    if not missing:
        return
    message = f"real test material not found: {', '.join(missing)}"
    if os.environ.get(REQUIRE_SHARED_DATA) == "1":
        pytest.fail(message + f" ({REQUIRE_SHARED_DATA}=1)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real test material (or a skip, or a failure: see `require_shared`)."""
    require_shared(SHARED_DATA)
    return SHARED_DATA


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path; directories as such."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def read_only(root: Path) -> Iterator[Path]:
    """Yield `root` to the tests, then check that none of them changed anything under it."""
    before = tree_hashes(root)
    yield root
    after = tree_hashes(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"tests changed a session fixture's files under {root}: {changed[:10]}"


# --------------------------------------------------------------------------------------
# stories260K: a real, trained LLaMA (llama2.c's .bin) and its tok512 tokenizer

@pytest.fixture(scope="session")
def stories260k(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """stories260K converted once to a zhllama model directory (with tok512.model)."""
    from model.convert import convert

    src = SHARED_DATA / "models" / "stories260K"
    require_shared(src / "stories260K.bin", src / "tok512.model")
    out = tmp_path_factory.mktemp("stories260K") / "model"
    convert(src / "stories260K.bin", out, "zhllama", tokenizer=src / "tok512.model", progress=False)
    yield from read_only(out)


# --------------------------------------------------------------------------------------
# the toy world of the training tests, and how they launch and read runs

TINY = ["--parallel.precision=fp32", "--log.every=1", "--lora.dropout=0.0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# settings that keep a run short: small blocks, no evaluation, no held-out split
FAST = ["--data.block_size=32", "--log.eval_every=0", "--data.val_fraction=0",
        "--optim.warmup_steps=2"]


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A toy tokenizer (with pad), a tiny model, pretraining and SFT data: all from the
    embedded corpus, so the training tests need nothing from outside the repository."""
    import sentencepiece as spm

    from data.toy import chinese_documents, english_documents
    from model.formats import write_model_dir
    from model.llama import named_args
    from model.source import from_state_dict
    from tokenizer.merge import add_pad_piece
    from tokenizer.spm_io import read_proto
    from tests.conftest import random_model
    from tokenizer.train import main as train_tokenizer

    root = tmp_path_factory.mktemp("world")
    text = root / "corpus.txt"
    docs = english_documents(300) + chinese_documents(300)
    text.write_text("\n".join(docs) + "\n", encoding="utf-8")
    train_tokenizer(["--input", str(text), "--model_prefix", str(root / "sp"), "--vocab_size", "600",
                     "--model_type", "bpe", "--character_coverage", "1.0", "--input_sentence_size", "0",
                     "--max_sentence_length", "16384", "--num_threads", "1"])
    proto = read_proto(root / "sp.model")
    add_pad_piece(proto)
    (root / "tokenizer.model").write_bytes(proto.SerializeToString())
    vocab = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model")).vocab_size()
    model = random_model(named_args("tiny", vocab_size=vocab), std=0.05)
    write_model_dir(from_state_dict(model.state_dict(), model.args, tokenizer=root / "tokenizer.model"),
                    root / "base", progress=False)
    records = [{"instruction": "续写：" + d[:12], "input": "", "output": d[12:]} for d in docs[300:420]]
    (root / "sft.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    for args in (["--input", str(text), "--output_dir", str(root / "tokens")],
                 ["--sft", "--input", str(root / "sft.json"), "--output_dir", str(root / "sft"),
                  "--max_seq_length", "320"]):
        r = subprocess.run([sys.executable, "-m", "data.prepare", "--tokenizer",
                            str(root / "tokenizer.model"), "--num_workers", "1", *args],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    yield from read_only(root)


def train_cmd(script: str, config: str, world: Path, out: Path, *extra: str, nproc: int = 1) -> list[str]:
    """The command line of a tiny run of train/{script}.py on the world's model and data."""
    data = world / ("sft" if script == "sft" else "tokens")
    args = [str(REPO / "configs" / "tiny" / config), f"--model.path={world / 'base'}",
            f"--data.path={data}", f"--output_dir={out}", *TINY, *extra]
    if nproc == 1:
        return [sys.executable, str(REPO / "train" / f"{script}.py"), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", str(REPO / "train" / f"{script}.py"), *args]


def run(cmd: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    """Run a command on one thread; unless `ok` is False, assert that it succeeded."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def one_error(r: subprocess.CompletedProcess, code: int = 1) -> str:
    """The single `error:` line of a failed run (and no traceback)."""
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def metrics(out: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path, key: str = "loss") -> list[float]:
    """One figure (the training loss by default) of every row that has it."""
    return [r[key] for r in metrics(out) if key in r]


def hf_lrs(schedule: str, lr: float, warmup: int, max_steps: int, min_lr_ratio: float) -> list[float]:
    """The rate of each optimizer step under transformers' own scheduler, stepped as the
    Trainer steps it (optimizer.step, then scheduler.step)."""
    import torch
    from transformers import optimization as hf

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    if schedule == "cosine" and min_lr_ratio:
        sched = hf.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, max_steps, min_lr_rate=min_lr_ratio)
    elif schedule == "cosine":
        sched = hf.get_cosine_schedule_with_warmup(opt, warmup, max_steps)
    elif schedule == "linear":
        sched = hf.get_linear_schedule_with_warmup(opt, warmup, max_steps)
    else:
        sched = hf.get_constant_schedule_with_warmup(opt, warmup)
    out = []
    for _ in range(max_steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out
