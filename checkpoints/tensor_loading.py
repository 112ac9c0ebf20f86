"""Reading tensor bytes at the extents a checked header gave, fast enough for a streaming merge.

Everything here reads through a :class:`checkpoints.safetensors_header.TensorMeta`
that :func:`~checkpoints.safetensors_header.read_safetensors_file` validated
(offsets inside the file, byte count = dtype x shape); no header is parsed
again. Before each read the file's size is compared with the size it had when
its header was checked, so a file swapped or truncated since is one error,
never bytes from elsewhere or a crash on a mapped page that no longer exists.

* :func:`read_tensor`: one tensor into fresh memory (what
  :meth:`checkpoints.tensors.CheckpointReader.get` returns);
* :class:`TensorLoader`: float32 tensors for a computation, from reusable
  buffers or as copy-on-write mapped views (one run's state);
* :class:`Prefetcher`: the next step's tensors read on one background thread
  while the current step computes.

Example::

    loader = TensorLoader(capacity=largest_numel, mapped=True)
    t = loader.get(reader, "model.layers.0.mlp.up_proj.weight", compute_dtype=None)
"""

from __future__ import annotations

import math
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Protocol, Sequence, TypeVar

import torch

from .errors import WeightsmithError
from .safetensors_header import TensorMeta

T = TypeVar("T")


class TensorSource(Protocol):
    """What the loader needs of a reader (:class:`checkpoints.tensors.CheckpointReader`, which
    imports this module): each tensor's checked header facts, and a plain read for pickles."""

    def meta(self, name: str) -> TensorMeta: ...

    def get(self, name: str, *, dtype: torch.dtype | None = ...) -> torch.Tensor: ...


def _extent(meta: TensorMeta, fd: int) -> tuple[int, int]:
    """(absolute start, byte count) of ``meta`` in the open file ``fd``, checked against the file as it is now."""
    start, nbytes = meta.data_start, meta.nbytes
    if start is None or nbytes is None:
        raise WeightsmithError(f"{meta.file.name}: tensor {meta.name!r} has no byte extent (not a safetensors file)")
    size = os.fstat(fd).st_size
    if size != meta.file_size or start + nbytes > size:
        raise WeightsmithError(f"{meta.file.name}: the file changed since its header was read "
                               f"(reading tensor {meta.name!r}); reload it")
    return start, nbytes


def _read_into(meta: TensorMeta, target: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor ``target`` (``meta.nbytes`` bytes) with the tensor's stored bytes."""
    with open(meta.file, "rb", buffering=0) as f:
        start, nbytes = _extent(meta, f.fileno())
        if not nbytes:
            return
        view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
        f.seek(start)
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:nbytes])
            if not n:
                raise WeightsmithError(f"{meta.file.name}: truncated while reading tensor {meta.name}")
            got += n


def read_tensor(meta: TensorMeta) -> torch.Tensor:
    """The tensor ``meta`` describes, in its stored dtype, in fresh memory."""
    out = torch.empty(meta.shape, dtype=meta.dtype)
    _read_into(meta, out)
    return out


def map_tensor(meta: TensorMeta) -> torch.Tensor | None:
    """A copy-on-write (MAP_PRIVATE) view of the tensor's bytes, or None when they are
    not aligned for its dtype or empty (the caller then reads them).

    Reading mapped page-cache pages costs a minor fault per 16 pages (the kernel maps
    neighbours around a fault), several times less than copying them with ``read``.
    The mapping lives as long as the tensor; writing to it copies the touched pages
    and never reaches the file.
    """
    offset, nbytes = meta.data_start, meta.nbytes
    if not nbytes or offset is None or offset % meta.dtype.itemsize:
        return None
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(meta.file, "rb") as f:
        _extent(meta, f.fileno())
        try:
            m = mmap.mmap(f.fileno(), nbytes + offset - aligned, access=mmap.ACCESS_COPY, offset=aligned)
        except (OSError, ValueError):
            return None
    return torch.frombuffer(m, dtype=meta.dtype, count=nbytes // meta.dtype.itemsize,
                            offset=offset - aligned).view(meta.shape)


def keep_freed_buffers() -> bool:
    """Ask glibc to serve large blocks from its heap and keep freed ones for reuse (this process, for good).

    By default glibc gives every block over ~32 MB its own fresh ``mmap`` and returns it on
    free, so each large temporary of a merge (|τ|, masks, numpy's partition copies on a
    28M-entry embedding) is faulted in and zeroed again: on this VM TIES's magnitude cut of
    the demo model's embedding spent 1.4-1.6 s in the kernel per model, 0.1-0.7 s with freed
    blocks reused. Meant for one-shot processes (the CLI): a server would keep its peak heap.
    Returns False where the call does not exist (not glibc).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD (-3): blocks up to 1 GiB from the heap; M_TRIM_THRESHOLD (-1): keep 2 GiB free.
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, 1 << 31))
    except (OSError, AttributeError):
        return False


def to_compute(t: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.Tensor:
    """A float tensor as float32, rounded through ``compute_dtype`` first (as mergekit reads it)."""
    if not t.is_floating_point():
        return t
    if compute_dtype is not None and t.dtype != compute_dtype:
        t = t.to(compute_dtype)
    return t.to(torch.float32)


class TensorLoader:
    """Reads one tensor at a time as float32 into reusable buffers (one run's state).

    ``safe_open`` returns tensors backed by a memory map, so the first arithmetic
    on them pays a page fault per 4 KB page, and every fresh 100 MB buffer pays
    them again; on this kind of machine that was most of a merge's time. Here a
    plain read copies at memory speed into buffers that are allocated once per
    run (as many as one step's tensors, each the size of the largest tensor)
    and handed out again after :meth:`reset`. Anything computed that aliases a
    buffer must be consumed before the next ``reset``. Pickled checkpoints and
    integer tensors go through the reader.
    """

    def __init__(self, capacity: int = 0, *, mapped: bool = False) -> None:
        self.mapped = mapped  # hand out read-only float32 inputs as mapped views (see get)
        self.capacity = capacity  # elements of the largest tensor
        self._slots: list[torch.Tensor] = []
        self._used = 0
        self._raw: torch.Tensor | None = None

    def reset(self) -> None:
        self._used = 0

    def empty(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """A float32 CPU tensor of ``shape`` from the pool (fresh memory when it is too big)."""
        numel = math.prod(shape)
        if numel > self.capacity:
            return torch.empty(shape, dtype=torch.float32)
        if self._used == len(self._slots):
            self._slots.append(torch.empty(numel, dtype=torch.float32))
        elif self._slots[self._used].numel() < numel:
            self._slots[self._used] = torch.empty(numel, dtype=torch.float32)  # grow: slots hold the largest seen
        slot = self._slots[self._used]
        self._used += 1
        return slot[:numel].view(shape)

    def get(self, reader: TensorSource, name: str, compute_dtype: torch.dtype | None) -> torch.Tensor:
        """Tensor ``name`` of ``reader`` as float32 (rounded through ``compute_dtype`` first).

        With ``mapped`` a float32 tensor that needs no conversion comes back as a
        copy-on-write view of the file's pages (no copy at all; the caller must only
        read it, or pay a page copy per write); others are converted straight from
        the mapped bytes into a pool buffer.
        """
        meta = reader.meta(name)
        if meta.data_start is None or not meta.dtype.is_floating_point:
            return to_compute(reader.get(name, dtype=None), compute_dtype)
        direct = meta.dtype == torch.float32 and compute_dtype in (None, torch.float32)
        rounded = compute_dtype in (None, torch.float32, meta.dtype)  # no rounding step before float32
        raw = map_tensor(meta)
        if raw is not None:
            if direct and self.mapped:
                return raw
            return self.empty(meta.shape).copy_(raw if rounded else raw.to(compute_dtype))  # copy_ converts
        out = self.empty(meta.shape)
        if direct:
            _read_into(meta, out)
            return out
        nbytes = meta.nbytes or 0
        if self._raw is None or self._raw.numel() < nbytes:
            self._raw = torch.empty(max(nbytes, self.capacity * meta.dtype.itemsize), dtype=torch.uint8)
        stored = self._raw[:nbytes].view(meta.dtype).view(meta.shape)
        _read_into(meta, stored)
        return out.copy_(stored if rounded else stored.to(compute_dtype))


class Prefetcher(Generic[T]):
    """Runs ``read(i, loader)`` for the next step on one background thread while step ``i``
    computes (file reads and torch release the GIL).

    Two loaders take turns, so the thread never writes into buffers still in use.
    A read-ahead that would hold two large steps at once (together more than
    ``capacity`` elements) is skipped, so peak memory stays at one large step's tensors.

    Args:
        sizes: elements of each step's largest tensor.
        read: reads step ``i``'s tensors with the given loader.
        capacity: elements of the largest tensor of the run.
        skip: steps that read nothing.
        mapped: see :class:`TensorLoader`.
    """

    def __init__(self, sizes: Sequence[int], read: Callable[[int, TensorLoader], T], capacity: int, *,
                 skip: Callable[[int], bool] = lambda i: False, mapped: bool = False) -> None:
        self.sizes, self.read, self.capacity, self.skip = list(sizes), read, capacity, skip
        self.loaders = [TensorLoader(capacity, mapped=mapped), TensorLoader(capacity, mapped=mapped)]
        self.last = self.loaders[0]  # the loader of the step being computed
        self.pending: dict[int, tuple[Future[T], TensorLoader]] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensor-read")

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        for future, _ in self.pending.values():
            future.cancel()
        self.pool.shutdown(wait=True)

    def start_after(self, i: int) -> None:
        """Start reading the step after ``i`` (the next one not skipped), if memory allows."""
        j = i + 1
        while j < len(self.sizes) and self.skip(j):
            j += 1
        if i < 0 or j >= len(self.sizes) or j in self.pending:
            return
        if self.sizes[i] + self.sizes[j] > self.capacity:
            return  # two large steps at once: read j when it is its turn instead
        loader = self.loaders[1] if self.last is self.loaders[0] else self.loaders[0]
        loader.reset()
        self.pending[j] = (self.pool.submit(self.read, j, loader), loader)

    def take(self, i: int) -> tuple[T, TensorLoader]:
        """Step ``i``'s tensors and the loader holding them (read now unless read ahead)."""
        if i in self.pending:
            future, loader = self.pending.pop(i)
            self.last = loader
            return future.result(), loader
        # Not read ahead: the previous step is done, so its loader is free.
        self.last.reset()
        return self.read(i, self.last), self.last
