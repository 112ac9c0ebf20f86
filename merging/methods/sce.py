"""SCE (FuseChat, Wan et al. 2024, arXiv 2408.07990): Select, Calculate, Erase.

Per tensor, with τᵢ = θᵢ − θ_base:

1. **Select**: with ``select_topk`` < 1, keep only the entries whose variance
   across the models is among the ``int(select_topk · #nonzero-variance)`` largest
   (the same entries for every model);
2. **Calculate**: each model's weight is its share of the mean squared task
   vector, wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²) (equal weights when that sum is below
   1e-6, as mergekit 0.1.5 does);
3. **Erase**: drop entries whose sign disagrees with the sign of Σᵢ τᵢ (TIES's
   election), then average the rest with the weights of the models kept there.

There are no per-model weights. Semantics and thresholds are mergekit 0.1.5's.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, ParamSpec
from .task_arithmetic import calculate_majority_sign_mask

# mergekit's floors: below this total energy the weights are uniform; the kept-weight sum is clamped to it.
_TINY = 1e-6


def variance_mask(deltas: torch.Tensor, keep: float) -> torch.Tensor:
    """1 where the variance of ``deltas`` (T, ...) across its first axis is among the top ``keep`` fraction
    of the nonzero variances, else 0; shaped like one delta (float32)."""
    var = torch.var(deltas, dim=0, unbiased=False)
    if keep <= 0:
        return torch.zeros_like(var)
    k = int(torch.count_nonzero(var) * keep)
    mask = torch.zeros_like(var)
    if k > 0:
        # torch.topk, as mergekit: equal variances at the cut are then chosen the same way.
        mask.view(-1)[torch.topk(var.view(-1), k=k, largest=True).indices] = 1
    return mask


def sce(base, tensors, params, per_model, ctx):
    if not tensors:
        return base.clone()
    deltas = torch.stack(tensors).sub_(base)  # (T, *shape), a new tensor: the inputs stay untouched
    tensors.clear()
    keep = float(params["select_topk"])
    if keep < 1:
        deltas.mul_(variance_mask(deltas, keep))
    agree = calculate_majority_sign_mask(deltas, method="total")  # (T, *shape) bool
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)  # (T,)
    total = float(energy.sum())
    weights = torch.full_like(energy, 1 / energy.numel()) if abs(total) < _TINY else energy / total
    kept = agree.to(deltas.dtype).mul_(weights.view(-1, *([1] * (deltas.dim() - 1))))  # wᵢ where τᵢ is kept
    merged = deltas.mul_(kept).sum(dim=0).div_(kept.sum(dim=0).clamp_(min=_TINY))
    return merged.add_(base)


METHODS = [
    MergeMethod(
        name="sce", label="SCE", paper_url="https://arxiv.org/abs/2408.07990", func=sce,
        parameters=(
            ParamSpec("select_topk", "float", 1.0, min=0.0, max=1.0,
                      help="fraction of entries kept, those whose task vectors vary most across the models"),
            ParamSpec("int8_mask", "bool", False, help="accepted for mergekit compatibility (memory option; no effect here)"),
        ),
        needs_base="required", min_models=1, task_vector=True, reads_inputs_only=True,
        description="keep the entries the models disagree on most, weight each model by its task vector's energy, "
                    "drop sign conflicts",
    )
]
