"""Outputs that appear whole or not at all, and what killed runs leave behind."""

from __future__ import annotations

import os
import subprocess

import pytest

from tokenizer.files import atomic_output_dir, atomic_output_file


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_failed_block_leaves_nothing_and_dst_is_kept(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("kept")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "new").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "old").read_text() == "kept"
    with pytest.raises(FileExistsError, match="use --overwrite"):
        with atomic_output_file(tmp_path / "out"):
            pass


def test_temporaries_of_killed_runs_are_removed_live_ones_kept(tmp_path):
    dead = tmp_path / f".out.tmp-{dead_pid()}-abc"
    live = tmp_path / f".out.tmp-{os.getppid()}-def"
    other = tmp_path / f".other.tmp-{dead_pid()}-ghi"
    for d in (dead, live, other):
        d.mkdir()
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("done")
    assert not dead.exists() and live.exists() and other.exists()
    assert (tmp_path / "out" / "x").read_text() == "done"
