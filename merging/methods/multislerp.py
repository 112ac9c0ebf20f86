"""Multi-SLERP: barycentric spherical interpolation of N models (mergekit 0.1.5's ``multislerp``).

Per tensor, with vᵢ the flattened θᵢ (or τᵢ = θᵢ − θ_base given a base) and
weights wᵢ (divided by their sum when ``normalize_weights``), mergekit

1. projects each vᵢ to the unit sphere, uᵢ = vᵢ / (‖vᵢ‖ + eps);
2. takes m = S/‖S‖ with S = Σ wᵢuᵢ as the point where a tangent plane touches;
3. interpolates in that plane, t = Σ wᵢ(uᵢ − (uᵢ·m)m);
4. maps back with the exponential map, m·cos(‖t‖ + eps) + t·sin(‖t‖ + eps)/(‖t‖ + eps),
   and scales by Σ wᵢ‖vᵢ‖.

Step 3 is identically zero: Σ wᵢ(uᵢ − (uᵢ·m)m) = S − (S·m)m = S − ‖S‖m = 0 (only
rounding noise is left). So the result is m·cos(eps)·Σ wᵢ‖vᵢ‖: the weighted
mean direction, scaled by the weighted mean norm. That is computed directly
here, without the N tangent vectors (same tensors within float rounding).

One model returns that model. Where S vanishes (all task vectors zero, or
antipodal directions that cancel) the weighted linear mean is returned; mergekit
does that for two models and raises for more, which would stop a merge whenever
every fine-tune left a tensor at the base.
"""

from __future__ import annotations

import math

import torch

from .base import MergeMethod, ParamSpec


def multislerp(base, tensors, params, per_model, ctx):
    if len(tensors) == 1:
        out = tensors[0].clone()
        tensors.clear()
        return out
    shape = tensors[0].shape
    eps = float(params["eps"])
    weights = [float(p["weight"]) for p in per_model]
    if params["normalize_weights"]:
        total = sum(weights)
        weights = [w / total for w in weights]
    inputs = list(tensors)
    tensors.clear()

    def vector(t: torch.Tensor) -> torch.Tensor:  # vᵢ, made when needed (not N copies at once)
        return t.reshape(-1) - base.reshape(-1) if base is not None else t.reshape(-1)

    direction = torch.zeros(shape.numel(), dtype=inputs[0].dtype, device=inputs[0].device)  # S = Σ wᵢuᵢ
    mean_norm = 0.0  # Σ wᵢ‖vᵢ‖
    for t, w in zip(inputs, weights):
        v = vector(t)
        norm = float(torch.linalg.vector_norm(v))
        direction.add_(v, alpha=w / (norm + eps))
        mean_norm += w * norm
    length = float(torch.linalg.vector_norm(direction))
    if length < eps:
        out = torch.zeros_like(direction)
        for t, w in zip(inputs, weights):
            out.add_(vector(t), alpha=w)
    else:
        # m·cos(eps)·Σ wᵢ‖vᵢ‖: mergekit's exp map of its (zero) tangent vector, whose length is eps.
        out = direction.mul_(math.cos(eps) * mean_norm / length)
    out = out.view(shape)
    return out.add_(base) if base is not None else out


METHODS = [
    MergeMethod(
        name="multislerp", label="Multi-SLERP", paper_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        func=multislerp,
        parameters=(
            ParamSpec("weight", "float", None, per_model=True, required=True, help="this model's weight"),
            ParamSpec("normalize_weights", "bool", True, help="divide the weights by their sum"),
            ParamSpec("eps", "float", 1e-8, min=0.0, help="added to norms so zero tensors do not divide by zero"),
        ),
        needs_base="optional", min_models=1, task_vector=True, reads_inputs_only=True,
        description="the models' weighted mean direction on the sphere, scaled by their weighted mean norm "
                    "(of task vectors, given a base)",
    )
]
