"""The safetensors header, read and checked once, written in one place.

A ``.safetensors`` file is an 8-byte little-endian header length, a JSON
header (name -> ``dtype``, ``shape``, ``data_offsets``, plus optional
``__metadata__``), then the tensors' bytes. :func:`read_safetensors_file`
checks a header completely (types, shapes against byte counts, extents that
tile the data exactly inside the file) and keeps what it found: per file a
:class:`SafetensorsHeader`, per tensor a :class:`TensorMeta` with its
``data_offsets``. Everything that reads tensor bytes afterwards
(:mod:`checkpoints.tensor_loading`) reads at those extents and parses no
header again. :func:`encode_header` is the writer's side of the same format.

Example::

    header = read_safetensors_file(Path("model.safetensors"))
    meta = header.tensors["lm_head.weight"]
    meta.dtype, meta.shape, meta.data_offsets, meta.data_start
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import WeightsmithError

# Largest header we accept; real headers are a few hundred KB at most.
MAX_HEADER_BYTES = 100 * 2**20

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorMeta:
    """Header facts about one stored tensor.

    For a safetensors file: ``data_offsets`` as the header gives them (relative to
    the data section, validated), ``data_base`` the byte of the file where the data
    section begins, and ``file_size`` the size the file had when its header was
    checked (a reader refuses a file that changed since). All three are None for
    tensors of a pickle, which has no such extents.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    data_offsets: tuple[int, int] | None = None
    data_base: int | None = None
    file_size: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def data_start(self) -> int | None:
        """Absolute byte of ``file`` where the tensor's bytes begin."""
        if self.data_offsets is None or self.data_base is None:
            return None
        return self.data_base + self.data_offsets[0]

    @property
    def nbytes(self) -> int | None:
        if self.data_offsets is None:
            return None
        return self.data_offsets[1] - self.data_offsets[0]


@dataclass(frozen=True)
class SafetensorsHeader:
    """One checked safetensors header: the file, where its data begins, its tensors and ``__metadata__``."""

    file: Path
    data_base: int
    file_size: int
    tensors: dict[str, TensorMeta] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def _strict_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json`` hook: a header or index naming a key twice is ambiguous (readers disagree on which wins)."""
    out = dict(pairs)  # in C; only a short count tells that a key came twice (a header has ~1000 objects)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise ValueError(f"key {twice!r} appears twice")
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


def read_safetensors_file(path: Path) -> SafetensorsHeader:
    """Parse and check the header of one ``.safetensors`` file.

    Raises :class:`WeightsmithError` naming the file (never its directory) when it
    is truncated, its header is not a JSON object of well-typed entries, a shape
    disagrees with its byte count, or the extents do not tile the data exactly
    (negative, reversed, overlapping, gapped or past the end), as ``safetensors``
    itself requires.
    """
    path = Path(path)
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
    data_base = 8 + header_len
    data_len = size - data_base
    metas: dict[str, TensorMeta] = {}
    extents: list[tuple[int, int, str]] = []
    for name, info in header.items():
        dtype = ST_DTYPES.get(info.get("dtype")) if isinstance(info, dict) and isinstance(info.get("dtype"), str) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (dtype is None or not isinstance(shape, list) or not all(_is_count(s) for s in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets)):
            raise WeightsmithError(f"{path.name}: corrupt safetensors header entry for tensor {name!r}")
        begin, end = offsets
        meta = TensorMeta(name, tuple(shape), dtype, path, data_offsets=(begin, end), data_base=data_base,
                          file_size=size)
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
    return SafetensorsHeader(path, data_base, size, metas, dict(meta_block))


def read_safetensors_header(path: Path) -> dict[str, TensorMeta]:
    """name -> :class:`TensorMeta` of one file (see :func:`read_safetensors_file`)."""
    return read_safetensors_file(path).tensors


def encode_header(entries: dict[str, dict], metadata: dict[str, str], *, min_bytes: int = 0) -> bytes:
    """The length prefix and JSON header for ``entries`` (name -> dtype, shape, data_offsets).

    The JSON is padded with spaces (which the format allows) so the data begins on
    an 8-byte boundary, and further so that the whole prefix fills ``min_bytes``
    when it fits (a writer that reserved that much space finishes in place).
    """
    blob = json.dumps({**entries, "__metadata__": metadata}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns data to 8 bytes
    if 8 + len(blob) < min_bytes:
        blob += b" " * (min_bytes - 8 - len(blob))
    return struct.pack("<Q", len(blob)) + blob
