"""Karcher mean: the Riemannian (geodesic) mean of the models' tensors on the unit sphere.

Each tensor θᵢ (flattened) is split into its norm ‖θᵢ‖ and direction uᵢ. The
direction of the output is the point m of the sphere that minimises
Σ αᵢ·d(m, uᵢ)², found by gradient steps along the sphere: the tangent step
Σ αᵢ·(θᵢ/sin θᵢ)·(uᵢ − cos θᵢ·m), with θᵢ the angle from m to uᵢ, is followed
along its great circle, for at most ``max_iter`` steps or until it is shorter
than ``tol``. The output is m scaled by the mean norm Σ αᵢ‖θᵢ‖, with equal αᵢ.

Every listed model takes part, and so does the base model when one is given (as
in mergekit 0.1.5, which ignores the base role for this method). Directions of
tensors with a norm at or below ``tol`` are left out of the mean.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, ParamSpec


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], *, max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher mean of ``tensors`` (a new tensor; the inputs are not modified)."""
    if len(tensors) == 1:
        return tensors[0].clone()
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    kept = [(a, t / n) for a, t, n in zip(alphas, tensors, norms) if float(n) > tol]
    if not kept:
        return torch.zeros_like(tensors[0])
    total = sum(a for a, _ in kept)
    kept = [(a / total, u.reshape(-1)) for a, u in kept]

    mean = torch.zeros_like(kept[0][1])
    for a, u in kept:
        mean.add_(u, alpha=a)
    length = torch.linalg.vector_norm(mean)
    # Directions that cancel out (antipodal pairs): start from the first one instead.
    mean = kept[0][1].clone() if float(length) < tol else mean.div_(length)

    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for a, u in kept:
            cos = torch.dot(mean, u).clamp(-1.0, 1.0)
            angle = torch.arccos(cos)
            if float(angle) < tol:
                continue  # already there: no pull (and θ/sin θ would be 0/0)
            # log map of u at the mean, weighted: a·θ/sin θ·(u − cos θ·m)
            step.add_((u - cos * mean).mul_(a * (angle / torch.sin(angle))))
        step_length = torch.linalg.vector_norm(step)
        if float(step_length) < tol:
            break
        # exp map: follow the great circle through the mean in the step's direction
        mean = torch.cos(step_length) * mean + torch.sin(step_length) * (step / step_length)
        length = torch.linalg.vector_norm(mean)
        if float(length) > tol:
            mean = mean / length
    scale = sum(a * n for a, n in zip(alphas, norms))
    return (scale * mean).reshape(tensors[0].shape)


def karcher(base, tensors, params, per_model, ctx):
    inputs = [*tensors, base] if base is not None else list(tensors)
    tensors.clear()
    return karcher_mean(inputs, [1.0 / len(inputs)] * len(inputs),
                        max_iter=int(params["max_iter"]), tol=float(params["tol"]))


METHODS = [
    MergeMethod(
        name="karcher", label="Karcher Mean", paper_url="https://arxiv.org/abs/2603.04972", func=karcher,
        parameters=(
            ParamSpec("max_iter", "int", 10, min=0, help="most gradient steps on the sphere"),
            ParamSpec("tol", "float", 1e-5, min=0.0, help="stop when a step is shorter than this (radians)"),
        ),
        # mergekit ignores the base role: a base model given is one more input with the same weight.
        needs_base="optional", min_models=1, task_vector=False, reads_inputs_only=True,
        description="geodesic mean of the models' directions on the sphere, scaled by their mean norm",
    )
]
