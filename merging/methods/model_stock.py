"""Model Stock (Jang et al. 2024): interpolate between the base and the average of ≥2 fine-tunes.

t = N·cosθ / (1 + (N−1)·cosθ), with cosθ the mean pairwise cosine between the
task vectors (per tensor, or per row with ``filter_wise``); the base is kept
where the denominator vanishes.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, ParamSpec


def model_stock(base, tensors, params, per_model, ctx):
    shape = base.shape
    if params["filter_wise"]:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) if w.dim() == 1 else w for w in tensors]
    else:
        w0 = base.reshape(-1)
        ws = [w.reshape(-1) for w in tensors]
    count = len(ws)
    average = ws[0].clone()
    for w in ws[1:]:
        average.add_(w)
    average.div_(count)
    offsets = [w.sub_(w0) for w in ws]  # inputs are ours: reuse their memory
    norms = [torch.norm(o, dim=-1) for o in offsets]
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (count * cos) / safe)
    tensors.clear()
    return (t * average + (1 - t) * w0).reshape(shape)


METHODS = [
    MergeMethod(
        name="model_stock", label="Model Stock", paper_url="https://arxiv.org/abs/2403.19522", func=model_stock,
        parameters=(ParamSpec("filter_wise", "bool", False, help="one interpolation factor per row"),),
        needs_base="required", min_models=2, task_vector=True,
        description="moves from the base toward the fine-tunes' average by their agreement",
    )
]
