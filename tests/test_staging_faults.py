"""Faults on output: a full disk or a read-only folder gives one line and leaves nothing; killed runs are cleaned up.

Issue 11: disk full and read-only outputs gave tracebacks; after ``kill -9``
during a merge a hidden ``.NAME.partial-*`` folder of the output's size stayed
and no later run cleaned it.

How the faults are made: we run as root, and root ignores ``chmod 0o555``, so
a read-only folder cannot be made with permissions here. Instead (1) a file
stands where the output's parent folder should be (a real error from the
kernel: ENOTDIR/EEXIST), and (2) EROFS/EACCES are raised by a mocked
``tempfile.mkdtemp``, and ENOSPC by a mocked ``write`` of the shard file, at
exactly the call where a real disk would fail.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from checkpoints import staging
from checkpoints.errors import WeightsmithError
from checkpoints.staging import new_staging_dir, staged_folder

ROOT = Path(__file__).resolve().parents[1]


def _recipe(family: dict[str, Path], path: Path) -> Path:
    path.write_text(
        f"merge_method: task_arithmetic\nbase_model: {family['base']}\nmodels:\n"
        f"  - model: {family['ft1']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {family['ft2']}\n    parameters: {{weight: 0.5}}\n")
    return path


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---------------------------------------------------------------------------------------------
# disk full, read-only
# ---------------------------------------------------------------------------------------------
def test_disk_full_in_a_staged_folder_is_one_line_and_leaves_nothing(tmp_path):
    parent = tmp_path / "outs"
    with pytest.raises(WeightsmithError) as err:
        with staged_folder(parent / "adapter") as tmp:
            (tmp / "adapter_config.json").write_text("{}")
            _enospc()  # what the next write would raise on a full disk
    assert str(err.value) == (f"{parent / 'adapter'}: no space left on the disk (or quota exceeded); nothing was "
                              "kept: free some space or choose another folder")
    assert list(parent.iterdir()) == []
    # Non-vacuity: other errors are not disguised as a full disk.
    with pytest.raises(ValueError):
        with staged_folder(parent / "adapter"):
            raise ValueError("not a disk problem")
    assert list(parent.iterdir()) == []


def test_cli_merge_on_a_full_disk_exits_2_with_one_line(tiny_llama_family, tmp_path, monkeypatch, capsys):
    """A real merge whose shard write fails with ENOSPC (the writer's ``open`` returns a file that fills up)."""
    import checkpoints.tensors as tensors
    from cli import main
    from file_proxy import FileProxy

    real_open = open

    class Filling(FileProxy):
        written = 0

        def write(self, data):
            self.written += len(memoryview(data).cast("B"))
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Filling(f) if "w" in mode and str(path).endswith((".data", ".safetensors")) else f

    monkeypatch.setattr(tensors, "open", fake_open, raising=False)
    recipe = _recipe(tiny_llama_family, tmp_path / "r.yml")
    outs = tmp_path / "outs"
    outs.mkdir()
    code = main(["merge", str(recipe), str(outs / "merged")])
    err = [line for line in capsys.readouterr().err.splitlines() if "Traceback" in line or "error" in line]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("weightsmith: error: ") and "no space left on the disk" in err[0], err
    assert err[0].startswith(f"weightsmith: error: {outs / 'merged'}: "), err  # the writer names the output folder
    assert list(outs.iterdir()) == []  # no output, no staging folder
    # Non-vacuity: with room on the disk the same merge succeeds.
    monkeypatch.setattr(tensors, "open", real_open, raising=False)
    assert main(["merge", str(recipe), str(outs / "merged")]) == 0
    assert (outs / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_read_only_output_is_one_line(tmp_path, monkeypatch, code, words):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(kwargs.get("dir", "")))

    monkeypatch.setattr(staging.tempfile, "mkdtemp", refuse)
    out = tmp_path / "ro" / "merged"
    with pytest.raises(WeightsmithError, match=rf"^{out}: .*{words}"):
        with staged_folder(out):
            pass
    assert not out.exists()


def test_a_file_where_the_output_folder_should_be(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(WeightsmithError, match=r"a file stands where a folder is needed"):
        new_staging_dir(tmp_path / "taken" / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# ---------------------------------------------------------------------------------------------
# stale staging folders
# ---------------------------------------------------------------------------------------------
_KILL_ME = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from merging.engine import run_merge
    from merging.recipe import MergeRecipe

    def progress(done, total, name):
        if done == 3:  # mid-merge: some tensors written, the output not published
            print("MID", flush=True)
            time.sleep(600)

    run_merge(MergeRecipe.from_yaml(Path(sys.argv[1])), Path(sys.argv[2]), progress=progress,
              collect_norms=False, threads=1)
""")


def _partials(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if ".partial-" in p.name)


def test_partial_folder_of_a_killed_merge_is_removed_by_the_next_run(tiny_llama_family, tmp_path):
    from merging.engine import run_merge
    from merging.recipe import MergeRecipe

    recipe = _recipe(tiny_llama_family, tmp_path / "r.yml")
    outs = tmp_path / "outs"
    outs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_ME, str(recipe), str(outs / "merged")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "MID", proc.stderr.read()
        left = _partials(outs)
        assert len(left) == 1 and left[0].name.startswith(".merged.partial-")
        marker = left[0] / getattr(staging, "OWNER_FILE", ".weightsmith-owner.json")
        assert not marker.exists() or json.loads(marker.read_text())["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    assert _partials(outs) == left  # the kill left it behind (what issue 11 saw)
    assert any(p.stat().st_size > 0 for p in left[0].iterdir() if p != marker)
    result = run_merge(MergeRecipe.from_yaml(recipe), outs / "merged", collect_norms=False)
    assert result.out_dir == outs / "merged" and (outs / "merged" / "model.safetensors").is_file()
    assert _partials(outs) == []
    assert not (outs / "merged" / marker.name).exists()  # the marker is not part of the output


def test_live_owner_folder_is_kept_until_its_owner_is_gone(tmp_path):
    holder = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        from checkpoints.staging import new_staging_dir
        print(new_staging_dir(Path(sys.argv[1])), flush=True)
        sys.stdin.readline()
        os._exit(0)  # leave the folder behind, as a killed run would
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "busy")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        theirs = Path(proc.stdout.readline().strip())
        assert theirs.is_dir()
        with staged_folder(tmp_path / "mine") as tmp:
            (tmp / "a.txt").write_text("a")
        assert theirs.is_dir()  # a live owner's folder is never touched
    finally:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(60)
    with staged_folder(tmp_path / "mine2") as tmp:
        (tmp / "a.txt").write_text("a")
    assert not theirs.exists()  # its owner is gone now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "mine2"]


def test_reused_pid_unmarked_and_foreign_folders(tmp_path):
    me = staging.owner_record()
    cases = {
        "reused-pid": {**me, "start": "1"},  # this pid, but a process that started at another time
        "live": me,
        "dead": {**me, "pid": 2**22 + 7},  # above pid_max on Linux: no such process
        "rebooted": {**me, "boot": "another-boot"},
        "other-host": {**me, "pid": 2**22 + 7, "host": "elsewhere"},
    }
    for name, owner in cases.items():
        folder = tmp_path / f".{name}.partial-x"
        folder.mkdir()
        (folder / staging.OWNER_FILE).write_text(json.dumps(owner))
    young = tmp_path / ".young.partial-x"
    young.mkdir()
    old = tmp_path / ".old.partial-x"
    old.mkdir()
    past = time.time() - staging.UNMARKED_STALE_SECONDS - 60
    os.utime(old, (past, past))
    (tmp_path / ".file.partial-x").write_text("a file is never removed")
    removed = {p.name for p in staging.remove_stale_staging(tmp_path)}
    assert removed == {".reused-pid.partial-x", ".dead.partial-x", ".rebooted.partial-x", ".old.partial-x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".file.partial-x", ".live.partial-x", ".other-host.partial-x", ".young.partial-x"]
