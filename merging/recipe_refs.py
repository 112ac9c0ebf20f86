"""How a merge recipe names a model: the one reader both the recipe and its tokenizer settings use.

Its own module because :mod:`merging.recipe` imports :mod:`merging.tokenizer_config`,
and both need this reader.
"""

from __future__ import annotations

from typing import Any

from checkpoints.errors import WeightsmithError


def read_model_ref(value: Any, key: str) -> str | None:
    """A model reference (``{model: ...}`` allowed, as in mergekit), None for None; one error otherwise."""
    if value is None:
        return None
    if isinstance(value, dict) and "model" in value:  # mergekit also allows {model: ...}
        value = value["model"]
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or not str(value).strip():
        raise WeightsmithError(f"recipe: {key} must name a model, got {value!r}")
    return str(value).strip()
