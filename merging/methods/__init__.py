"""The merge-method registry: one plain dict built from each family's ``METHODS`` list.

Example::

    from merging.methods import REGISTRY, get_method
    m = get_method("ties")
    [(p.name, p.default, p.per_model) for p in m.parameters]
"""

from __future__ import annotations

from checkpoints.errors import WeightsmithError

from . import (arcee_fusion, karcher, linear, model_stock, multislerp, nearswap, passthrough, ram, sce,
               slerp, svd_merges, task_arithmetic)
from .base import MergeMethod, ParamSpec, TensorContext

REGISTRY: dict[str, MergeMethod] = {
    m.name: m
    for family in (linear, task_arithmetic, slerp, model_stock, passthrough,
                   sce, karcher, multislerp, nearswap, arcee_fusion, ram, svd_merges)
    for m in family.METHODS
}


def get_method(name: str) -> MergeMethod:
    """The registry entry for ``name``; one clear error listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise WeightsmithError(
            f"unknown merge method {name!r}: choose one of {', '.join(sorted(REGISTRY))}"
        ) from None


__all__ = ["REGISTRY", "MergeMethod", "ParamSpec", "TensorContext", "get_method"]
