"""AlphaEdit (Fang et al., ICLR 2025): updates projected onto the null space of preserved keys.

The preserved knowledge of a layer is described by the same second moment
C = E[k kᵀ] that ROME uses (:mod:`editing.stats`; the authors also use the
normalised moment, not the sum). Its eigenvectors with eigenvalues below
``nullspace_threshold`` span directions ordinary text hardly uses;
P = Û Ûᵀ projects onto them, so for a key k₀ that ordinary text does use,
P k₀ ≈ 0, and an update of the form Δ = Δ̃ P leaves W k₀ unchanged.

The update for new keys K₁ ``[in, n]`` with residuals R = V₁ − W K₁ ``[out, n]``
and the keys K_p of earlier edits of the same layer (sequential editing) is

    Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + λ I)⁻¹          (λ = ``l2``; authors: ``L2`` = 10)

which the authors solve as Δᵀ = (P (K₁K₁ᵀ + K_pK_pᵀ) + λI)⁻¹ P K₁ Rᵀ. We keep
it factored: X = (P S + λI)⁻¹ P K₁ ``[in, n]``, ΔW = B A with B = R, A = Xᵀ
(rank ≤ n, so one key gives a rank-one update and the LoRA export still
holds). Because (P S + λI) X = P K₁, λX = P(K₁ − S X) lies in P's range, so
A k₀ = A P k₀ = 0 for every preserved key: exactly, not only approximately.

With ``exact=True``, B = R (A K₁)⁻¹ instead, so that ΔW K₁ = R holds exactly
as in ROME (λ then only shapes the direction, not the size).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from checkpoints.errors import WeightsmithError

from .nullspace import nullspace_projector  # noqa: F401  (part of this module's API)

log = logging.getLogger(__name__)


@dataclass
class AlphaEditHyperParams:
    """AlphaEdit settings (authors' values for GPT-2 XL, GPT-J and Llama3-8B: threshold 2e-2, L2 10)."""

    # Eigenvalues of C = E[kkᵀ] (normalised by the token count, as the authors' statistics are)
    # below this span the null space P projects onto. Absolute, so it depends on the model's
    # activation scale: the number of kept directions is in the edit's info ("nullspace_dim").
    nullspace_threshold: float = 2e-2
    l2: float = 10.0  # λ in (P S + λI)⁻¹; authors' "L2"
    # Rescale B so that ΔW K₁ = R exactly (ROME-like) instead of the authors' ridge solution,
    # which reaches only ‖PK‖²/(‖PK‖² + λ) of a lone key's residual.
    exact: bool = False


def alphaedit_factors(R: torch.Tensor, K1: torch.Tensor, P: torch.Tensor, Kp: torch.Tensor | None = None, *,
                      l2: float = 10.0, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B ``[out, n]``, A ``[n, in]``) of the AlphaEdit update, ΔW = B A, solved in float64.

    ``R`` ``[out, n]`` residuals, ``K1`` ``[in, n]`` new keys, ``P`` ``[in, in]`` the projector,
    ``Kp`` ``[in, m]`` keys of earlier edits of this layer (or None).
    """
    K64 = K1.double()
    P64 = P.double().to(K64.device)
    n, d = K64.shape[1], K64.shape[0]
    K = K64 if Kp is None or not Kp.numel() else torch.cat([K64, Kp.double().to(K64.device)], dim=1)  # [in, r]
    if l2 > 0 and K.shape[1] < d:
        # Woodbury: (λI + (PK)Kᵀ)⁻¹ = (I − PK (λI + KᵀPK)⁻¹ Kᵀ)/λ, an r×r solve instead of d×d
        # (d = 1536 on the demo model: ~0.1 s instead of several seconds per edit).
        Q = P64 @ K  # [in, r]
        G = K.T @ Q  # [r, r] = KᵀPK
        eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        X = (Q[:, :n] - Q @ torch.linalg.solve(l2 * eye + G, G[:, :n])) / l2  # [in, n]
    else:
        M = P64 @ (K @ K.T) + l2 * torch.eye(d, dtype=K.dtype, device=K.device)
        X = torch.linalg.solve(M, P64 @ K64)  # [in, n]
    A = X.T  # [n, in]
    R64 = R.double()
    if exact:
        G = A @ K64  # [n, n]: what ΔW K₁ is in units of R
        if not torch.isfinite(G).all() or torch.linalg.matrix_rank(G) < G.shape[0]:
            raise WeightsmithError("AlphaEdit: the new keys have no component in the null space: "
                                   "raise nullspace_threshold or edit another layer")
        B = torch.linalg.solve(G.T, R64.T).T  # B G = R
    else:
        B = R64
    return B.float().contiguous(), A.float().contiguous()


def compute_alphaedit(model, tokenizer, spec, requests: list, P: torch.Tensor, *, layer: int, prefixes: list[str],
                      hparams, alpha: AlphaEditHyperParams, prior_keys: torch.Tensor | None = None,
                      progress=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """AlphaEdit at one layer (ROME's key and value, the projected update) for one or more requests.

    Each request's key is k* (the mean over the prefixed prompts, as the authors' keys) and
    its residual v* − W k* (v* as in r-ROME, :class:`~editing.rome.RomeHyperParams` ``value_from``).
    Returns ``(B [out, n], A [n, in], K1 [in, n], info)``.
    """
    from dataclasses import replace

    from .rome import compute_key_value

    hp = replace(hparams, update_at="mean")
    kvs = []
    for i, req in enumerate(requests):
        sub = None
        if progress is not None:
            def sub(frac: float, desc: str, i=i) -> None:
                progress((i + frac) / len(requests), desc)
        kvs.append(compute_key_value(model, tokenizer, spec, req, layer=layer, prefixes=prefixes, hparams=hp,
                                     progress=sub))
    W = kvs[0].W
    K1 = torch.stack([kv.k_star for kv in kvs], dim=1)  # [in, n]
    R = torch.stack([kv.v - W @ kv.k_star for kv in kvs], dim=1)  # [out, n]
    B, A = alphaedit_factors(R, K1, P.to(K1.device), prior_keys, l2=alpha.l2, exact=alpha.exact)
    reached = B.double() @ (A.double() @ K1.double())
    info = dict(kvs[0].info) if len(kvs) == 1 else {
        "steps": [kv.info["steps"] for kv in kvs], "target_prob_before": [kv.info["target_prob_before"] for kv in kvs]}
    info.update({"nullspace_threshold": alpha.nullspace_threshold, "l2": alpha.l2, "exact": alpha.exact,
                 "prior_keys": 0 if prior_keys is None else int(prior_keys.shape[1]),
                 # 0 = ΔW K₁ = R exactly; the ridge term λ leaves part of the residual unreached
                 "residual_unreached": round(float((reached - R.double()).norm() / R.double().norm().clamp_min(1e-30)), 5)})
    return B, A, K1, info
