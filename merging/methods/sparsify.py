"""Sparsification of one task vector, with mergekit's semantics.

* ``magnitude`` (TIES): keep the ``max(1, int(density·n))`` largest |values|;
* ``magnitude_outliers`` (breadcrumbs): drop the ``int(gamma·n)`` largest and
  enough of the smallest to keep ``int(density·n)``;
* ``bernoulli`` (DARE): keep each value with probability ``density``;
* ``della_magprune`` (DELLA): keep with a probability that grows with the
  value's magnitude rank in its row, from ``density − ε`` to ``density + ε``.

``rescale`` multiplies the kept values so the L1 norm is unchanged (mergekit's
``rescale`` is an L1-norm match, not PEFT's 1/density).

Why not ``torch.argsort``: mergekit sorts every tensor (O(n log n), 4 s for a
28M-entry embedding here). A rank range only needs two order statistics, which
:func:`select` finds by bracketing them with a small sample and selecting
inside the bracket: a few linear passes. Only when equal values straddle a cut
(common in bf16, where many |τ| coincide) does the sort decide which are kept;
then the same ``torch.argsort`` call as mergekit's is made, so the result is
identical, not just equivalent.
"""

from __future__ import annotations

import torch

from checkpoints.errors import WeightsmithError

# Below this size torch.kthvalue on the whole tensor is as fast as anything cleverer.
_DIRECT_SELECT = 1 << 16


def select(values: torch.Tensor, rank: int) -> tuple[torch.Tensor, int, int]:
    """The value at 0-based ascending ``rank`` of 1-D ``values``, with how many entries
    are smaller than it and how many equal it (to see whether a cut splits a group of ties)."""
    n = values.numel()
    if n > _DIRECT_SELECT:
        # Bracket the answer with a strided sample, then select among the few
        # entries inside the bracket. A bad bracket only costs the fallback below.
        m = max(1024, min(1 << 16, n // 16))
        stride = max(1, n // m)
        sample = values[::stride].sort().values
        m = sample.numel()
        pos = rank / max(1, n - 1) * (m - 1)
        margin = 4 * int(m**0.5) + 8
        lo = sample[max(0, int(pos) - margin)]
        hi = sample[min(m - 1, int(pos) + margin + 1)]
        below = int((values < lo).sum())
        candidates = values[(values >= lo) & (values <= hi)]
        if below <= rank < below + candidates.numel():
            v = torch.kthvalue(candidates, rank - below + 1).values
            return v, below + int((candidates < v).sum()), int((candidates == v).sum())
    v = torch.kthvalue(values, rank + 1).values
    return v, int((values < v).sum()), int((values == v).sum())


def kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The value of 0-based ascending ``rank`` in 1-D ``values`` (what ``kthvalue(rank + 1)`` returns)."""
    return select(values, rank)[0]


def rank_range_mask(values: torch.Tensor, lo: int, hi: int, *, descending: bool = False,
                    exact_ties: bool = True) -> torch.Tensor:
    """Boolean mask of the entries of ``values`` at positions ``[lo, hi)`` of its sorted order.

    The order is what mergekit uses: ``torch.argsort(values.reshape(-1), descending=...)``.
    When no group of equal values straddles a cut the selection is found by
    order statistics (linear time); when one does, which of the equal values
    the sort puts first is an artefact of its algorithm, so the same
    ``torch.argsort`` call is made to reproduce it exactly. With ``exact_ties=False``
    tied entries are taken in index order instead (linear time, same count kept,
    differs from mergekit only at those ties).
    """
    flat = values.reshape(-1)
    n = flat.numel()
    lo, hi = max(0, lo), min(n, hi)
    if hi <= lo:
        return torch.zeros_like(flat, dtype=torch.bool).reshape(values.shape)
    if lo == 0 and hi == n:
        return torch.ones_like(flat, dtype=torch.bool).reshape(values.shape)
    # In ascending terms the selection is ranks [alo, ahi).
    alo, ahi = (n - hi, n - lo) if descending else (lo, hi)
    mask: torch.Tensor | None = None
    if alo > 0:
        a, below, equal = select(flat, alo)
        if below < alo < below + equal:
            if exact_ties:
                return _by_sort(flat, lo, hi, descending).reshape(values.shape)
            mask = flat > a
            _keep_ties(flat, mask, a, alo - below, from_end=True)
        else:
            mask = flat >= a
    if ahi < n:
        b, below, equal = select(flat, ahi - 1)
        if below < ahi < below + equal:
            if exact_ties:
                return _by_sort(flat, lo, hi, descending).reshape(values.shape)
            upper = flat < b
            _keep_ties(flat, upper, b, ahi - below, from_end=False)
        else:
            upper = flat <= b
        mask = upper if mask is None else mask.logical_and_(upper)
    assert mask is not None
    return mask.reshape(values.shape)


def _keep_ties(flat: torch.Tensor, mask: torch.Tensor, cut: torch.Tensor, skip_or_take: int, *, from_end: bool) -> None:
    """Add to ``mask`` the entries equal to ``cut``: all but the first ``skip_or_take`` (by index)
    when ``from_end``, else only the first ``skip_or_take``."""
    equal = (flat == cut).nonzero().reshape(-1)
    chosen = equal[skip_or_take:] if from_end else equal[:skip_or_take]
    mask[chosen] = True


def _by_sort(flat: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    order = torch.argsort(flat, descending=descending)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[lo:hi]] = True
    return mask


def rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """``tensor * mask``; with ``rescale`` the result's L1 norm is matched to ``tensor``'s."""
    before = tensor.abs().sum() if rescale else None
    masked = tensor.mul_(mask)
    if not rescale:
        return masked
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked.mul_(before / after)


def magnitude(tensor: torch.Tensor, density: float, *, rescale: bool = False, exact_ties: bool = True) -> torch.Tensor:
    """Keep the ``max(1, int(density·n))`` entries of largest magnitude (in place)."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    if density <= 0 or n == 0:
        return tensor.zero_()
    k = max(1, int(density * n))
    mask = rank_range_mask(tensor.abs(), 0, k, descending=True, exact_ties=exact_ties)
    return rescaled(tensor, mask, rescale)


def magnitude_outliers(tensor: torch.Tensor, density: float, gamma: float, *, rescale: bool = False,
                       exact_ties: bool = True) -> torch.Tensor:
    """Breadcrumbs: drop the ``int(gamma·n)`` largest and the smallest, keeping ``int(density·n)`` (in place)."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    mask = rank_range_mask(tensor.abs(), bottom, bottom + keep, exact_ties=exact_ties)
    return rescaled(tensor, mask, rescale)


def bernoulli(tensor: torch.Tensor, density: float, generator: torch.Generator, *, rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (seeded), in place."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return rescaled(tensor, mask, rescale)


def della_magprune(tensor: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
                   *, rescale: bool = True) -> torch.Tensor:
    """DELLA: keep probability rises linearly with the magnitude rank within each row."""
    if density >= 1:
        return tensor
    if density <= 0:
        return tensor.zero_()
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise WeightsmithError(
            f"della: density ± epsilon must lie in (0, 1), got density {density:g} and epsilon {epsilon:g}"
        )
    shape = tensor.shape
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    rank_norm = ((ranks - lo) / span).clamp(0, 1)
    del ranks
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    mask = torch.bernoulli(probs, generator=generator)
    return rescaled(rows, mask, rescale).reshape(shape)
