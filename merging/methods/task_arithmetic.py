"""The task-vector family: task arithmetic, TIES, DARE, breadcrumbs, DELLA.

Each model contributes a task vector τᵢ = θᵢ − θ_base, optionally sparsified
(see :mod:`merging.methods.sparsify`) and weighted by ``weight``. With a sign
consensus (TIES-style) only entries agreeing with the elected sign are kept;
``normalize`` divides by the sum of the weights that were kept. ``lambda``
scales the merged vector. Semantics are mergekit 0.1.5's ``generalized task
arithmetic``; the sign election is PEFT's ``calculate_majority_sign_mask``
(its "total"/"frequency" are mergekit's "sum"/"count"). PEFT's ``ties`` and
``dare_*`` are not used: they divide by a count rather than by the kept
weights, and rescale DARE by 1/density rather than to the L1 norm.
"""

from __future__ import annotations

from typing import Any, Literal

import importlib.util
import sys
from pathlib import Path

import torch

from . import sparsify
from .base import MergeMethod, ParamSpec, TensorContext

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"] | None
Consensus = Literal["sum", "count"] | None


def _peft_merge_utils():
    """PEFT's ``peft.utils.merge_utils``, loaded as a standalone module.

    ``import peft`` first imports transformers and the whole PEFT package (3–5 s
    here) for what is a torch-only file; the merge CLI's start-up matters in the
    speed comparison, so the file is loaded by itself (it imports only torch).
    Falls back to the normal import if PEFT's layout ever changes.
    """
    name = "_weightsmith_peft_merge_utils"
    if name in sys.modules:
        return sys.modules[name]
    try:
        spec = importlib.util.find_spec("peft")
        path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "merge_utils.py"  # type: ignore[union-attr]
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)  # type: ignore[arg-type]
        file_spec.loader.exec_module(module)  # type: ignore[union-attr]
        sys.modules[name] = module
        return module
    except Exception:  # pragma: no cover - layout change: pay the full import
        from peft.utils import merge_utils

        return merge_utils


def calculate_majority_sign_mask(tensor: torch.Tensor, method: str = "total") -> torch.Tensor:
    """PEFT's sign election (``total`` = mergekit's ``sum``, ``frequency`` = ``count``)."""
    return _peft_merge_utils().calculate_majority_sign_mask(tensor, method=method)


# Elementwise consensus is done in slices of this many entries, so the sign
# masks never cost more than a few MB whatever the tensor size, and a slice's
# temporaries stay in the CPU cache across the ten or so passes made over them
# (2.3x faster than 4M-entry slices here).
SLICE_ENTRIES = 1 << 18


def _sparsify(delta: torch.Tensor, method: Sparsifier, p: dict[str, Any], rescale: bool, ctx: TensorContext) -> torch.Tensor:
    density = float(p.get("density", 1.0))
    if method == "magnitude":
        return sparsify.magnitude(delta, density, rescale=rescale, exact_ties=ctx.exact_ties)
    if method == "magnitude_outliers":
        return sparsify.magnitude_outliers(delta, density, float(p.get("gamma", 0.01)), rescale=rescale,
                                           exact_ties=ctx.exact_ties)
    if method == "random":
        return sparsify.bernoulli(delta, density, ctx.generator(), rescale=rescale)
    if method == "della_magprune":
        return sparsify.della_magprune(delta, density, float(p.get("epsilon", 0.15)), ctx.generator(), rescale=rescale)
    return delta


def generalized_task_arithmetic(base: torch.Tensor | None, tensors: list[torch.Tensor], params: dict[str, Any],
                                per_model: list[dict[str, Any]], ctx: TensorContext, *,
                                sparsifier: Sparsifier, consensus: Consensus) -> torch.Tensor:
    """base + λ · merge(sparsify(θᵢ − base) · wᵢ); see the module docstring."""
    assert base is not None
    if not tensors:
        return base.clone()
    weights = [float(p["weight"]) for p in per_model]
    lam = float(params["lambda"])
    normalize = bool(params["normalize"])
    total_w = sum(weights)
    plain_scale = lam / total_w if normalize and abs(total_w) >= 1e-8 else lam
    if sparsifier is None and consensus is None and ctx.observe_delta is None and ctx.observe_task_sum is None:
        # Plain task arithmetic is linear: base + s·Σ wᵢ(θᵢ − base) = (1 − s·Σwᵢ)·base + Σ s·wᵢ·θᵢ.
        # One pass per model instead of three; rounding differs by ~1 ulp of θ.
        coefficients = [plain_scale * w for w in weights]
        out = torch.mul(base, 1 - sum(coefficients), out=ctx.empty_like(base))
        for t, c in zip(tensors, coefficients):
            out.add_(t, alpha=c)
        tensors.clear()
        return out

    acc: torch.Tensor | None = None
    task_sum: torch.Tensor | None = None
    deltas: list[torch.Tensor] = []
    for i, t in enumerate(tensors):
        # τᵢ in a scratch buffer: the inputs stay untouched (they may be mapped file pages).
        delta = torch.sub(t, base, out=ctx.empty_like(base))
        tensors[i] = None  # type: ignore[call-overload]  # drop our reference as we go
        del t
        if ctx.observe_delta is not None:
            ctx.observe_delta(i, delta)
        delta = _sparsify(delta, sparsifier, per_model[i], bool(params["rescale"]), ctx)
        if ctx.observe_task_sum is not None:
            task_sum = delta.clone() if task_sum is None else task_sum.add_(delta)
        if consensus is not None:
            deltas.append(delta)  # weighted slice by slice in _consensus_merge (in cache)
        elif acc is None:
            acc = delta.mul_(weights[i])
        else:
            acc.add_(delta, alpha=weights[i])
        del delta
    tensors.clear()
    if task_sum is not None:
        ctx.observe_task_sum(task_sum)  # type: ignore[misc]
        del task_sum
    if consensus is None:
        mixed, scale = acc, plain_scale
    else:
        mixed, scale = _consensus_merge(deltas, weights, consensus, normalize, ctx.empty_like(base)), lam
        deltas.clear()
    assert mixed is not None
    # base + scale·mixed in one pass, written over ``mixed``.
    return torch.add(base, mixed, alpha=scale, out=mixed)


def _consensus_merge(deltas: list[torch.Tensor], weights: list[float], consensus: str, normalize: bool,
                     out: torch.Tensor) -> torch.Tensor:
    """Sum of the weighted deltas (``deltas`` are unweighted) whose sign agrees with the elected one,
    slice by slice, written into ``out`` (shaped like a delta)."""
    flat = [d.reshape(-1) for d in deltas]
    out = out.reshape(-1)
    w = torch.tensor(weights, dtype=out.dtype, device=out.device).unsqueeze(1)
    method = "total" if consensus == "sum" else "frequency"
    for start in range(0, out.numel(), SLICE_ENTRIES):
        stop = min(out.numel(), start + SLICE_ENTRIES)
        stacked = torch.stack([f[start:stop] for f in flat]).mul_(w)  # (T, chunk), weighted
        mask = calculate_majority_sign_mask(stacked, method=method)
        kept = torch.sum(stacked.mul_(mask), dim=0, out=out[start:stop])
        if normalize:
            divisor = (w * mask).sum(dim=0)
            kept.div_(divisor.masked_fill_(divisor == 0, 1))
    return out.reshape(deltas[0].shape)


def _family(sparsifier: Sparsifier, consensus: Consensus):
    def func(base, tensors, params, per_model, ctx):
        return generalized_task_arithmetic(base, tensors, params, per_model, ctx,
                                           sparsifier=sparsifier, consensus=consensus)

    return func


def _params(*, normalize: bool, rescale: bool, sparsifier: Sparsifier) -> tuple[ParamSpec, ...]:
    ps = [
        ParamSpec("weight", "float", None, per_model=True, required=True,
                  help="how much of this model's task vector (θ − θ_base) is added"),
    ]
    if sparsifier is not None:  # plain task arithmetic keeps every entry: it takes no density
        ps.append(ParamSpec("density", "float", 1.0, min=0.0, max=1.0, min_exclusive=True, per_model=True,
                            help="fraction of the task vector's entries kept"))
    if sparsifier == "magnitude_outliers":
        ps.append(ParamSpec("gamma", "float", 0.01, min=0.0, max=1.0, per_model=True,
                            help="fraction of the largest-magnitude entries dropped as outliers"))
    if sparsifier == "della_magprune":
        ps.append(ParamSpec("epsilon", "float", 0.15, min=0.0, max=1.0, per_model=True,
                            help="keep probabilities range over density ± epsilon by magnitude rank"))
    ps += [
        ParamSpec("lambda", "float", 1.0, help="scale of the merged task vector"),
        ParamSpec("normalize", "bool", normalize, help="divide by the sum of the (kept) weights"),
        ParamSpec("rescale", "bool", rescale, help="rescale kept entries to preserve each task vector's L1 norm"),
        ParamSpec("int8_mask", "bool", False, help="accepted for mergekit compatibility (memory option; no effect here)"),
    ]
    return tuple(ps)


def _entry(name, label, url, sparsifier, consensus, normalize, rescale, description):
    return MergeMethod(
        name=name, label=label, paper_url=url, func=_family(sparsifier, consensus),
        parameters=_params(normalize=normalize, rescale=rescale, sparsifier=sparsifier),
        needs_base="required", deterministic=sparsifier not in ("random", "della_magprune"),
        description=description, observes=True, reads_inputs_only=True,
    )


METHODS = [
    _entry("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089", None, None, False, False,
           "base + λ·Σ wᵢ(θᵢ − θ_base)"),
    _entry("ties", "TIES", "https://arxiv.org/abs/2306.01708", "magnitude", "sum", True, False,
           "trim small task-vector entries, elect a sign, average the agreeing ones"),
    _entry("dare_ties", "DARE TIES", "https://arxiv.org/abs/2311.03099", "random", "sum", False, True,
           "random drop with rescale, then TIES sign election"),
    _entry("dare_linear", "Linear DARE", "https://arxiv.org/abs/2311.03099", "random", None, False, True,
           "random drop with rescale, then a weighted sum"),
    _entry("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795", "magnitude_outliers", None,
           False, False, "drop the smallest and the largest (outlier) entries, then a weighted sum"),
    _entry("breadcrumbs_ties", "Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795",
           "magnitude_outliers", "sum", False, False, "breadcrumbs sparsification with TIES sign election"),
    _entry("della", "DELLA", "https://arxiv.org/abs/2406.11617", "della_magprune", "sum", True, True,
           "magnitude-ranked random drop, then TIES sign election"),
    _entry("della_linear", "Linear DELLA", "https://arxiv.org/abs/2406.11617", "della_magprune", None, False, True,
           "magnitude-ranked random drop, then a weighted sum"),
]
