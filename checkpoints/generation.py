"""Text generation with a loaded model, and an explicit cache of loaded models.

The cache is an object the caller owns (one per app), keyed by the resolved
checkpoint's files, never a module-level global.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import WeightsmithError
from .sources import resolve


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str


class ModelCache:
    """LRU of loaded (model, tokenizer) pairs keyed by the checkpoint's weight files and their mtimes."""

    def __init__(self, max_models: int = 2, device: str | torch.device = "cpu"):
        self.max_models = max_models
        self.device = device
        self._items: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref: str | Path, **resolve_kw) -> LoadedModel:
        ckpt = resolve(ref, **resolve_kw)
        key = tuple((str(f), f.stat().st_mtime_ns) for f in ckpt.files)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        loaded = LoadedModel(ckpt.load_model(device=self.device), ckpt.load_tokenizer(), ckpt.name)
        with self._lock:
            self._items[key] = loaded
            while len(self._items) > self.max_models:
                self._items.popitem(last=False)
        return loaded

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def _inputs(loaded: LoadedModel, prompt: str, device) -> dict:
    if not prompt.strip():
        raise WeightsmithError("the prompt is empty")
    return loaded.tokenizer(prompt, return_tensors="pt").to(device)


@torch.no_grad()
def generate_text(cache: ModelCache, ref: str, prompt: str, *, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` (the continuation only)."""
    loaded = cache.get(ref)
    inputs = _inputs(loaded, prompt, cache.device)
    out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id)
    return loaded.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def stream_text(loaded: LoadedModel, prompt: str, *, max_new_tokens: int = 32, device="cpu") -> Iterator[str]:
    """Yield the growing continuation token by token (greedy), for streaming UIs."""
    from transformers import TextIteratorStreamer

    inputs = _inputs(loaded, prompt, device)
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                  pad_token_id=loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id)
    thread = threading.Thread(target=lambda: torch.no_grad()(loaded.model.generate)(**kwargs), daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
