"""Atomic writes: an output path the OS refuses is one line, and a failed write leaves nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlpruning.core.atomic import staging_dir, write_json
from mlpruning.core.errors import UserError


def test_refused_outputs_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"cannot write .*afile/r.json \(.*\): choose another output path"):
        write_json(tmp_path / "afile" / "r.json", {})  # a file where a folder should be
    (tmp_path / "adir").mkdir()
    with pytest.raises(UserError, match=r"cannot write .*adir \(.*\)"):
        write_json(tmp_path / "adir", {})  # a folder where the file should go
    assert not list((tmp_path).glob(".*.tmp"))


def test_a_failed_staging_leaves_no_new_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staging_dir(out) as tmp:
        (tmp / "half.onnx").write_text("half")
        raise RuntimeError("export failed")
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError), staging_dir(out) as tmp:
        raise RuntimeError("export failed")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # a folder that existed is left as it was
    with staging_dir(tmp_path / "ok") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
    assert (tmp_path / "ok" / "sub" / "a.txt").read_text() == "a"
