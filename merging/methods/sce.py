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
from .task_arithmetic import SLICE_ENTRIES, calculate_majority_sign_mask

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


def _weights(energy: torch.Tensor) -> torch.Tensor:
    """Each model's share of the total energy (uniform when the total is below mergekit's floor)."""
    total = float(energy.sum())
    return torch.full_like(energy, 1 / energy.numel()) if abs(total) < _TINY else energy / total


def _erase_and_mean(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σᵢ wᵢτᵢ over the models whose sign agrees with the elected one, divided by their Σ wᵢ (over axis 0)."""
    agree = calculate_majority_sign_mask(deltas, method="total")  # (T, ...) bool
    kept = agree.to(deltas.dtype).mul_(weights.view(-1, *([1] * (deltas.dim() - 1))))  # wᵢ where τᵢ is kept
    return deltas.mul_(kept).sum(dim=0).div_(kept.sum(dim=0).clamp_(min=_TINY))


def sce(base, tensors, params, per_model, ctx):
    if not tensors:
        return base.clone()
    keep = float(params["select_topk"])
    if keep >= 1:
        return _sce_sliced(base, tensors, ctx)
    deltas = torch.stack(tensors).sub_(base)  # (T, *shape), a new tensor: the inputs stay untouched
    tensors.clear()
    deltas.mul_(variance_mask(deltas, keep))
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)  # (T,)
    return _erase_and_mean(deltas, _weights(energy)).add_(base)


def _sce_sliced(base: torch.Tensor, tensors: list[torch.Tensor], ctx) -> torch.Tensor:
    """SCE without selection, in slices: the stacked task vectors, sign votes and weights of a whole
    embedding held 1.6 GB at once on the demo model; slices need a few MB (same tensors: the
    erase and the mean are elementwise across models, and each energy is the same row reduction)."""
    inputs = [t.reshape(-1) for t in tensors]
    tensors.clear()
    flat = base.reshape(-1)
    scratch = ctx.empty_like(base).reshape(-1)
    energy = torch.stack([torch.sub(t, flat, out=scratch).square_().view(1, -1).mean(dim=1)[0] for t in inputs])
    weights = _weights(energy)
    out = scratch  # the energies are taken: the scratch holds the result now
    for start in range(0, flat.numel(), SLICE_ENTRIES):
        stop = min(flat.numel(), start + SLICE_ENTRIES)
        deltas = torch.stack([t[start:stop] for t in inputs]).sub_(flat[start:stop])
        torch.add(_erase_and_mean(deltas, weights), flat[start:stop], out=out[start:stop])
    return out.view(base.shape)


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
