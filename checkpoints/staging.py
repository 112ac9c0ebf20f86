"""Write a folder completely or not at all, and clean up after runs that were killed.

Every output (merged model, adapter, converted GGUF, edited model) is built in
a hidden temporary folder beside its destination (``.NAME.partial-XXXX``) and
renamed into place only when complete, so an error or a kill never leaves a
half-written folder that looks finished.

A killed run (``kill -9``, SIGTERM, power loss) cannot remove its staging
folder, so each one holds an owner marker (:data:`OWNER_FILE`: pid, the
process's start time and the boot id) and the next run into the same parent
folder removes the staging folders whose owner is gone. A pid that was reused
by another process does not keep a folder alive (its start time differs); a
live owner's folder is never touched.

A full disk, a read-only file system or a folder that cannot be written gives
one line (:func:`output_error`), and the staging folder is removed.

Example::

    with staged_folder(Path("out/adapter")) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
    # out/adapter now exists, complete
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import WeightsmithError

log = logging.getLogger(__name__)

OWNER_FILE = ".weightsmith-owner.json"
# A staging folder without an owner marker (made by an older version, or a kill between mkdtemp and the
# marker write) is removed only when it has not changed for this long.
UNMARKED_STALE_SECONDS = 3600
_WRITE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def output_error(err: OSError, out_dir: Path | None = None) -> WeightsmithError | None:
    """One line for an OS error met while writing an output; None when it is not a known output fault.

    Names ``out_dir`` when given (else the file's name only, never a full server path).
    """
    where = str(out_dir) if out_dir is not None else Path(str(err.filename)).name if err.filename else "output"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return WeightsmithError(f"{where}: no space left on the disk (or quota exceeded); nothing was kept: "
                                "free some space or choose another folder")
    if err.errno == errno.EROFS:
        return WeightsmithError(f"{where}: the folder is on a read-only file system; choose another output folder")
    if err.errno in (errno.EACCES, errno.EPERM):
        return WeightsmithError(f"{where}: permission denied; choose a folder you can write to")
    if err.errno in (errno.ENOTDIR, errno.EEXIST) or isinstance(err, (NotADirectoryError, FileExistsError)):
        return WeightsmithError(f"{where}: a file stands where a folder is needed; choose another output folder")
    return None


# --------------------------------------------------------------------------------------------
# owners of staging folders
# --------------------------------------------------------------------------------------------
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_state(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks since boot) of ``pid`` from /proc, or None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ("gone", "")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], fields[19]


def owner_record() -> dict:
    """What identifies this process across pid reuse: pid, start time, boot id, host."""
    state = _process_state(os.getpid())
    return {"pid": os.getpid(), "start": state[1] if state else None, "boot": _boot_id(),
            "host": socket.gethostname()}


def owner_alive(owner: dict) -> bool:
    """False only when the recorded owner process is certainly gone; unknown cases count as alive."""
    if owner.get("host") != socket.gethostname():
        return True  # another machine sharing the disk: we cannot tell
    boot = _boot_id()
    if owner.get("boot") and boot and owner["boot"] != boot:
        return False  # the machine rebooted since
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    state = _process_state(pid)
    if state is None:
        return True
    if state[0] in ("gone", "Z", "X"):  # exited (a zombie is dead, only not yet reaped)
        return False
    return owner.get("start") is None or state[1] == owner["start"]  # a different start: the pid was reused


def remove_stale_staging(parent: Path) -> list[Path]:
    """Delete the ``.*.partial-*`` folders in ``parent`` whose owner process is gone; returns them."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and ".partial-" in entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            owner = json.loads((entry / OWNER_FILE).read_text())
            stale = not owner_alive(owner if isinstance(owner, dict) else {})
        except FileNotFoundError:
            try:
                stale = time.time() - entry.stat().st_mtime > UNMARKED_STALE_SECONDS
            except OSError:
                continue
        except (OSError, ValueError):
            stale = False  # unreadable marker: leave it to its owner
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                log.info("removed %s, left by a run that was killed", entry.name)
                removed.append(entry)
    return removed


def new_staging_dir(out_dir: Path, *, overwrite: bool = False) -> Path:
    """A fresh hidden folder beside ``out_dir`` (same filesystem, so the final rename is atomic).

    Raises :class:`WeightsmithError` when ``out_dir`` exists and ``overwrite`` is false.
    Staging folders of killed runs in the same parent are removed first
    (:func:`remove_stale_staging`). An OS error (read-only, no space, not a
    folder) becomes one :class:`WeightsmithError` line.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise WeightsmithError(f"{out_dir} already exists (choose another folder or allow overwrite)")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out_dir.parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    except OSError as e:
        raise (output_error(e, out_dir) or WeightsmithError(f"{out_dir}: cannot write there ({e.strerror})")) from None
    try:
        (staging / OWNER_FILE).write_text(json.dumps(owner_record()))
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise (output_error(e, out_dir) or WeightsmithError(f"{out_dir}: cannot write there ({e.strerror})")) from None
    return staging


def publish_folder(staging: Path, out_dir: Path) -> Path:
    """Rename the complete ``staging`` folder to ``out_dir``, swapping out an existing one."""
    out_dir = Path(out_dir)
    (Path(staging) / OWNER_FILE).unlink(missing_ok=True)  # the marker is not part of the output
    if out_dir.exists():
        # Move the old folder aside first: os.replace cannot replace a non-empty directory.
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "x")
        try:
            os.replace(staging, out_dir)
        except OSError:
            os.replace(old / "x", out_dir)  # put the previous output back
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
    return out_dir


@contextmanager
def staged_folder(out_dir: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder; publish it as ``out_dir`` on success, delete it on any error.

    A full disk or a read-only file system on the way becomes one :class:`WeightsmithError` line.
    """
    staging = new_staging_dir(out_dir, overwrite=overwrite)
    try:
        yield staging
        publish_folder(staging, out_dir)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if e.errno in _WRITE_FAULTS:
            raise output_error(e, out_dir) from None  # type: ignore[misc]
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
