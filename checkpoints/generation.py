"""Text generation with a loaded model (models come from :class:`checkpoints.model_cache.ModelCache`)."""

from __future__ import annotations

import threading
from typing import Iterator

import torch

from .errors import WeightsmithError
from .model_cache import LoadedModel, ModelCache

__all__ = ["LoadedModel", "ModelCache", "generate_text", "stream_text"]


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
