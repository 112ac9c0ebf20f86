"""The process-wide model-construction lock (why: :mod:`checkpoints.model_cache`'s docstring).

Its own module so that everything that builds a transformers model (the resolver,
GGUF conversion, the model cache, adapter mixing, the app) can take it without
importing the model cache, which itself resolves references through
:mod:`checkpoints.sources`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

# A lock, not a cache: it guards transformers' process-global patching.
# Re-entrant so a loader that takes it may call another that does.
_BUILD_LOCK = threading.RLock()


@contextmanager
def building_models() -> Iterator[None]:
    """Hold the process-wide model-construction lock (wrap every from_pretrained / from_config)."""
    with _BUILD_LOCK:
        yield
