"""NearSwap (mergekit 0.1.5's ``nearswap``): take the other model's value where it is near the base's.

Per entry, with a = θ_base and b = θ_other: w = clamp(t / max(|a − b|, 1e-6), 0, 1)
and the output is w·b + (1 − w)·a. Entries that differ by at most ``t`` become
b; entries far apart stay close to a. t = 0 returns the base.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, ParamSpec

_MIN_GAP = 1e-6  # mergekit's floor on |a − b| (w = 1 wherever the models are equal)


def nearswap(base, tensors, params, per_model, ctx):
    other = tensors[0]
    tensors.clear()
    w = torch.sub(base, other).abs_().clamp_(min=_MIN_GAP)
    w = torch.div(float(params["t"]), w, out=w).clamp_(0, 1)
    return torch.mul(other, w).add_(w.neg_().add_(1).mul_(base))


METHODS = [
    MergeMethod(
        name="nearswap", label="NearSwap", paper_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        func=nearswap,
        parameters=(ParamSpec("t", "float", None, required=True,
                              help="entries closer than this to the base take the other model's value"),),
        needs_base="required", min_models=1, max_models=1, task_vector=True, reads_inputs_only=True,
        description="moves each entry of the base toward the other model by t / |difference|, at most all the way",
    )
]
