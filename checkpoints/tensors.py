"""Lazy tensor reading and streaming, atomic writing of safetensors checkpoints.

* :class:`CheckpointReader` reads one tensor at a time across shards with
  ``safetensors.safe_open`` (no whole model in memory). Headers are checked
  first, so a truncated or corrupt file is one clear error naming the file.
* :class:`ShardedWriter` writes tensors as they are produced into shards in a
  temporary folder, with ``model.safetensors.index.json`` when there is more
  than one shard, and renames the folder into place only when complete.

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
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from .containment import member_path
from .errors import WeightsmithError
from .staging import new_staging_dir, output_error, publish_folder

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Largest header we accept; real headers are a few hundred KB at most.
MAX_HEADER_BYTES = 100 * 2**20

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_TORCH_TO_ST = {v: k for k, v in _ST_DTYPES.items()}

# Files copied next to the weights so the folder loads on its own.
SUPPORT_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@dataclass(frozen=True)
class TensorMeta:
    """Header facts about one stored tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    # Where the tensor's bytes lie in ``file`` (validated by read_safetensors_header);
    # None for tensors of a pickle, which has no such extents.
    data_start: int | None = None
    nbytes: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _strict_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json`` hook: a header or index naming a key twice is ambiguous (readers disagree on which wins)."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def parse_json_object(raw: bytes | str, what: str) -> dict[str, object]:
    """Parse ``raw`` as one JSON object; anything else (a list, a number, bad UTF-8, a key
    given twice, nesting deep enough to exhaust the stack) is one :class:`WeightsmithError`."""
    try:
        data = json.loads(raw, object_pairs_hook=_strict_object)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise WeightsmithError(f"{what}: corrupt JSON ({first})") from None
    if not isinstance(data, dict):
        raise WeightsmithError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors_header(path: Path) -> dict[str, TensorMeta]:
    """Parse and check the header of one ``.safetensors`` file.

    Returns name -> :class:`TensorMeta` with each tensor's validated byte extent.
    Raises :class:`WeightsmithError` naming the file (never its directory) when it
    is truncated, its header is not a JSON object of well-typed entries, a shape
    disagrees with its byte count, or the extents do not tile the data exactly
    (negative, reversed, overlapping, gapped or past the end), as ``safetensors``
    itself requires.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise WeightsmithError(f"{path.name}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or header_len > size - 8:
                raise WeightsmithError(
                    f"{path.name}: corrupt safetensors header: it claims {header_len} header bytes "
                    f"but the file has {size} bytes"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise WeightsmithError(f"{path.name}: cannot read: {e.strerror or type(e).__name__}") from None
    if not raw.startswith(b"{"):
        raise WeightsmithError(f"{path.name}: corrupt safetensors header (it does not start with '{{')")
    header = parse_json_object(raw, f"{path.name}: safetensors header")
    meta_block = header.pop("__metadata__", {})
    if not isinstance(meta_block, dict) or not all(isinstance(v, str) for v in meta_block.values()):
        raise WeightsmithError(f"{path.name}: corrupt safetensors header (__metadata__ must map names to strings)")
    data_len = size - 8 - header_len
    metas: dict[str, TensorMeta] = {}
    extents: list[tuple[int, int, str]] = []
    for name, info in header.items():
        dtype = _ST_DTYPES.get(info.get("dtype")) if isinstance(info, dict) and isinstance(info.get("dtype"), str) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (dtype is None or not isinstance(shape, list) or not all(_is_count(s) for s in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets)):
            raise WeightsmithError(f"{path.name}: corrupt safetensors header entry for tensor {name!r}")
        begin, end = offsets
        meta = TensorMeta(name, tuple(shape), dtype, path, data_start=8 + header_len + begin, nbytes=end - begin)
        if end < begin or end - begin != meta.numel * dtype.itemsize:
            raise WeightsmithError(
                f"{path.name}: header of tensor {name!r} claims shape {list(shape)} but {end - begin} bytes"
            )
        if end > data_len:
            raise WeightsmithError(
                f"{path.name}: truncated: tensor {name!r} needs bytes up to {end} but the file holds "
                f"only {data_len} bytes of data"
            )
        metas[name] = meta
        extents.append((begin, end, name))
    # The extents must tile the data: sorted, each starting where the previous ended.
    at, prev = 0, None
    for begin, end, name in sorted(extents):
        if begin < at:
            raise WeightsmithError(f"{path.name}: corrupt safetensors header: tensors {prev!r} and {name!r} overlap")
        if begin > at:
            raise WeightsmithError(f"{path.name}: corrupt safetensors header: bytes {at}..{begin} belong to no tensor")
        at, prev = end, name
    if at != data_len:
        raise WeightsmithError(
            f"{path.name}: corrupt safetensors header: {data_len - at} bytes after the last tensor belong to no tensor"
        )
    return metas


class CheckpointReader:
    """Lazy, per-tensor access to a checkpoint stored as one or more safetensors shards.

    ``get(name)`` opens the owning shard with ``safe_open`` and returns just
    that tensor, converted to float32 by default (the CPU is ~300x slower in
    bf16). Pickle checkpoints are read whole, through ``torch.load(weights_only=True)``.
    """

    def __init__(self, metas: dict[str, TensorMeta], *, pickled: dict[str, torch.Tensor] | None = None):
        self._metas = metas
        self._pickled = pickled

    # -- construction ------------------------------------------------------
    @classmethod
    def from_files(cls, files: Iterable[Path]) -> "CheckpointReader":
        """Reader over explicit safetensors files (shards of one checkpoint)."""
        metas: dict[str, TensorMeta] = {}
        for f in files:
            for name, meta in read_safetensors_header(Path(f)).items():
                if name in metas:
                    raise WeightsmithError(f"tensor {name!r} is stored twice: in {metas[name].file.name} and {f.name}")
                metas[name] = meta
        return cls(metas)

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
                with safe_open(str(meta.file), framework="pt", device="cpu") as f:
                    t = f.get_tensor(name)
            except Exception as e:  # safetensors raises its own error types
                raise WeightsmithError(f"{meta.file.name}: cannot read tensor {name!r}: {e}") from None
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
        if t.dtype not in _TORCH_TO_ST:
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
        # uint8 view of the tensor's bytes: no extra copy for contiguous tensors.
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        cur.handle.write(memoryview(raw) if t.numel() else b"")  # type: ignore[attr-defined]
        cur.entries[name] = {"dtype": _TORCH_TO_ST[t.dtype], "shape": list(t.shape),
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
        header = dict(cur.entries)
        header["__metadata__"] = self.metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors aligns data to 8 bytes
        final = self.tmp / f".shard-{len(self._shards):05d}.safetensors"
        if self.header_reserve and 8 + len(blob) <= self.header_reserve:
            # The header fits the reserved space: pad it with spaces and finish in place.
            blob += b" " * (self.header_reserve - 8 - len(blob))
            with open(cur.data_path, "r+b") as out:
                out.write(struct.pack("<Q", len(blob)))
                out.write(blob)
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
            os.replace(cur.data_path, final)
        else:
            with open(final, "wb") as out, open(cur.data_path, "rb") as data:
                out.write(struct.pack("<Q", len(blob)))
                out.write(blob)
                data.seek(self.header_reserve)
                shutil.copyfileobj(data, out, 16 * 2**20)
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
            cur.data_path.unlink()
        self._shards.append((final, list(cur.entries)))
        self._current = None

    # -- other files ---------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        (self.tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (self.tmp / name).write_text(text, encoding="utf-8")

    def copy_file(self, src: Path, name: str | None = None) -> None:
        shutil.copy2(src, self.tmp / (name or Path(src).name))

    def copy_support_files(self, source: Path, *, names: Iterable[str] = SUPPORT_FILES) -> list[str]:
        """Copy config/tokenizer/generation config from folder ``source``; returns what was copied."""
        copied = []
        for n in names:
            if os.path.lexists(Path(source) / n):
                # A tokenizer file linked to a server file must not be copied into an output.
                src = member_path(Path(source), n, owner=Path(source).name)
                if src.is_file():
                    self.copy_file(src, n)
                    copied.append(n)
        return copied

    @property
    def staging(self) -> Path:
        """The temporary folder (for callers that save extra files, e.g. a tokenizer)."""
        return self.tmp

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


def tied_head_names(config: dict, spec) -> list[str]:
    """Names of head weights that a tied-embedding model does not store.

    For ``tie_word_embeddings`` models (gpt2, SmolLM2) ``lm_head.weight`` is
    the embedding matrix; writing it again would double the file and, worse,
    let a merge make the two differ.
    """
    tied = config.get("tie_word_embeddings")
    if tied is None:
        tied = spec.model_type == "gpt2"
    return [f"{h}.weight" for h in spec.head] if tied else []
