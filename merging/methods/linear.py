"""Linear merge (model soup): Σ wᵢ θᵢ, divided by Σ wᵢ when ``normalize`` (the default)."""

from __future__ import annotations

import torch

from checkpoints.errors import WeightsmithError

from .base import MergeMethod, ParamSpec


def linear(base, tensors: list[torch.Tensor], params, per_model, ctx) -> torch.Tensor:
    weights = [float(p["weight"]) for p in per_model]
    out = tensors[0].mul_(weights[0])
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t, alpha=w)
    tensors.clear()
    if params["normalize"]:
        total = sum(weights)
        if total == 0:
            raise WeightsmithError(f"linear: the weights for {ctx.name} sum to 0, so they cannot be normalized")
        out.div_(total)
    return out


METHODS = [
    MergeMethod(
        name="linear", label="Linear (model soup)", paper_url="https://arxiv.org/abs/2203.05482", func=linear,
        parameters=(
            ParamSpec("weight", "float", None, per_model=True, required=True, help="this model's weight"),
            ParamSpec("normalize", "bool", True, help="divide by the sum of the weights"),
        ),
        needs_base="none", task_vector=False, description="weighted average of the models' weights",
    )
]
