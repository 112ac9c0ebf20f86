"""MEMIT (Meng et al. 2023): many facts in one update spread over several MLP layers.

For each fact, a target residual z (the output of the last edited block at
the subject's last token) is optimised like ROME's v*. Then, layer by layer
(bottom up, each seeing the layers already updated):

* K = keys of every fact at that layer (averaged over the prefixed prompts), ``[in, n]``;
* R = (z − h) / (layers left), with h the current residual, ``[out, n]``;
* ΔW = R Kᵀ (λC + K Kᵀ)⁻¹, solved in float64 — stored as B = R, A = ((λC + KKᵀ)⁻¹K)ᵀ,
  so ΔW = B·A exactly and each layer's update has rank ≤ n (one per fact);
* or, with ``alpha`` (AlphaEdit, :mod:`editing.alphaedit`), ΔW = R Kᵀ P (K_pK_pᵀP + KKᵀP + λI)⁻¹
  with P that layer's null-space projector and K_p the keys of the session's earlier edits there.

Example::

    factors, info = compute_memit(model, tok, spec, requests, [2, 3, 4, 5], Cs, prefixes=..., apply_layer=fn)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch

from checkpoints.arch import ArchSpec
from checkpoints.errors import WeightsmithError
from checkpoints.perplexity import right_padded

from .alphaedit import AlphaEditHyperParams, alphaedit_factors
from .hooks import StopForward, capture_output, stop_after
from .request import EditRequest, pad_id, tokenise
from .rome import RomeHyperParams, compute_keys, compute_value, default_layer, prefixed_sequences

log = logging.getLogger(__name__)


@dataclass
class MemitHyperParams:
    """MEMIT settings. ``mom2_update_weight`` None means the key width (λ/d ≈ 1, as λ=15000 is for GPT-J's 16k)."""

    layers: list[int] | None = None
    mom2_update_weight: float | None = None
    clamp_norm_factor: float = 0.75  # of the residual's norm (authors: 0.75)
    v_steps: int = 25
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    early_stop: str = "loss"  # or "argmax" (MPES): see RomeHyperParams.early_stop
    v_optimizer: str = "adam"  # or "lbfgs": see RomeHyperParams.v_optimizer
    v_norm_penalty: float = 25.0
    # ENCORE's norm constraint (Gupta et al. 2025): + ridge·I in the solve, ridge relative to the mean
    # diagonal of λC, so each update also pays for its Frobenius norm and the edited weights grow less.
    norm_ridge: float = 0.0
    # Keep the keys of the session's earlier edits in the solve (λC + K_pK_pᵀ + KKᵀ), so a new fact
    # leaves what earlier facts wrote there in place (AlphaEdit's sequential term, without P).
    keep_edit_keys: bool = False
    # Leave the direction all edits share alone: ΔW ŵ = 0 for ŵ = C⁻¹k̄ (k̄ the mean of the session's
    # earlier edit keys at the layer). Every subject's key carries k̄, so each update's C⁻¹k answer has
    # a component along ŵ, and those add up linearly over a sequence (the others only as √n): on the
    # demo model that one direction is what breaks the model after about 700 edits
    # (bench/sequential_anatomy.py). Solved as an exact linear constraint, not a penalty.
    shared_key_guard: bool = False
    # Leave the N directions alone along which the session's cumulative update ΣΔ at the layer already
    # answers most strongly (its top right singular vectors): ΔW v = 0 for each. The collapse of a long
    # sequence is one such direction's gain growing linearly while the rest grow as √n; the session's
    # own ΣΔ measures that direction directly, where the mean edit key only estimates it.
    gain_guard: int = 0
    # Up to this many bottom-up passes: after each, the facts whose target is not yet the argmax after
    # their own prompt get another (1 = MEMIT as published).
    max_passes: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def layers_for(self, model_type: str, num_layers: int, layer: int | None = None) -> list[int]:
        """The edited layers: four around ``layer`` (two below it to one above), the layer ROME would edit
        for the fact (a trace's suggestion or the Layer field); else ``self.layers``; else four around
        ROME's default layer. One rule, so a layer typed in and the default give the same window (the
        demo's 2-5 around layer 4, whose statistics ``weightsmith demo-model`` prepares)."""
        if layer is None and self.layers:
            return list(self.layers)
        if layer is not None and not 0 <= int(layer) < num_layers:
            raise WeightsmithError(f"layer {layer} is out of range: the model has layers 0..{num_layers - 1}")
        centre = default_layer(model_type, num_layers) if layer is None else int(layer)
        top = min(num_layers - 1, centre + 1)
        return list(range(max(0, top - 3), top + 1))


@torch.no_grad()
def _residuals(model, tokenizer, spec: ArchSpec, requests: list[EditRequest], layer: int) -> torch.Tensor:
    """Output of block ``layer`` at each bare prompt's subject-last token: ``[n, hidden]``."""
    device = next(model.parameters()).device
    seqs = [tokenise(tokenizer, r.text, r.subject) for r in requests]
    ids, mask = right_padded([s.ids for s in seqs], pad_id(tokenizer))
    # Nothing above block ``layer`` is needed: stop there (it runs once per edited layer and pass).
    with capture_output(model, spec.block(layer)) as seen, stop_after(model, spec.block(layer)):
        try:
            model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        except StopForward:
            pass
    idx = torch.tensor([s.subject_last for s in seqs], device=device)
    return seen.value[torch.arange(len(seqs), device=device), idx].float()  # type: ignore[index]


def _layer_update(layer: int, K: torch.Tensor, R: torch.Tensor, *, hp: MemitHyperParams, Cs, alpha, projectors,
                  prior_keys, guarded) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B ``[out, n]``, A ``[n, in]``) of one layer's update for keys K ``[in, n]`` and residuals R;
    ``guarded[layer]`` (``[in, g]``), if given, holds directions the update must be blind to."""
    if alpha is not None:
        return alphaedit_factors(R, K, projectors[layer], (prior_keys or {}).get(layer), l2=alpha.l2,
                                 exact=alpha.exact)
    C = Cs[layer].double().to(K.device)
    lam = hp.mom2_update_weight if hp.mom2_update_weight is not None else float(C.shape[0])
    K64 = K.double()
    M = lam * C + K64 @ K64.T
    if hp.norm_ridge:
        M = M + (hp.norm_ridge * lam * float(C.diagonal().mean())) * torch.eye(M.shape[0], dtype=M.dtype,
                                                                               device=M.device)
    Kp = (prior_keys or {}).get(layer)
    has_prior = Kp is not None and bool(Kp.numel())
    if hp.keep_edit_keys and has_prior:
        Kp64 = Kp.double().to(M.device)
        M = M + Kp64 @ Kp64.T
    adj = torch.linalg.solve(M, K64)  # [in, n]
    W = (guarded or {}).get(layer)
    if W is not None and W.numel():
        adj = _without_directions(adj, M, W.double().to(M.device))
    return R.float().contiguous(), adj.T.float().contiguous()


def shared_key_direction(C: torch.Tensor, Kp: torch.Tensor) -> torch.Tensor:
    """ŵ = C⁻¹k̄ / ‖C⁻¹k̄‖ ``[in]`` (float64) for the mean k̄ of the earlier edit keys ``Kp`` ``[in, m]``."""
    w = torch.linalg.solve(C.double(), Kp.double().to(C.device).mean(dim=1))
    return w / w.norm()


def top_gain_directions(B: torch.Tensor, A: torch.Tensor, n: int) -> torch.Tensor:
    """The top ``n`` right singular vectors ``[in, n]`` (float64) of ΣΔ = B·A (B ``[out, m]``, A ``[m, in]``).

    From the ``[out, out]`` Gram matrix ΣΔΣΔᵀ: v = ΣΔᵀu / σ, one small eigendecomposition instead of an
    SVD of the ``[out, in]`` matrix."""
    D = B.double() @ A.double()
    _, U = torch.linalg.eigh(D @ D.T)
    top = U[:, -n:].flip(1)  # eigh sorts ascending
    V = D.T @ top
    return V / V.norm(dim=0).clamp_min(1e-300)


def guard_directions(hp: MemitHyperParams, C: torch.Tensor | None, prior_keys: torch.Tensor | None,
                     cumulative: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
    """The directions ``[in, g]`` (orthonormal, float64) one layer's update must be blind to under ``hp``'s
    guards, from the layer's statistics C, the earlier edits' keys ``[in, m]`` and the session's
    cumulative update there as factors (B, A); None when no guard applies yet."""
    cols = []
    if hp.shared_key_guard and C is not None and prior_keys is not None and prior_keys.numel():
        cols.append(shared_key_direction(C, prior_keys)[:, None])
    if hp.gain_guard and cumulative is not None:
        B, A = cumulative
        cols.append(top_gain_directions(B, A, min(hp.gain_guard, B.shape[1])).to(cols[0].device if cols else A.device))
    if not cols:
        return None
    # Orthonormal, dropping a direction the others already span (the two guards can nearly agree),
    # so the constraint's small system stays well conditioned.
    Q, Rr = torch.linalg.qr(torch.cat(cols, dim=1))
    keep = Rr.diagonal().abs() > 1e-6
    return Q[:, keep]


def _without_directions(adj: torch.Tensor, M: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The solution M⁻¹K of MEMIT's normal equations under the constraint WᵀX = 0 (so ΔW W = 0).

    Minimising ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ) over ΔW = R Xᵀ with WᵀX = 0 gives (Lagrange multipliers)
    X = M⁻¹K − M⁻¹W (WᵀM⁻¹W)⁻¹ WᵀM⁻¹K: the unconstrained answer minus its part in the span of M⁻¹W."""
    MW = torch.linalg.solve(M, W)  # [in, g]
    return adj - MW @ torch.linalg.solve(W.T @ MW, W.T @ adj)


def _layer_pass(model, tokenizer, spec: ArchSpec, requests: list[EditRequest], Z: torch.Tensor, layers: list[int],
                prefixes: list[str], solve, apply_layer, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
                ) -> dict[int, torch.Tensor]:
    """One bottom-up pass over ``layers`` towards targets Z; appends to ``factors``; returns K by layer."""
    top = layers[-1]
    keys: dict[int, torch.Tensor] = {}
    seqs_per_req = [prefixed_sequences(tokenizer, prefixes, r) for r in requests]
    for li, layer in enumerate(layers):
        K = torch.stack([compute_keys(model, tokenizer, spec, layer, s).mean(0) for s in seqs_per_req]).T  # [in, n]
        H = _residuals(model, tokenizer, spec, requests, top)  # [n, hidden]
        R = ((Z - H) / (len(layers) - li)).T.double()  # [out, n]
        B, A = solve(layer, K, R)
        keys[layer] = K
        module = spec.module("mlp_out", layer)
        apply_layer(module, B, A)
        if module in factors:  # a further pass: ΔW = B₁A₁ + B₂A₂ = [B₁ B₂][A₁; A₂]
            B0, A0 = factors[module]
            B, A = torch.cat([B0, B], dim=1), torch.cat([A0, A], dim=0)
        factors[module] = (B, A)
        log.info("MEMIT layer %d: residual norm %.3f", layer, float(R.norm()))
    return keys


@torch.no_grad()
def target_is_argmax(model, tokenizer, request: EditRequest) -> bool:
    """Is every token of the new target the most probable one after the bare prompt (teacher-forced)?"""
    from .request import prompt_ids, target_ids

    device = next(model.parameters()).device
    pi, ti = prompt_ids(tokenizer, request.text), target_ids(tokenizer, request.target)
    logits = model(input_ids=torch.tensor([pi + ti[:-1]], device=device), use_cache=False).logits[0, len(pi) - 1:]
    return bool((logits.argmax(-1) == torch.tensor(ti, device=device)).all())


def value_hparams(hp: MemitHyperParams, rome: RomeHyperParams | None = None) -> RomeHyperParams:
    """The settings of MEMIT's target optimisation (v* at the top edited layer): ``rome``'s (prefixes,
    prompts in the loss, its early-stop loss) with MEMIT's own optimiser settings on top."""
    return replace(rome or RomeHyperParams(), v_steps=hp.v_steps, v_lr=hp.v_lr, kl_factor=hp.kl_factor,
                   v_weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor,
                   early_stop=hp.early_stop, v_optimizer=hp.v_optimizer, v_norm_penalty=hp.v_norm_penalty)


def compute_memit(model, tokenizer, spec: ArchSpec, requests: list[EditRequest], layers: list[int],
                  Cs: dict[int, torch.Tensor], *, prefixes: list[str], hparams: MemitHyperParams | None = None,
                  rome: RomeHyperParams | None = None,
                  apply_layer: Callable[[str, torch.Tensor, torch.Tensor], None],
                  progress: Callable[[float, str], None] | None = None,
                  alpha: AlphaEditHyperParams | None = None, projectors: dict[int, torch.Tensor] | None = None,
                  prior_keys: dict[int, torch.Tensor | None] | None = None,
                  guarded: dict[int, torch.Tensor] | None = None,
                  ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Compute MEMIT factors for ``requests``; ``apply_layer(module, B, A)`` applies each layer as it goes.

    With ``alpha``, the AlphaEdit update per layer from ``projectors[layer]`` and
    ``prior_keys[layer]`` (``[in, m]`` or None); ``Cs`` is then not used. Without it, given
    ``prior_keys`` enter MEMIT's solve with ``hparams.keep_edit_keys``; ``guarded[layer]`` ``[in, g]``
    (from :func:`guard_directions`) are directions each layer's update leaves alone.
    Returns ``({module: (B [out, n], A [n, in])}, info)``; ``info["keys"][layer]`` is K ``[in, n]``.
    """
    hp = hparams or MemitHyperParams()
    vp = value_hparams(hp, rome)
    t0 = time.time()
    top = layers[-1]
    zs, logs = [], []
    for i, req in enumerate(requests):
        if progress:
            progress(i / max(1, len(requests)), f"target residual for fact {i + 1}/{len(requests)}")
        delta, h0, info = compute_value(model, tokenizer, spec, req, top, prefixes, vp, module=spec.block(top))
        zs.append(h0 + delta)
        logs.append(info)
    Z = torch.stack(zs)  # [n, hidden]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    solve = partial(_layer_update, hp=hp, Cs=Cs, alpha=alpha, projectors=projectors, prior_keys=prior_keys,
                    guarded=guarded)
    keys = _layer_pass(model, tokenizer, spec, requests, Z, layers, prefixes, solve, apply_layer, factors)
    passes = 1
    left = [round(float((Z - _residuals(model, tokenizer, spec, requests, top)).norm()), 4)]  # ‖z − h‖ per pass
    # Further passes only for facts whose target is not yet the most probable continuation of their
    # own prompt: a larger λ then costs a second, smaller update for the hard facts instead of a
    # weaker update for every fact (each pass adds one rank per fact to each layer's factors).
    while passes < hp.max_passes:
        pending = [i for i, r in enumerate(requests) if not target_is_argmax(model, tokenizer, r)]
        if not pending:
            break
        _layer_pass(model, tokenizer, spec, [requests[i] for i in pending], Z[pending], layers, prefixes, solve,
                    apply_layer, factors)
        passes += 1
        left.append(round(float((Z - _residuals(model, tokenizer, spec, requests, top)).norm()), 4))
    info = {"seconds": round(time.time() - t0, 3), "facts": len(requests), "layers": layers,
            "steps": [lg["steps"] for lg in logs], "target_prob_before": [lg["target_prob_before"] for lg in logs],
            "keys": keys, "passes": passes, "residual_left": left}
    return factors, info
