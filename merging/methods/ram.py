"""RAM and RAM+ (tensor-local): Reinforced Agent Merging (arXiv 2601.13572), mergekit 0.1.5's semantics.

Per entry, with τᵢ = θᵢ − θ_base and only entries with |τᵢ| > ``epsilon`` counted
as changed: an entry changed by one model alone keeps that model's value (its
update is not diluted by the models that left it alone); an entry changed by
several takes their mean. ``ramplus_tl`` also scales each model's unique
entries by λᵢ = 1 + r·min(ρᵢ, alpha), where ρᵢ is the model's ratio of shared
to unique changed entries in this tensor: a model that shares much of its
update gets its remaining, unique part amplified.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, ParamSpec


def ram_merge(base: torch.Tensor, tensors: list[torch.Tensor], *, epsilon: float,
              r: float = 0.0, alpha: float = 0.0) -> torch.Tensor:
    """base + Σᵢ τᵢ·cᵢ over the changed entries, cᵢ = λᵢ where one model changed the entry and
    1/count where ``count`` > 1 did (λᵢ = 1 unless ``r`` > 0)."""
    deltas = [t - base for t in tensors]  # the inputs stay untouched
    tensors.clear()
    changed = [d.abs() > epsilon for d in deltas]
    count = torch.zeros(base.shape, dtype=torch.int64, device=base.device)
    for c in changed:
        count.add_(c)
    unique, shared = count == 1, count > 1
    divisor = count.clamp(min=1).to(base.dtype)
    merged = torch.zeros_like(base)
    for d, c in zip(deltas, changed):
        scale = 1.0
        n_unique = int((c & unique).sum())
        if r and n_unique:  # without unique entries λᵢ scales nothing
            ratio = int((c & shared).sum()) / max(n_unique, epsilon)
            scale = 1 + r * min(max(ratio, 0.0), alpha)
        d.mul_(c)  # unchanged entries count for nothing
        merged.add_(torch.where(unique, d * scale, d / divisor))
    return merged.add_(base)


def ram(base, tensors, params, per_model, ctx):
    return ram_merge(base, tensors, epsilon=float(params["epsilon"]))


def ramplus_tl(base, tensors, params, per_model, ctx):
    return ram_merge(base, tensors, epsilon=float(params["epsilon"]), r=float(params["r"]),
                     alpha=float(params["alpha"]))


_EPSILON = ParamSpec("epsilon", "float", 1e-5, min=0.0, help="a task-vector entry counts as changed above this |value|")
_URL = "https://arxiv.org/abs/2601.13572"

METHODS = [
    MergeMethod(
        name="ram", label="Reinforced Agent Merging", paper_url=_URL, func=ram, parameters=(_EPSILON,),
        needs_base="required", min_models=1, task_vector=True, reads_inputs_only=True,
        description="entries changed by one model keep its update; entries changed by several take their mean",
    ),
    MergeMethod(
        name="ramplus_tl", label="Reinforced Agent Merging Plus (Tensor-Local)", paper_url=_URL, func=ramplus_tl,
        parameters=(
            ParamSpec("r", "float", 0.1, help="how much a model's unique entries are amplified"),
            ParamSpec("alpha", "float", 0.2, min=0.0, help="cap on the shared-to-unique ratio ρ"),
            _EPSILON,
        ),
        needs_base="required", min_models=1, task_vector=True, reads_inputs_only=True,
        description="RAM, with each model's unique entries scaled by 1 + r·min(shared/unique, alpha)",
    ),
]
