"""`make demo`'s job: the toy recipe runs end to end from the embedded corpus."""

from __future__ import annotations

import subprocess
import sys


def test_recipe_runs_end_to_end(tmp_path):
    work = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "train.recipe", "--workdir", str(work)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[5/5]" in r.stdout and "max logit change" in r.stdout
    assert sorted(p.name for p in (work / "base-meta").iterdir()) == [
        "checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json",
        "tokenizer.model"]
    for f in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        assert (work / "base-hf" / f).exists()
    # a second run refuses to clobber the first
    r = subprocess.run([sys.executable, "-m", "train.recipe", "--workdir", str(work)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "already exists" in r.stderr
