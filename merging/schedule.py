"""Parameter schedules: one value per tensor from a scalar, a depth gradient, or name filters.

A setting (mergekit semantics) is one of:

* a scalar: ``0.5``;
* a list of numbers, a *gradient*: interpolated piecewise-linearly at
  ``t = block / (L − 1)`` (``[0, 1]`` rises from 0 at the first block to 1 at
  the last; ``[1, 0, 1]`` dips in the middle). Non-numeric lists pick
  ``values[int(t·(n−1))]``;
* a list of ``{filter, value}`` entries: the first whose ``filter`` is a
  substring of the tensor name (or has no filter, or ``"*"``) gives the value,
  which may itself be a gradient; when none matches, the next scope is asked.

Tensors outside the blocks (embeddings, final norm, head) use ``t = 0``, so a
gradient gives them its first value. With a single block, ``t = 1``.

Precedence, highest first: a slice source's ``parameters``, the slice's
``parameters``, the model entry's ``parameters`` (``models:`` form), then the
top-level ``parameters``; shared (non-per-model) parameters skip the first.

Example::

    evaluate([{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}], "model.layers.3.mlp.up_proj.weight", t=1.0)  # 1.0
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from checkpoints.errors import WeightsmithError

_MISSING = object()


def depth_t(block: int | None, num_blocks: int) -> float:
    """The interpolation point of a tensor: ``block/(L−1)``; 0 outside the blocks; 1 when L = 1."""
    if block is None:
        return 0.0
    if num_blocks <= 1:
        return 1.0
    return block / (num_blocks - 1)


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (bool, int, float, str))


def _as_number(x: Any) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def interpolate(values: list[Any], t: float) -> Any:
    """A gradient's value at ``t`` ∈ [0, 1] (piecewise linear for numbers)."""
    if not values:
        return None
    numbers = [_as_number(v) for v in values]
    if any(n is None for n in numbers):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * numbers[i0] + frac * numbers[i1]  # type: ignore[operator]


def is_filter_entry(x: Any) -> bool:
    return isinstance(x, Mapping) and "value" in x


def evaluate(setting: Any, tensor_name: str, t: float = 0.0) -> Any:
    """The value of one setting for ``tensor_name`` at depth ``t``; None when no filter matches."""
    if is_filter_entry(setting):
        setting = [setting]
    if _is_scalar(setting):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(_is_scalar(e) for e in setting):
            return interpolate(setting, t)
        for entry in setting:
            if not is_filter_entry(entry):
                raise WeightsmithError(f"bad parameter setting {setting!r}: mix of values and filter entries")
            flt = entry.get("filter")
            if flt is None or flt == "*" or (tensor_name and str(flt) in tensor_name):
                return evaluate(entry["value"], tensor_name, t)
        return None
    raise WeightsmithError(f"bad parameter setting {setting!r}: use a number, a list, or {{filter, value}} entries")


def resolve(name: str, scopes: Iterable[Mapping[str, Any] | None], tensor_name: str, t: float,
            default: Any = _MISSING) -> Any:
    """The first scope (highest precedence first) whose setting for ``name`` gives a value."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor_name, t)
            if value is not None:
                return value
    return None if default is _MISSING else default


def setting_values(setting: Any) -> list[Any]:
    """Every scalar a setting can produce (list endpoints, filter values): what validation checks."""
    if is_filter_entry(setting):
        return setting_values(setting["value"])
    if isinstance(setting, list):
        return [v for e in setting for v in setting_values(e)]
    return [setting]
