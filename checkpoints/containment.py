"""A file a checkpoint names stays inside that checkpoint.

An index names its shards, an adapter folder its weights, a model folder its
tokenizer; all of them are names chosen by whoever made the checkpoint, which on
a public server is a stranger. :func:`member_path` turns such a name into a path
only when it is a plain relative name that, after every symlink is followed,
still lies inside the checkpoint's folder. Otherwise one error names the entry,
never where it pointed: the message must not tell a visitor whether a server file
exists, nor its size.

The one exception is the Hugging Face cache, whose snapshot folders hold
symlinks into the repo's ``blobs/`` folder: there the repo folder is the root.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from .errors import WeightsmithError

_DRIVE = re.compile(r"^[A-Za-z]:")


def checkpoint_root(folder: Path) -> Path:
    """The folder every file of the checkpoint in ``folder`` must resolve into."""
    real = Path(folder).resolve()
    # huggingface_hub cache: <cache>/models--owner--name/snapshots/<rev>/file -> ../../blobs/<sha>
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def member_path(folder: Path, entry: object, *, owner: str, root: Path | None = None) -> Path:
    """``folder / entry`` when ``entry`` is a relative name that stays inside the checkpoint.

    ``owner`` names what holds the entry (e.g. ``model.safetensors.index.json``) for the
    message. ``root`` defaults to :func:`checkpoint_root` of ``folder``. Absolute names,
    ``..``, backslashes, drive letters and symlinks leading out are refused with one line.
    """
    if not isinstance(entry, str) or not entry.strip() or "\x00" in entry:
        raise WeightsmithError(f"{owner}: entry {entry!r} is not a file name")
    parts = PurePosixPath(entry).parts
    if entry.startswith("/") or "\\" in entry or _DRIVE.match(entry) or ".." in parts:
        raise WeightsmithError(f"{owner}: entry {entry!r} is an absolute path or leaves the folder ('..'), refused")
    path = Path(folder) / entry
    base = root if root is not None else checkpoint_root(folder)
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise WeightsmithError(f"{owner}: entry {entry!r} is a broken link, refused") from None
    if not real.is_relative_to(base):
        # Same words whether or not the target exists: no hint about the server's files.
        raise WeightsmithError(f"{owner}: entry {entry!r} points outside the checkpoint folder, refused")
    try:
        path.exists()  # a name too long for the filesystem, or unreadable, raises here rather than later
    except OSError as e:
        raise WeightsmithError(f"{owner}: entry {entry[:80]!r} cannot be used ({e.strerror or type(e).__name__})") from None
    return path


def error_line(exc: BaseException, folder: Path) -> str:
    """The first line of a third-party error, without ``folder``: the user knows files by name only."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    for form in {str(Path(folder).resolve()), str(folder)}:
        first = first.replace(form + "/", "").replace(form, "")
    return first
