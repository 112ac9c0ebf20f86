"""Content hashes of models: what a result cache keys a model by (never its path or name).

* :func:`checkpoint_digest`: SHA-256 over a checkpoint's weight files and its support files
  (config, tokenizer, chat template), read from disk before any model is loaded, so a cache
  hit costs no load. Two copies of the same files in different folders hash the same; one
  changed byte hashes differently.
* :func:`module_digest`: SHA-256 over a loaded model's parameters and buffers (name, dtype,
  shape, bytes), for models that exist only in memory (a merge under evaluation).

``file_digest`` lets a caller memoise the file hashes (e.g. on disk, keyed by path, size and
mtime) without this module keeping any state.

Example::

    checkpoint_digest(resolve("demo"))   # 'f3a1…' (64 hex digits)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch

from .tensors import SUPPORT_FILES

CHUNK = 8 * 2**20


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def checkpoint_digest(ckpt, *, file_digest: Callable[[Path], str] = file_sha256) -> str:
    """Hash of a :class:`checkpoints.sources.LocalCheckpoint`'s weights and support files (by role, not path)."""
    h = hashlib.sha256(b"weightsmith-checkpoint-v1")
    for i, f in enumerate(ckpt.files):
        h.update(f"weights {i}:{file_digest(Path(f))}\n".encode())
    for name in SUPPORT_FILES:
        f = Path(ckpt.support_dir) / name
        if f.is_file():
            h.update(f"{name}:{file_digest(f)}\n".encode())
    return h.hexdigest()


def module_digest(model: torch.nn.Module) -> str:
    """Hash of a model's parameters and buffers as they are in memory."""
    h = hashlib.sha256(b"weightsmith-module-v1")
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
