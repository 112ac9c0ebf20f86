"""Data-free SVD merges of 2-D weights: TSV-M, Iso-C and Iso-CTS.

Each works on the task matrices Δᵢ = θᵢ − θ_base of one 2-D weight and returns
θ_base + λ·Δ (λ is the papers' scaling coefficient α, swept over 0…3 there).
Every other tensor (norms, biases) takes the mean of its task vectors, as the
authors' code does. With one model and λ = 1, TSV-M returns that model.

* **TSV-M** (Gargiulo et al., CVPR 2025, arXiv 2412.00081): keep the top
  k = ⌊r/T⌋ singular triplets of each Δᵢ (r = min(rows, cols)), concatenate the
  Uᵢ, Σᵢ and Vᵢ, replace the concatenated U and V by their nearest orthogonal
  matrices (U = PSQᵀ → PQᵀ), and return U⊥ Σ V⊥ᵀ. Where the tasks' singular
  vectors are already orthogonal this is task arithmetic of the truncated Δᵢ.
* **Iso-C** (Marczak et al., ICML 2025, arXiv 2502.04959): Σᵢ Δᵢ = UΣVᵀ →
  σ̄·UVᵀ, every singular value replaced by their mean (an isotropic spectrum).
* **Iso-CTS** (same paper): the top directions of Σᵢ Δᵢ span a common
  subspace (``common_space_fraction`` of r, adjusted so the rest divides by T);
  each Δᵢ, with that subspace projected out of its columns, contributes its
  top (r − k_c)/T directions; the concatenation is orthogonalised as in TSV-M
  and given the mean of all the kept singular values.

Iso-CTS projects on the output side of the weight (the columns of an
``[out, in]`` matrix). ``TensorContext.transposed`` says when a weight is stored
``[in, out]`` (GPT-2's Conv1D), and the projection is then taken on that side.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, ParamSpec


def nearest_orthogonal(x: torch.Tensor) -> torch.Tensor:
    """P·Qᵀ for x = P·S·Qᵀ: the matrix with orthonormal columns (or rows) closest to ``x``."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def _mean(deltas: list[torch.Tensor]) -> torch.Tensor:
    out = deltas[0].clone()
    for d in deltas[1:]:
        out.add_(d)
    return out.div_(len(deltas))


def _stack_triplets(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
    """Concatenate (U, S, Vᴴ) blocks, orthogonalise U and Vᴴ, and return U⊥·diag(S)·V⊥ᴴ (shaped like ``like``)."""
    u = torch.cat([p[0] for p in parts], dim=1)
    s = torch.cat([p[1] for p in parts])
    vh = torch.cat([p[2] for p in parts], dim=0)
    if s.numel() == 0:
        return torch.zeros_like(like)
    return (nearest_orthogonal(u) * s) @ nearest_orthogonal(vh)


def tsv_merge(deltas: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M of 2-D task matrices (see the module docstring)."""
    rank = min(deltas[0].shape)
    k = int(rank * (1 / len(deltas)))  # the authors' ⌊r·(1/T)⌋
    parts = []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        parts.append((u[:, :k], s[:k], vh[:k]))
    return _stack_triplets(parts, deltas[0])


def iso_c_merge(deltas: list[torch.Tensor]) -> torch.Tensor:
    """σ̄·U·Vᵀ of Σᵢ Δᵢ = U·Σ·Vᵀ."""
    u, s, vh = torch.linalg.svd(torch.stack(deltas).sum(dim=0), full_matrices=False)
    return (u @ vh).mul_(s.mean())


def common_space_size(rank: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(k_c, per-task dims) as the authors size them: k_c = ⌊r·fraction⌋, then moved so that
    r − k_c is a multiple of T (Python's round, as theirs), never past r."""
    common = int(rank * fraction)
    specific = round((rank - common) / tasks) * tasks
    if specific > rank:  # round() went up past the whole rank (fraction near 0)
        specific -= tasks
    return rank - specific, specific // tasks


def iso_cts_merge(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Iso-CTS of 2-D task matrices stored [out, in] (see the module docstring)."""
    rank = min(deltas[0].shape)
    common, per_task = common_space_size(rank, len(deltas), fraction)
    u, s, vh = torch.linalg.svd(torch.stack(deltas).sum(dim=0), full_matrices=False)
    uc, sc, vhc = u[:, :common], s[:common], vh[:common]
    parts = []
    for d in deltas:
        specific = d - uc @ (uc.T @ d)  # Δᵢ without its part in the common subspace
        ui, si, vhi = torch.linalg.svd(specific, full_matrices=False)
        parts.append((ui[:, :per_task], si[:per_task], vhi[:per_task]))
    parts.append((uc, sc, vhc))  # after the task-specific blocks, as the authors order them
    kept = torch.cat([p[1] for p in parts])
    flat = _stack_triplets([(p[0], torch.ones_like(p[1]), p[2]) for p in parts], deltas[0])
    return flat.mul_(kept.mean())


def _svd_method(merge_2d):
    def func(base, tensors, params, per_model, ctx):
        deltas = [t - base for t in tensors]  # the inputs stay untouched
        tensors.clear()
        if base.dim() != 2:
            merged = _mean(deltas)
        elif ctx.transposed:  # stored [in, out]: merge the [out, in] matrices, then store back
            merged = merge_2d([d.T for d in deltas], params).T
        else:
            merged = merge_2d(deltas, params)
        return merged.mul_(float(params["lambda"])).add_(base)

    return func


_LAMBDA = ParamSpec("lambda", "float", 1.0, help="scale of the merged task matrix (the papers' α)")

METHODS = [
    MergeMethod(
        name="tsv_m", label="TSV-M (Task Singular Vectors)", paper_url="https://arxiv.org/abs/2412.00081",
        func=_svd_method(lambda deltas, params: tsv_merge(deltas)), parameters=(_LAMBDA,),
        needs_base="required", min_models=1, task_vector=True, reads_inputs_only=True,
        description="each task's top 1/T singular vectors, decorrelated (orthogonalised) and summed; "
                    "other tensors: mean task vector",
    ),
    MergeMethod(
        name="iso_c", label="Iso-C (isotropic, common subspace)", paper_url="https://arxiv.org/abs/2502.04959",
        func=_svd_method(lambda deltas, params: iso_c_merge(deltas)), parameters=(_LAMBDA,),
        needs_base="required", min_models=1, task_vector=True, reads_inputs_only=True,
        description="task arithmetic with a flat spectrum: every singular value of Σ τ set to their mean",
    ),
    MergeMethod(
        name="iso_cts", label="Iso-CTS (isotropic, common and task-specific)",
        paper_url="https://arxiv.org/abs/2502.04959",
        func=_svd_method(lambda deltas, params: iso_cts_merge(deltas, float(params["common_space_fraction"]))),
        parameters=(
            _LAMBDA,
            ParamSpec("common_space_fraction", "float", 0.8, min=0.0, max=1.0,
                      help="share of the rank kept from Σ τ; the rest goes to each task's own directions"),
        ),
        needs_base="required", min_models=1, task_vector=True, reads_inputs_only=True,
        description="Iso-C whose weakest common directions are replaced by each task's own, then flattened",
    ),
]
