"""Lazy tensor reading and streaming, atomic writing of safetensors checkpoints.

The one tensor I/O story of the project:

* :mod:`checkpoints.safetensors_header` checks each file's header once (a
  truncated or corrupt file is one clear error naming the file) and keeps every
  tensor's dtype, shape and ``data_offsets``;
* :class:`CheckpointReader` (here) holds those headers for all shards of a
  checkpoint (shard names kept inside the folder by
  :func:`checkpoints.containment.member_path`) and reads one tensor at a time at
  its checked extent (no whole model in memory, no second header parse);
* :mod:`checkpoints.tensor_loading` reads the same extents into reusable
  buffers or as mapped views, with a prefetch thread, for the merge engine;
* :class:`ShardedWriter` (here) writes tensors as they are produced into shards
  in a temporary folder, with ``model.safetensors.index.json`` when there is
  more than one shard, takes other files through :meth:`ShardedWriter.add_file`,
  and renames the folder into place only when complete.

Example::

    reader = CheckpointReader.from_files([Path("model.safetensors")])
    with ShardedWriter(Path("out"), max_shard_bytes=2**30) as w:
        for name in reader.keys():
            w.add(name, reader.get(name))
        w.copy_support_files(Path("src"))
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .containment import member_path
from .errors import WeightsmithError
# The header's names stay importable from here, where the reader always was.
from .safetensors_header import (TORCH_TO_ST, SafetensorsHeader, TensorMeta,  # noqa: F401
                                 encode_header, parse_json_object, read_safetensors_file, read_safetensors_header)
from .staging import OWNER_FILE, new_staging_dir, output_error, publish_folder
from .tensor_loading import read_tensor

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied next to the weights so the folder loads on its own.
SUPPORT_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


class CheckpointReader:
    """Lazy, per-tensor access to a checkpoint stored as one or more safetensors shards.

    Each shard's header is checked once, when the reader is made
    (:func:`~checkpoints.safetensors_header.read_safetensors_file`); ``get(name)``
    then reads just that tensor at its checked extent, converted to float32 by
    default (the CPU is ~300x slower in bf16). Pickle checkpoints are read whole,
    through ``torch.load(weights_only=True)``.
    """

    def __init__(self, metas: dict[str, TensorMeta], *, pickled: dict[str, torch.Tensor] | None = None,
                 headers: list[SafetensorsHeader] | None = None):
        self._metas = metas
        self._pickled = pickled
        self._headers = list(headers or [])

    # -- construction ------------------------------------------------------
    @classmethod
    def from_files(cls, files: Iterable[Path]) -> "CheckpointReader":
        """Reader over explicit safetensors files (shards of one checkpoint)."""
        metas: dict[str, TensorMeta] = {}
        headers = []
        for f in files:
            header = read_safetensors_file(Path(f))
            headers.append(header)
            for name, meta in header.tensors.items():
                if name in metas:
                    raise WeightsmithError(f"tensor {name!r} is stored twice: in {metas[name].file.name} and {f.name}")
                metas[name] = meta
        return cls(metas, headers=headers)

    @classmethod
    def from_folder(cls, folder: Path) -> "CheckpointReader":
        """Reader over an HF folder: an index with shards, one ``model.safetensors``, or a pickle."""
        return cls.from_files(weight_files(folder)) if _has_safetensors(folder) else cls.from_pickle(
            _pickle_file(folder)
        )

    @classmethod
    def from_pickle(cls, path: Path) -> "CheckpointReader":
        """Reader over a ``.bin``/``.pt`` state dict, loaded with ``weights_only=True`` (no code runs)."""
        state = load_pickle_state_dict(path)
        metas = {k: TensorMeta(k, tuple(v.shape), v.dtype, path) for k, v in state.items()}
        return cls(metas, pickled=state)

    # -- access ------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._metas)

    def __contains__(self, name: str) -> bool:
        return name in self._metas

    def meta(self, name: str) -> TensorMeta:
        try:
            return self._metas[name]
        except KeyError:
            raise WeightsmithError(f"tensor {name!r} is not in the checkpoint") from None

    def metas(self) -> dict[str, TensorMeta]:
        return dict(self._metas)

    def headers(self) -> list[SafetensorsHeader]:
        """The checked header of each shard, in the order given (empty for a pickle)."""
        return list(self._headers)

    @property
    def files(self) -> list[Path]:
        return sorted({m.file for m in self._metas.values()})

    def get(self, name: str, *, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        """Load one tensor; ``dtype=None`` keeps the stored dtype."""
        meta = self.meta(name)
        if self._pickled is not None:
            t = self._pickled[name]
        else:
            try:
                t = read_tensor(meta)
            except OSError as e:
                raise WeightsmithError(f"{meta.file.name}: cannot read tensor {name!r}: "
                                       f"{e.strerror or type(e).__name__}") from None
        if dtype is not None and t.dtype != dtype and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def iter_tensors(self, **kw) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._metas:
            yield name, self.get(name, **kw)

    def total_bytes(self) -> int:
        return sum(m.numel * torch.empty((), dtype=m.dtype).element_size() for m in self._metas.values())

    def num_parameters(self) -> int:
        return sum(m.numel for m in self._metas.values())

    def dtypes(self) -> list[str]:
        return sorted({str(m.dtype).removeprefix("torch.") for m in self._metas.values()})


def _has_safetensors(folder: Path) -> bool:
    return (folder / INDEX_NAME).exists() or any(folder.glob("*.safetensors"))


def _pickle_file(folder: Path) -> Path:
    for cand in ("pytorch_model.bin", "model.pt", "model.bin"):
        if (folder / cand).exists():
            return member_path(folder, cand, owner=folder.name)
    raise WeightsmithError(f"{folder.name}: no weights found (no *.safetensors, no pytorch_model.bin)")


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor -> shard name) of an index file, checked to be a non-empty map of strings."""
    try:
        raw = index.read_bytes()
    except OSError as e:
        raise WeightsmithError(f"{index.name}: cannot read: {e.strerror or type(e).__name__}") from None
    weight_map = parse_json_object(raw, index.name).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsmithError(f"{index.name}: corrupt index (weight_map must map tensor names to shard files)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise WeightsmithError(f"{index.name}: corrupt index (tensor {name!r} maps to {type(shard).__name__}, "
                                   "not a shard file name)")
    return weight_map


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder, checked against its index when there is one.

    Every file must lie inside the folder once symlinks are followed (see
    :func:`checkpoints.containment.member_path`); an index naming anything else is refused.
    """
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file() or index.is_symlink():
        index = member_path(folder, INDEX_NAME, owner=folder.name)
        files = []
        for shard in sorted(set(read_index(index).values())):
            path = member_path(folder, shard, owner=INDEX_NAME)
            if not shard.endswith(".safetensors"):
                raise WeightsmithError(f"{INDEX_NAME} names shard {shard!r}, which is not a .safetensors file")
            if not path.is_file():
                raise WeightsmithError(f"{INDEX_NAME} names shard {shard} but it is missing")
            files.append(path)
        return files
    files = [member_path(folder, f.name, owner=folder.name) for f in sorted(folder.glob("*.safetensors"))]
    files = [f for f in files if f.is_file()]
    if not files:
        raise WeightsmithError(f"{folder.name}: no safetensors weights")
    return files


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickled state dict with ``weights_only=True``; a code payload is refused with a clear error."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # UnpicklingError for payloads, RuntimeError for torn files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsmithError(
            f"{path.name}: refused to load pickle (only plain tensors are allowed; it may carry code): {first}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsmithError(f"{path.name}: not a state dict of tensors")
    return obj


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


@dataclass
class _OpenShard:
    data_path: Path
    handle: "os.PathLike | object"
    entries: dict[str, dict] = field(default_factory=dict)
    nbytes: int = 0
    flushed: int = 0  # bytes of the data file already handed to the kernel for writeback


# Start writing a shard's bytes to disk every this many bytes (see ShardedWriter.add).
_WRITEBACK_BYTES = 32 * 2**20
# Largest single write() of tensor bytes (see ShardedWriter.add).
_WRITE_PIECE = 2**20


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing this range to disk now, without waiting (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``); a no-op where that call does not exist."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; errors only mean no head start


@functools.lru_cache(maxsize=1)
def _sync_file_range():
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class ShardedWriter:
    """Stream tensors into sharded safetensors in a temp folder; rename into place on success.

    safetensors' own writers need every tensor of a shard in memory at once;
    to keep peak memory at one tensor we append raw bytes to a data file and
    write the (documented, 8-byte-length + JSON) header when the shard closes.

    Args:
        out_dir: final folder. It must not exist unless ``overwrite=True``.
        max_shard_bytes: start a new shard when the current one would exceed this.
        dtype: cast floating tensors to this dtype on write (None keeps them).
        skip: names not to write (e.g. a tied ``lm_head.weight``).
        header_reserve: bytes kept free at the start of each shard's data file for its
            header. When the header fits (it is padded with spaces, which the format
            allows), the shard is finished in place instead of being copied behind
            its header: one write of the weights instead of two. 0 = always copy.
        fsync: wait until each shard is on disk before it is published, so that the
            published folder survives a power loss too (off by default, as in
            ``save_pretrained`` and mergekit: it waits for the disk, ~0.35 s per 0.5 GB here).
            Without it, the temp-folder-and-rename still means a failed, cancelled or
            killed writer never leaves a partial folder.
    """

    def __init__(self, out_dir: Path, *, max_shard_bytes: int = 5 * 10**9, dtype: torch.dtype | None = None,
                 skip: Iterable[str] = (), overwrite: bool = False, metadata: dict[str, str] | None = None,
                 header_reserve: int = 0, fsync: bool = False):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = int(max_shard_bytes)
        self.header_reserve = (int(header_reserve) + 7) // 8 * 8 if header_reserve > 0 else 0
        self.dtype = dtype
        self.skip = set(skip)
        self.overwrite = overwrite
        self.fsync = fsync
        self.metadata = {"format": "pt", **(metadata or {})}
        self.tmp = new_staging_dir(self.out_dir, overwrite=overwrite)
        self._shards: list[tuple[Path, list[str]]] = []
        self._current: _OpenShard | None = None
        self._names: set[str] = set()
        self._done = False

    # -- context manager ----------------------------------------------------
    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._done:
            self.commit()
        elif exc_type is not None:
            self.abort()
            if isinstance(exc, OSError):
                # A full disk or a read-only folder is the user's to fix: one line naming the output folder.
                known = output_error(exc, self.out_dir)
                if known is not None:
                    raise known from None

    # -- tensors ------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (moved to CPU, cast to ``dtype``, made contiguous)."""
        if name in self.skip:
            return
        if name in self._names:
            raise WeightsmithError(f"tensor {name!r} written twice")
        t = tensor.detach().to("cpu")
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        t = t.contiguous()
        if t.dtype not in TORCH_TO_ST:
            raise WeightsmithError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        if self._current is not None and self._current.nbytes and self._current.nbytes + nbytes > self.max_shard_bytes:
            self._close_shard()
        if self._current is None:
            data_path = self.tmp / f".shard-{len(self._shards):05d}.data"
            self._current = _OpenShard(data_path, open(data_path, "wb"))
            if self.header_reserve:
                self._current.handle.write(b" " * self.header_reserve)  # type: ignore[attr-defined]
        cur = self._current
        if t.numel():
            # uint8 view of the tensor's bytes: no extra copy for contiguous tensors. Written in
            # pieces: one write() of a 100 MB tensor cost the kernel 4-10x the system time of the
            # same bytes in 1 MB writes here (0.65-1.7 s against 0.15-0.19 s per 538 MB).
            raw = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            for start in range(0, nbytes, _WRITE_PIECE):
                cur.handle.write(raw[start:start + _WRITE_PIECE])  # type: ignore[attr-defined]
        cur.entries[name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                             "data_offsets": [cur.nbytes, cur.nbytes + nbytes]}
        cur.nbytes += nbytes
        self._names.add(name)
        if self.fsync and cur.nbytes - cur.flushed >= _WRITEBACK_BYTES:
            # The shard is fsynced before it is published; starting the disk writes as we
            # go lets them overlap the merge, so that fsync finds little left to wait for.
            cur.handle.flush()  # type: ignore[attr-defined]
            start = self.header_reserve + cur.flushed
            _start_writeback(cur.handle.fileno(), start, cur.nbytes - cur.flushed)  # type: ignore[attr-defined]
            cur.flushed = cur.nbytes

    def _close_shard(self) -> None:
        cur = self._current
        if cur is None:
            return
        cur.handle.close()  # type: ignore[attr-defined]
        head = encode_header(cur.entries, self.metadata, min_bytes=self.header_reserve)
        final = self.tmp / f".shard-{len(self._shards):05d}.safetensors"
        if self.header_reserve and len(head) == self.header_reserve:
            # The header fits the reserved space (padded with spaces): finish in place.
            with open(cur.data_path, "r+b") as out:
                out.write(head)
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
            os.replace(cur.data_path, final)
        else:
            with open(final, "wb") as out, open(cur.data_path, "rb") as data:
                out.write(head)
                data.seek(self.header_reserve)
                shutil.copyfileobj(data, out, 16 * 2**20)
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
            cur.data_path.unlink()
        self._shards.append((final, list(cur.entries)))
        self._current = None

    # -- other files ---------------------------------------------------------
    def add_file(self, name: str, source: Path | bytes) -> None:
        """Put file ``name`` (relative, e.g. ``README.md`` or ``sub/x.json``) into the output:
        a copy of the file at ``source``, or ``source``'s bytes. A later call replaces it.

        The weights' own names (``model.safetensors``, shards, the index) are the writer's;
        a name leaving the output folder is refused.
        """
        if name in (SINGLE_NAME, INDEX_NAME, OWNER_FILE) or _SHARD_NAME.fullmatch(name):
            raise WeightsmithError(f"{name}: the writer makes this file itself; choose another name")
        dest = member_path(self.tmp, name, owner="output file")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, (bytes, bytearray, memoryview)):
            dest.write_bytes(source)
        else:
            shutil.copy2(source, dest)

    def write_text(self, name: str, text: str) -> None:
        """``add_file`` of ``text`` encoded as UTF-8."""
        self.add_file(name, text.encode("utf-8"))

    def copy_support_files(self, source: Path, *, names: Iterable[str] = SUPPORT_FILES) -> list[str]:
        """Copy config/tokenizer/generation config from folder ``source``; returns what was copied."""
        copied = []
        for n in names:
            if os.path.lexists(Path(source) / n):
                # A tokenizer file linked to a server file must not be copied into an output.
                src = member_path(Path(source), n, owner=Path(source).name)
                if src.is_file():
                    self.add_file(n, src)
                    copied.append(n)
        return copied

    # -- finish ------------------------------------------------------------
    def commit(self) -> Path:
        """Close the last shard, name shards, write the index, and rename into place."""
        self._close_shard()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        total = 0
        for i, (path, names) in enumerate(self._shards):
            final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.tmp / final)
            for name in names:
                weight_map[name] = final
            total += (self.tmp / final).stat().st_size
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        publish_folder(self.tmp, self.out_dir)
        self._done = True
        log.info("wrote %d tensors in %d shard(s) to %s", len(weight_map), n, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written so far; the destination is untouched."""
        if self._current is not None:
            try:
                self._current.handle.close()  # type: ignore[attr-defined]
            except Exception:
                pass
            self._current = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True
