"""Missing real test material skips a test locally and fails it under CI.

`make test` sets ZHLLAMA_REQUIRE_SHARED_DATA=1 when CI=true; tests/helpers.py's
`require_shared` (directly, or through the `shared_data` and session fixtures) then turns
the skip into a failure. Checked on real tests of each kind, run by pytest in a subprocess
against a material directory that does not exist, and by reading every test file for a
presence check that bypasses `require_shared`.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.helpers import REPO, REQUIRE_SHARED_DATA

# one test of each way a test reaches the material, and one that needs none
NEEDS_MATERIAL = [
    "tests/test_data_sft.py::test_belle_eval_set_through_field_map",  # the shared_data fixture
    "tests/test_bad_inputs.py::test_truncated_token_shard_is_named",  # a module fixture's check
    "tests/test_stories260k.py::test_header_read_as_published",  # a session fixture
]
NEEDS_NOTHING = "tests/test_bad_inputs.py::test_table_size"


def outcomes(tmp_path: Path, require: str | None) -> tuple[int, dict[str, tuple[str, str]]]:
    """pytest's exit status and, per test, (outcome, message) with the material missing."""
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_SHARED_DATA}
    env["ZHLLAMA_SHARED_DATA"] = str(tmp_path / "no-such-material")
    if require is not None:
        env[REQUIRE_SHARED_DATA] = require
    report = tmp_path / f"report-{require}.xml"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        f"--basetemp={tmp_path / f'run-{require}'}", f"--junit-xml={report}",
                        *NEEDS_MATERIAL, NEEDS_NOTHING],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert report.exists(), r.stdout + r.stderr
    out = {}
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}"
        results = [(c.tag, c.get("message", "") + (c.text or "")) for c in case
                   if c.tag in ("skipped", "failure", "error")]
        out[name] = results[0] if results else ("passed", "")
    assert sorted(out) == sorted([*NEEDS_MATERIAL, NEEDS_NOTHING]), (out, r.stdout)
    return r.returncode, out


def test_missing_material_skips_locally_and_fails_when_required(tmp_path):
    code, local = outcomes(tmp_path, None)
    assert code == 0, local
    for test in NEEDS_MATERIAL:
        kind, message = local[test]
        assert kind == "skipped" and "real test material not found" in message, (test, local[test])
        assert "no-such-material" in message, message  # names what is missing
    assert local[NEEDS_NOTHING][0] == "passed"

    code, required = outcomes(tmp_path, "1")
    assert code == 1, required  # tests failed
    for test in NEEDS_MATERIAL:
        kind, message = required[test]
        assert kind in ("failure", "error"), (test, required[test])
        assert "no-such-material" in message and f"{REQUIRE_SHARED_DATA}=1" in message, message
    assert required[NEEDS_NOTHING][0] == "passed"  # only the tests that need it fail


def _presence_checks(path: Path) -> list[str]:
    """Skips in `path` that test for the real material themselves instead of asking
    `require_shared`: a skip or skipif mentioning it, or a skip under an `if` that does."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def about_material(node: ast.AST) -> bool:
        text = ast.get_source_segment(source, node) or ""
        return any(w in text for w in ("SHARED_DATA", "shared_data", "test material", "shared/"))

    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("skip", "skipif")):
            continue
        guards = [p.test for p in _ancestors(node, parents) if isinstance(p, ast.If)]
        if about_material(node) or any(about_material(g) for g in guards):
            found.append(f"{path.name}:{node.lineno}")
    return found


def _ancestors(node: ast.AST, parents: dict) -> list[ast.AST]:
    out = []
    while node in parents:
        node = parents[node]
        out.append(node)
    return out


def test_every_missing_material_skip_goes_through_require_shared():
    files = sorted(p for p in (REPO / "tests").glob("*.py") if p.name != "helpers.py")
    assert len(files) > 20
    found = [where for f in files for where in _presence_checks(f)]
    assert not found, f"use tests.helpers.require_shared (or the shared_data fixture): {found}"


@pytest.mark.parametrize("source, flagged", [
    ("if not SHARED_DATA.is_dir():\n    pytest.skip('gone')\n", True),
    ("pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason='x')\n", True),
    ("def f(src):\n    if not src.is_dir():\n        pytest.skip(f'real test material not found at {src}')\n", True),
    ("if not os.environ.get('X'):\n    pytest.skip('X is not set')\n", False),
])
def test_the_scan_finds_its_own_examples(tmp_path, source, flagged):
    (tmp_path / "t.py").write_text(source)
    assert bool(_presence_checks(tmp_path / "t.py")) == flagged



@pytest.mark.parametrize("change, reported", [
    (lambda d: (d / "a").write_text("b"), True),
    (lambda d: (d / "new").touch(), True),
    (lambda d: (d / "a").unlink(), True),
    (lambda d: (d / "a").read_text(), False),  # reading changes nothing
], ids=["changed", "added", "removed", "read"])
def test_a_session_fixture_changed_by_a_test_is_reported(tmp_path, change, reported):
    """The check behind `stories260k` and `world`, run as pytest runs a fixture."""
    from tests.helpers import read_only

    (tmp_path / "a").write_text("a")
    guard = read_only(tmp_path)
    assert next(guard) == tmp_path
    change(tmp_path)
    if reported:
        with pytest.raises(AssertionError, match=r"changed a session fixture's files .*\['(a|new)'\]"):
            next(guard)
    else:
        with pytest.raises(StopIteration):
            next(guard)
