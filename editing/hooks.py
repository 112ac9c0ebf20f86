"""Context managers that capture or patch what a module sees and returns.

All of them remove their hooks on exit, even when the body raises, so a
failed trace or edit never leaves a model patched.

Example::

    with capture_input(model, "model.layers.4.mlp.down_proj") as seen:
        model(input_ids)
    keys = seen.value            # [batch, seq, in] input of the down projection

    with patch_output(model, "model.layers.4.mlp.down_proj", lambda out: out + delta):
        logits = model(input_ids).logits
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from checkpoints.errors import WeightsmithError


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name``; one clear error if it does not exist."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise WeightsmithError(f"the model has no module {name!r} (architecture map and model disagree)") from None


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _replace_first(x: Any, value: torch.Tensor) -> Any:
    if isinstance(x, tuple):
        return (value, *x[1:])
    if isinstance(x, list):
        return [value, *x[1:]]
    return value


@dataclass
class Captured:
    """Holder filled by :func:`capture_input` / :func:`capture_output` (last call wins)."""

    value: torch.Tensor | None = None


@contextlib.contextmanager
def capture_input(model: nn.Module, name: str, *, detach: bool = True) -> Iterator[Captured]:
    """Record the first positional input of module ``name`` on each call."""
    box = Captured()

    def hook(_mod, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        box.value = x.detach() if detach else x

    handle = get_module(model, name).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_output(model: nn.Module, name: str, *, detach: bool = True) -> Iterator[Captured]:
    """Record the (first) output tensor of module ``name`` on each call."""
    box = Captured()

    def hook(_mod, _args, out):
        x = _first(out)
        box.value = x.detach() if detach else x

    handle = get_module(model, name).register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


@contextlib.contextmanager
def patch_output(model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the (first) output tensor ``y`` of module ``name`` by ``fn(y)``."""

    def hook(_mod, _args, out):
        return _replace_first(out, fn(_first(out)))

    handle = get_module(model, name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def patch_output_from_input(model: nn.Module, name: str,
                            fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the (first) output ``y`` of module ``name`` by ``fn(x, y)``, ``x`` its (first) input."""

    def hook(_mod, args, out):
        return _replace_first(out, fn(args[0], _first(out)))

    handle = get_module(model, name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def patch_outputs(model: nn.Module, patches: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """:func:`patch_output` for several modules at once."""
    with contextlib.ExitStack() as stack:
        for name, fn in patches.items():
            stack.enter_context(patch_output(model, name, fn))
        yield


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (statistics, keys)."""


@contextlib.contextmanager
def stop_after(model: nn.Module, name: str) -> Iterator[None]:
    """Abort the forward pass once module ``name`` has run (catch :class:`StopForward`).

    Keys and statistics at block ``l`` need nothing above it; stopping there
    saves the remaining blocks and the vocabulary projection.
    """

    def hook(_mod, _args, _out):
        raise StopForward

    handle = get_module(model, name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_until(model: nn.Module, name: str, **inputs: Any) -> None:
    """Run ``model(**inputs)`` up to and including module ``name``."""
    with stop_after(model, name):
        try:
            model(**inputs, use_cache=False)
        except StopForward:
            pass


def forward_with_cache(model: nn.Module, cache: Any, *, use_cache: bool = True, **inputs: Any) -> tuple[Any, Any]:
    """Run ``model(**inputs)`` reading and extending the KV ``cache``; return (output, the new cache).

    transformers renamed ``past_key_values`` to ``cache`` during 5.x (5.24 warns that the old name goes in
    5.40), and releases before the rename know only the old name; so the keyword is taken from the
    installed model's own signature instead of pinning a release.
    """
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(**inputs, **{name: cache}, use_cache=use_cache)
    return out, (getattr(out, name, None) if use_cache else None)


@contextlib.contextmanager
def start_from_block(model: nn.Module, block_names: list[str], start: int, hidden: torch.Tensor) -> Iterator[None]:
    """Make the forward pass begin at block ``start`` with residual stream ``hidden``.

    Blocks ``< start`` do no work: the last of them returns ``hidden`` (the
    input of block ``start``, e.g. a cached corrupted run) and the others pass
    their input through. ``start`` may equal the number of blocks (only the
    final norm and head run). Embeddings, position encodings and masks are
    still built by the model itself, so this works for every architecture in
    the map without re-implementing its forward.
    """
    if start <= 0:
        yield
        return
    saved: list[tuple[nn.Module, Any]] = []  # (block, its own instance-level forward or None)

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def give(*args, **kwargs):
        return hidden

    try:
        for i in range(start):
            block = get_module(model, block_names[i])
            saved.append((block, block.__dict__.get("forward")))
            # Instance attribute shadows the class method; removed again below.
            block.forward = give if i == start - 1 else passthrough  # type: ignore[method-assign]
        yield
    finally:
        for block, own in saved:
            if own is None:
                del block.forward
            else:
                block.forward = own
