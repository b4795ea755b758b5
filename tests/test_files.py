"""Outputs that appear whole or not at all, never over their inputs, with the umask's modes;
and what killed runs leave behind."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from tokenizer.files import (
    OutputOverlapsInput,
    atomic_output_dir,
    atomic_output_file,
    atomic_output_files,
    check_output_against_inputs,
)


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


@pytest.mark.parametrize("output,how", [
    ("in", "is"), (".", "contains"), ("in/sub/out", "lies inside"), ("in/../in", "is"),
])
def test_an_output_over_an_input_is_refused_before_anything_is_touched(tmp_path, monkeypatch,
                                                                       output, how):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "data").write_text("kept")
    for make in (atomic_output_dir, atomic_output_file):
        with pytest.raises(OutputOverlapsInput, match=f"output {output} {how} the input in: "):
            with make(output, overwrite=True, inputs=[None, "in"]):
                raise AssertionError("the block must not run")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["in", "in/data"]


def test_overlap_is_seen_through_symlinks_either_way(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "in")
    with pytest.raises(OutputOverlapsInput, match="contains the input"):
        check_output_against_inputs(tmp_path, [tmp_path / "alias" / "model"])
    with pytest.raises(OutputOverlapsInput, match="is the input"):
        check_output_against_inputs(tmp_path / "alias", [tmp_path / "in"])
    (tmp_path / "out").mkdir()  # an input given by a link inside the output goes with it
    (tmp_path / "out" / "link").symlink_to(tmp_path / "in")
    with pytest.raises(OutputOverlapsInput, match="contains the input"):
        check_output_against_inputs(tmp_path / "out", [tmp_path / "out" / "link"])
    # a sibling whose name starts alike is no overlap
    check_output_against_inputs(tmp_path / "in2", [tmp_path / "in", tmp_path / "in" / "x"])
    check_output_against_inputs(tmp_path / "i", [tmp_path / "in"])


def test_a_failed_block_removes_the_parents_it_created(tmp_path):
    for make in (atomic_output_dir, atomic_output_file):
        with pytest.raises(RuntimeError):
            with make(tmp_path / "a" / "b" / "out"):
                raise RuntimeError("interrupted")
        assert list(tmp_path.iterdir()) == []
    with atomic_output_files([tmp_path / "a" / "p.model", tmp_path / "a" / "p.vocab"]) as tmp:
        (tmp / "p.model").write_text("m")
        (tmp / "p.vocab").write_text("v")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["p.model", "p.vocab"]


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_outputs_have_the_modes_of_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        with atomic_output_dir(tmp_path / "dir") as tmp:
            (tmp / "f").write_text("x")
        with atomic_output_file(tmp_path / "file") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "dir").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "dir" / "f").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "file").stat().st_mode) == 0o666 & ~mask
