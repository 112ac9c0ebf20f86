"""Passthrough: copy one model's tensors unchanged (optionally scaled); used with slices to stack layers."""

from __future__ import annotations

from .base import MergeMethod, ParamSpec


def passthrough(base, tensors, params, per_model, ctx):
    scale = per_model[0].get("scale")
    out = tensors[0]
    return out if scale is None else out.mul_(float(scale))


METHODS = [
    MergeMethod(
        name="passthrough", label="Passthrough", paper_url=None, func=passthrough,
        parameters=(ParamSpec("scale", "float", None, per_model=True,
                              help="multiply the tensor by this (e.g. 0 with a filter to zero a projection)"),),
        needs_base="none", min_models=1, max_models=1, task_vector=False,
        description="one model's tensors as they are; with slices, stack layers of several models",
    )
]
