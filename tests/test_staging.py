"""staged_folder: a folder appears complete or not at all."""

from __future__ import annotations

import pytest

from checkpoints.errors import WeightsmithError
from checkpoints.staging import staged_folder


def test_success_publishes_and_leaves_no_staging(tmp_path):
    out = tmp_path / "out"
    with staged_folder(out) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not out.exists()  # nothing visible until complete
    assert (out / "a.txt").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_error_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(out) as tmp:
            (tmp / "a.txt").write_text("a")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_overwrite_swaps_whole_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(WeightsmithError, match="already exists"):
        with staged_folder(out):
            pass
    with staged_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
