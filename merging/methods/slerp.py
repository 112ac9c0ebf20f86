"""Spherical interpolation: ``slerp`` (base ↔ one model, parameter ``t``) and ``nuslerp``.

Both follow mergekit 0.1.5: the angle is measured between the whole tensors
(flattened); nearly collinear pairs (|cos| > 0.9995 for slerp) fall back to
linear interpolation. ``nuslerp`` takes two weighted models, t = w₂/(w₁+w₂),
and with a base interpolates their task vectors.
"""

from __future__ import annotations

import math

import torch

from .base import MergeMethod, ParamSpec

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """slerp from ``a`` (t=0) to ``b`` (t=1) over the flattened tensors."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    if fa.numel() == 0:
        return a.clone()
    na = torch.linalg.vector_norm(fa)
    nb = torch.linalg.vector_norm(fb)
    na = na if na > EPS else torch.ones_like(na)
    nb = nb if nb > EPS else torch.ones_like(nb)
    dot = float((torch.dot(fa, fb) / (na * nb)).clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        ca, cb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
    out = a.mul(ca) if ca != 1 else a.clone()
    return out.add_(b, alpha=cb) if cb != 0 else out


def slerp(base, tensors, params, per_model, ctx):
    return slerp_tensors(float(params["t"]), base, tensors[0])


def _nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:  # mergekit's dim=0: vectors run along the first axis
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = (unit(v0) * unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.sin(theta)
    curved = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    out = torch.where(colinear, (1 - t) * v0 + t * v1, curved)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(base, tensors, params, per_model, ctx):
    w0, w1 = float(per_model[0]["weight"]), float(per_model[1]["weight"])
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    kw = dict(row_wise=bool(params["nuslerp_row_wise"]), flatten=bool(params["nuslerp_flatten"]))
    if base is None:
        return _nuslerp_vectors(t, tensors[0], tensors[1], **kw)
    d0, d1 = tensors[0].sub_(base), tensors[1].sub_(base)
    return _nuslerp_vectors(t, d0, d1, **kw).add_(base)


METHODS = [
    MergeMethod(
        name="slerp", label="SLERP", paper_url="https://en.wikipedia.org/wiki/Slerp", func=slerp,
        parameters=(ParamSpec("t", "float", None, min=0.0, max=1.0, required=True,
                              help="0 gives the base model, 1 the other model"),),
        needs_base="required", min_models=1, max_models=1, task_vector=True,
        description="spherical interpolation between the base and one model",
    ),
    MergeMethod(
        name="nuslerp", label="NuSLERP", paper_url=None, func=nuslerp,
        parameters=(
            ParamSpec("weight", "float", None, per_model=True, required=True,
                      help="relative weight; t = w₂ / (w₁ + w₂)"),
            ParamSpec("nuslerp_row_wise", "bool", False, help="interpolate column vectors instead of rows"),
            ParamSpec("nuslerp_flatten", "bool", True, help="treat each tensor as one vector"),
        ),
        needs_base="optional", min_models=2, max_models=2, task_vector=True,
        description="spherical interpolation of two models (or of their task vectors, given a base)",
    ),
]
