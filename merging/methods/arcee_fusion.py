"""Arcee Fusion (mergekit 0.1.5's ``arcee_fusion``): take the other model's value only where it matters most.

Per tensor, with a = θ_base and b = θ_other:

* importance = |b − a| · KL(softmax(b) ‖ softmax(a)), the KL divergence taken
  along the last axis (one value per row of a matrix, one for a vector);
* threshold = median + 1.5·(q₃ − q₁) of the importances (a Tukey fence: only
  outliers pass), with each quantile the sorted value at ⌊q·(n − 1)⌋;
* output = a + (b − a) where importance ≥ threshold, a elsewhere.

Tensors over a million entries get their quantiles from a sample of a million
entries drawn with replacement, as mergekit does; here the sample comes from
the merge's seeded generator, so a merge is reproducible for a given ``seed:``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MergeMethod, TensorContext

QUANTILE_SAMPLE = 1_000_000
_EPS = 1e-8  # added to both probabilities before the log ratio, as mergekit


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|b − a| times the KL divergence of softmax(b) from softmax(a) along the last axis."""
    p = F.softmax(other, dim=-1).add_(_EPS)
    q = F.softmax(base, dim=-1).add_(_EPS)
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return torch.sub(other, base).abs_().mul_(kl)


def fence(scores: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
    """median + 1.5·(q₃ − q₁) of ``scores``; quantiles are order statistics at ⌊q·(n − 1)⌋."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        picks = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=ctx.generator(), device=flat.device)
        flat = flat[picks]
    last = flat.numel() - 1
    # Three order statistics instead of a full sort (same values as sorted[index]).
    q1, median, q3 = (torch.kthvalue(flat, int(q * last) + 1).values for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base, tensors, params, per_model, ctx):
    other = tensors[0]
    tensors.clear()
    scores = importance(other, base)
    keep = scores >= fence(scores, ctx)
    return torch.where(keep, other, base)


METHODS = [
    MergeMethod(
        name="arcee_fusion", label="Arcee Fusion", paper_url="https://arcee.ai", func=arcee_fusion, parameters=(),
        needs_base="required", min_models=1, max_models=1, task_vector=True, reads_inputs_only=True,
        deterministic=False,  # tensors over a million entries sample their quantiles (seeded)
        description="takes the other model's value only where its change is an outlier in |Δ|·KL importance",
    )
]
