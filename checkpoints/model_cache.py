"""Loaded models shared by concurrent requests: one build at a time, one load per model, a bounded LRU.

Why a process-wide build lock: transformers builds a model by temporarily
replacing process-global objects (``PreTrainedModel.tie_weights``, the
``torch.nn.init`` functions, ``torch.linspace``, torch's default dtype) and
putting back what it found. Two builds in parallel threads put back each
other's replacements: the loser leaves e.g. ``tie_weights`` a no-op for the
rest of the process, so every later model with tied embeddings keeps a meta
``lm_head`` ("Cannot copy out of meta tensor") until a restart. So every
construction of a transformers model in a server goes through
:func:`building_models`. Reading weights from disk is most of a load, so the
lock costs little: loads queue, generation (outside the lock) runs in parallel.

:class:`ModelCache` is an object its owner holds (one per app), never a module
global. ``get_or_load`` is single-flight: concurrent requests for the same key
wait for one load; a half-built model is never published; a failed load is
not cached (the waiters get its error, the next request tries again).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable

from .build_lock import building_models
from .errors import WeightsmithError

log = logging.getLogger(__name__)


def warm_imports() -> None:
    """Import transformers' lazily loaded classes once, on one thread.

    Its lazy module is not safe to import from many threads at once: on a fresh
    server, concurrent first requests failed with "cannot import name
    'AutoConfig' from 'transformers'".
    """
    from transformers import (  # noqa: F401
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        PreTrainedModel,
        TextIteratorStreamer,
    )


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str


@dataclass
class _Flight:
    """One load in progress; the requests that wait for it share its outcome."""

    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None


class ModelCache:
    """LRU of at most ``max_models`` loaded values, loaded once per key even under concurrent requests.

    ``get`` keys a checkpoint by its weight files and their mtimes (a rewritten
    file is a new model); ``get_or_load`` takes any key and a loader, for other
    model-sized values (e.g. a base model with an adapter merged in).
    """

    def __init__(self, max_models: int = 2, device: str | Any = "cpu"):
        if int(max_models) < 1:
            raise WeightsmithError(f"max_models must be at least 1, not {max_models}")
        self.max_models = int(max_models)
        self.device = device
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._loading: dict[Hashable, _Flight] = {}
        self._lock = threading.Lock()

    def get(self, ref: str | Path, **resolve_kw) -> LoadedModel:
        from .sources import resolve

        ckpt = resolve(ref, **resolve_kw)
        key = tuple((str(f), f.stat().st_mtime_ns) for f in ckpt.files)
        return self.get_or_load(key, lambda: LoadedModel(
            ckpt.load_model(device=self.device), ckpt.load_tokenizer(), ckpt.name))

    def get_or_load(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The cached value for ``key``, or ``load()`` run once (under the build lock) and cached."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            flight = self._loading.get(key)
            owner = flight is None
            if owner:
                flight = self._loading[key] = _Flight()
        if not owner:
            flight.done.wait()
            if flight.error is not None:
                # The same failure, as its own exception: one object raised in many threads would share a traceback.
                err = flight.error
                raise (WeightsmithError(str(err)) if isinstance(err, WeightsmithError) else
                       RuntimeError(f"loading this model failed: {type(err).__name__}")) from None
            return flight.value
        evicted: list[Any] = []
        try:
            with building_models():
                value = load()
        except BaseException as e:
            flight.error = e
            with self._lock:
                del self._loading[key]  # not cached: the next request loads again
            flight.done.set()
            raise
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.max_models:
                evicted.append(self._items.popitem(last=False)[1])
            del self._loading[key]
        flight.value = value
        flight.done.set()
        if evicted:
            self._free(evicted)
        return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            dropped = list(self._items.values())
            self._items.clear()
        self._free(dropped)

    @staticmethod
    def _free(values: list[Any]) -> None:
        """Drop the cache's references; a request still generating with one keeps it until it ends."""
        n = len(values)
        values.clear()
        release_memory()
        log.info("unloaded %d model(s)", n)


def release_memory() -> None:
    """Free what finished work left behind, back to the system.

    ``gc.collect`` because modules hold reference cycles (hooks, tied
    parameters); ``malloc_trim`` because a server runs its jobs on many worker
    threads, each with its own glibc malloc arena, and freed tensor memory
    otherwise stays in those arenas: the process's RSS would creep up with
    every job instead of returning to its loaded models' size.
    """
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
