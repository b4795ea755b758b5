"""The prepared GPU benchmark's code paths, at toy size on the CPU: `bench/gpu_suite.sh
--smoke` runs every comparison it makes on the GPU, and ours and transformers + peft agree
on the first loss of the same stage-2 step."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.helpers import REPO


def test_gpu_suite_smoke_runs_every_comparison():
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--smoke"], capture_output=True,
                       text=True, cwd=REPO, timeout=900,
                       env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for section in ("## (a)", "## (b)", "## (c)", "## (d)", "## (e)"):
        assert section in r.stdout, section
    ours, hf = map(float, re.search(r"first-step loss: zhllama ([\d.]+), transformers\+peft ([\d.]+)",
                                    r.stdout).groups())
    assert abs(ours - hf) < 1e-4
    assert "ours with --model.quantize=nf4" in r.stdout
    assert "| flex attention (BlockMask) | fwd |" in r.stdout
    # the packed SFT step through the model: the dense mask, and flex (forward only on a CPU)
    # to within float32 rounding of it
    flex_delta = re.search(r"\| flex \| fwd \| [\d,]+ \| \d+ \| [\d.]+× \| - \| ([\d.e+-]+) \(relative\) \|",
                           r.stdout)
    assert "| sdpa | fwd+bwd |" in r.stdout and flex_delta and float(flex_delta.group(1)) < 1e-5
    assert "| stage 2, none |" in r.stdout  # the planner's row, planned and measured
    assert "# all 5 sections ran" in r.stdout
