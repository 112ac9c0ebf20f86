"""Write a folder completely or not at all.

Every output (merged model, adapter, converted GGUF, edited model) is built in
a hidden temporary folder beside its destination and renamed into place only
when complete, so an error or a kill never leaves a half-written folder that
looks finished.

Example::

    with staged_folder(Path("out/adapter")) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
    # out/adapter now exists, complete
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import WeightsmithError


def new_staging_dir(out_dir: Path, *, overwrite: bool = False) -> Path:
    """A fresh hidden folder beside ``out_dir`` (same filesystem, so the final rename is atomic).

    Raises :class:`WeightsmithError` when ``out_dir`` exists and ``overwrite`` is false.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise WeightsmithError(f"{out_dir} already exists (choose another folder or allow overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))


def publish_folder(staging: Path, out_dir: Path) -> Path:
    """Rename the complete ``staging`` folder to ``out_dir``, swapping out an existing one."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        # Move the old folder aside first: os.replace cannot replace a non-empty directory.
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "x")
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
    return out_dir


@contextmanager
def staged_folder(out_dir: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder; publish it as ``out_dir`` on success, delete it on any error."""
    staging = new_staging_dir(out_dir, overwrite=overwrite)
    try:
        yield staging
        publish_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
