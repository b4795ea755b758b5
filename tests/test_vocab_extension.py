"""experiments/vocab_extension.py at its tiny size, end to end on the real material
(stories260K, its tok512 tokenizer, the CMRC 2018 Chinese text): every arm for every
seed, finite positive bits per character, a table that says what results.json says, a
PNG, and arms that really trained on the vocabulary they claim (read back with
sentencepiece and safetensors, not with our code). Bad --out values fail at once."""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys

import pytest

from tests.helpers import ENV, REPO, SHARED_DATA, one_error, require_shared

SCRIPT = REPO / "experiments" / "vocab_extension.py"
STORIES = SHARED_DATA / "models" / "stories260K"
CORPUS = SHARED_DATA / "corpus" / "cmrc2018_contexts.txt"
SEEDS = 2


def inputs() -> list[str]:
    return ["--base", str(STORIES / "stories260K.bin"), "--tokenizer", str(STORIES / "tok512.model"),
            "--zh_corpus", str(CORPUS)]


def experiment(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One --tiny run: (its --out, what it printed, results.json)."""
    require_shared(STORIES / "stories260K.bin", STORIES / "tok512.model", CORPUS)
    out = tmp_path_factory.mktemp("vocab") / "out"
    r = experiment(*inputs(), "--out", str(out), "--tiny", "--seeds", str(SEEDS))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout, json.loads((out / "results.json").read_text())


def test_every_arm_for_every_seed(tiny):
    out, stdout, results = tiny
    arms = {a["key"]: a for a in results["arms"]}
    assert sorted(arms) == list("abcdef")
    for arm in arms.values():
        assert [r["seed"] for r in arm["seeds"]] == list(range(SEEDS)), arm["key"]
        for row in arm["seeds"]:
            for key in ("zh", "en", "zh_dev"):
                assert math.isfinite(row[key]) and row[key] > 0, (arm["key"], row)
            assert (out / row["adapter"] / "adapter_model.safetensors").is_file()
    # every command it ran is printed, and so is every figure
    assert stdout.count("$ zhllama pretrain ") == len(arms) * SEEDS + SEEDS  # arm e: two stages
    for arm in arms.values():
        for row in arm["seeds"]:
            assert f"[{arm['key']} seed {row['seed']}] bits/char: zh test {row['zh']:.4f}" in stdout


def test_arms_trained_on_the_vocabulary_they_claim(tiny):
    import sentencepiece as spm
    from safetensors import safe_open

    out, _, results = tiny
    base = spm.SentencePieceProcessor(model_file=str(STORIES / "tok512.model")).vocab_size()
    merged = spm.SentencePieceProcessor(model_file=str(out / "tokenizers" / "merged" / "tokenizer.model"))
    assert base == 512 and merged.vocab_size() > base
    for arm in results["arms"]:
        want = base if arm["key"] == "a" else merged.vocab_size()
        assert arm["tokenizer_pieces"] == want
        for row in arm["seeds"]:
            adapter = out / row["adapter"]
            sp = spm.SentencePieceProcessor(model_file=str(adapter / "tokenizer.model"))
            assert sp.vocab_size() == want, (arm["key"], row["seed"])
            with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
                for name in ("tok_embeddings.weight", "output.weight"):
                    assert f.get_slice(name).get_shape()[0] == want, (arm["key"], name)
    # arm a's byte fallback really is the way its Chinese went: the Chinese training text
    # takes about 3 byte tokens per character without the merged pieces
    text = (out / "corpus" / "zh-train.txt").read_text(encoding="utf-8").splitlines()
    chars = sum(map(len, text))
    old = spm.SentencePieceProcessor(model_file=str(STORIES / "tok512.model"))
    byte_pieces = sum(old.id_to_piece(i).startswith("<0x") for d in text[:20] for i in old.encode(d))
    assert byte_pieces > 2 * sum(map(len, text[:20]))
    # equal compute: each arm's steps read the same characters, by each tokenizer's own count
    per_step = results["size"]["block_size"] * results["size"]["micro_batch"]
    for name, sp in (("a", old), ("b", merged)):
        tokens = sum(len(sp.encode(d)) + 2 for d in text)  # with <s> and </s>
        steps = results["size"]["train_chars"] * tokens / chars / per_step
        assert abs(sum(next(a for a in results["arms"] if a["key"] == name)["steps"]) - steps) <= 1


def test_the_table_says_what_results_json_says(tiny):
    out, stdout, results = tiny
    table = (out / "results.md").read_text(encoding="utf-8")
    assert table in stdout  # printed as written
    rows = {cells[0]: cells for line in table.splitlines()
            if (cells := [c.strip() for c in line.strip("|").split("|")])
            and re.fullmatch(r"[a-f]", cells[0])}
    assert sorted(rows) == list("abcdef")
    figure = re.compile(r"([\d.]+) ± ([\d.]+) \(([\d.]+)–([\d.]+)\)")
    for arm in results["arms"]:
        cells = rows[arm["key"]]
        assert cells[1] == arm["label"]
        for column, key in ((5, "zh"), (6, "en"), (7, "zh_dev")):
            values = [r[key] for r in arm["seeds"]]
            mean, std, low, high = map(float, figure.fullmatch(cells[column]).groups())
            assert mean == pytest.approx(statistics.fmean(values), abs=6e-4)
            assert std == pytest.approx(statistics.stdev(values), abs=6e-4)
            assert (low, high) == pytest.approx((min(values), max(values)), abs=6e-4)
    # the selections follow the stated rule, on the development set
    dev = {a["key"]: statistics.fmean(r["zh_dev"] for r in a["seeds"]) for a in results["arms"]}
    arms = {a["key"]: a for a in results["arms"]}
    best = min("bcd", key=dev.get)
    assert arms["e"]["init"] == arms[best]["init"] and arms["e"]["stage1"]
    on = "e" if dev["e"] < dev[best] else best
    assert arms["f"]["counterpart"] == on and arms["f"]["steps"] == arms[on]["steps"]
    assert arms["f"]["replay"] == 0.2 and arms["f"]["train_chars"]["en"] > 0


def test_the_picture_is_a_png(tiny):
    from PIL import Image

    out, _, _ = tiny
    path = out / "vocab_extension.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_out_must_not_touch_the_inputs(tmp_path, stories260k):
    require_shared(CORPUS)
    model = stories260k  # a model directory as --base
    args = ["--base", str(model), "--tokenizer", str(model / "tokenizer.model"), "--zh_corpus", str(CORPUS)]
    line = one_error(experiment(*args, "--out", str(model / "experiment"), timeout=120))
    assert "lies inside the input" in line and str(model) in line
    assert not (model / "experiment").exists()
    line = one_error(experiment(*args, "--out", str(CORPUS), timeout=120))
    assert "is the input" in line
    line = one_error(experiment(*args, "--zh_corpus", str(tmp_path / "missing.txt"), "--out",
                                str(tmp_path / "out"), timeout=120))
    assert "missing.txt: no such file" in line and not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("someone's\n")
    line = one_error(experiment(*args, "--out", str(tmp_path / "taken"), timeout=120))
    assert "already exists" in line
    line = one_error(experiment(*args, "--out", str(tmp_path / "taken"), "--overwrite", timeout=120))
    assert "not this script's output" in line
    assert (tmp_path / "taken" / "notes.txt").read_text() == "someone's\n"
