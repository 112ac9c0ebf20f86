"""Sparsification of one task vector, with mergekit's semantics.

* ``magnitude`` (TIES): keep the ``max(1, int(density·n))`` largest |values|;
* ``magnitude_outliers`` (breadcrumbs): drop the ``int(gamma·n)`` largest and
  enough of the smallest to keep ``int(density·n)``;
* ``bernoulli`` (DARE): keep each value with probability ``density``;
* ``della_magprune`` (DELLA): keep with a probability that grows with the
  value's magnitude rank in its row, from ``density − ε`` to ``density + ε``.

``rescale`` multiplies the kept values so the L1 norm is unchanged (mergekit's
``rescale`` is an L1-norm match, not PEFT's 1/density).

Why not ``torch.argsort``: mergekit sorts every tensor (O(n log n), 2-4 s for a
28M-entry embedding here). A rank range only needs two order statistics, which
:func:`select` finds in linear time. Only when equal values straddle a cut
(common: float32 rounding of θ − θ_base and bf16 both make many |τ| coincide)
does the sort decide which of them are kept; :func:`sorted_prefix_mask` then
replays the part of torch's sort that decides it, so the result is identical to
mergekit's, not just equivalent (``torch.argsort`` itself only where the replay
does not apply).
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch

from checkpoints.errors import WeightsmithError

log = logging.getLogger(__name__)

# Below this size torch.kthvalue on the whole tensor is as fast as anything cleverer.
_DIRECT_SELECT = 1 << 16


def select(values: torch.Tensor, rank: int) -> tuple[torch.Tensor, int, int]:
    """The value at 0-based ascending ``rank`` of 1-D ``values``, with how many entries
    are smaller than it and how many equal it (to see whether a cut splits a group of ties).

    On the CPU this is ``numpy.partition`` (introselect, SIMD where numpy has it: about
    1 ns an entry here, ten times less than bracketing and ``torch.kthvalue``) and two counts.
    """
    n = values.numel()
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64) and 0 <= rank < n:
        part = np.partition(values.reshape(-1).numpy(), rank)
        v = part[rank]
        if not np.isnan(v):
            # Entries before ``rank`` are <= v, entries after it >= v.
            below = int(np.count_nonzero(part[:rank] < v))
            equal = rank - below + 1 + int(np.count_nonzero(part[rank + 1:] == v))
            return torch.from_numpy(np.array(v)), below, equal
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
                    exact_ties: bool = True, overwrite: bool = False) -> torch.Tensor:
    """Boolean mask of the entries of ``values`` at positions ``[lo, hi)`` of its sorted order.

    The order is what mergekit uses: ``torch.argsort(values.reshape(-1), descending=...)``.
    When no group of equal values straddles a cut the selection is found by
    order statistics (linear time). When one does, which of the equal values
    the sort puts first is an artefact of its algorithm; :func:`sorted_prefix_mask`
    reproduces it exactly by replaying only the part of that sort that decides
    the cut. With ``exact_ties=False`` tied entries are taken in index order
    instead (same count kept, differs from mergekit only at those ties).
    ``overwrite=True`` lets this function use ``values`` as scratch space.
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
    # A cut is where the selection ends in the sort's own direction: prefix(hi) minus prefix(lo).
    straddled: list[tuple[int, torch.Tensor]] = []  # sort positions whose cut splits equal values, and the value
    mask: torch.Tensor | None = None
    if alo > 0:
        a, below, equal = select(flat, alo)
        if below < alo < below + equal:
            if exact_ties:
                straddled.append((hi if descending else lo, a))
            else:
                mask = flat > a
                _keep_ties(flat, mask, a, alo - below, from_end=True)
        else:
            mask = flat >= a
    upper: torch.Tensor | None = None
    if ahi < n:
        b, below, equal = select(flat, ahi - 1)
        if below < ahi < below + equal:
            if exact_ties:
                straddled.append((lo if descending else hi, b))
            else:
                upper = flat < b
                _keep_ties(flat, upper, b, ahi - below, from_end=False)
        else:
            upper = flat <= b
    if upper is not None:
        mask = upper if mask is None else mask.logical_and_(upper)
    for position, tie in straddled:
        # positions [0, hi) of the sort are kept, positions [0, lo) are not
        keep = position == hi
        scratch = overwrite and position == straddled[-1][0]
        prefix = _sort_prefix(flat, position, descending, overwrite=scratch, tie_value=tie)
        if not keep:
            prefix.logical_not_()
        mask = prefix if mask is None else mask.logical_and_(prefix)
    assert mask is not None
    return mask.reshape(values.shape)


def _keep_ties(flat: torch.Tensor, mask: torch.Tensor, cut: torch.Tensor, skip_or_take: int, *, from_end: bool) -> None:
    """Add to ``mask`` the entries equal to ``cut``: all but the first ``skip_or_take`` (by index)
    when ``from_end``, else only the first ``skip_or_take``."""
    equal = (flat == cut).nonzero().reshape(-1)
    chosen = equal[skip_or_take:] if from_end else equal[:skip_or_take]
    mask[chosen] = True


def _sort_prefix(flat: torch.Tensor, k: int, descending: bool, *, overwrite: bool,
                 tie_value: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of the first ``k`` entries of ``torch.argsort(flat, descending=...)``."""
    mask = sorted_prefix_mask(flat, k, descending=descending, overwrite=overwrite, tie_value=tie_value)
    if mask is None:  # a case the replay does not model: make the sort itself
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.argsort(flat, descending=descending)[:k]] = True
    return mask


# libstdc++'s std::sort (introsort) stops partitioning segments of this many
# entries and leaves them to one final insertion sort (``_S_threshold``).
_SEGMENT = 16


def sorted_prefix_mask(values: torch.Tensor, k: int, *, descending: bool, overwrite: bool = False,
                       tie_value: float | torch.Tensor | None = None) -> torch.Tensor | None:
    """Which entries land in positions ``[0, k)`` of ``torch.argsort(values.reshape(-1), descending=...)``
    on the CPU: a 1-D boolean mask over ``values.reshape(-1)``, found in (expected) linear time;
    ``None`` where the replay does not apply.

    Why: TIES and breadcrumbs keep the ``k`` largest (smallest) magnitudes, and
    mergekit picks them with ``torch.argsort``. When equal magnitudes straddle
    the cut, which of them are kept is an artefact of that sort, which is not
    stable: on the CPU it is ``std::sort`` (libstdc++ introsort, what the torch
    wheels are built with) over (value, index) pairs, comparing values only
    (``torch/aten/src/ATen/native/cpu/SortingKernel.cpp``). To give the same
    tensors as mergekit we reproduce that choice rather than sort.

    How: introsort partitions a range around a median-of-three pivot (Hoare
    partition, unguarded) and recurses into both halves until segments hold at
    most 16 entries, then runs one insertion sort over everything. No entry
    crosses a partition boundary afterwards, and the insertion sort is stable and
    never moves an entry past an equal one. So the set at positions ``[0, k)`` is
    decided by the partitions on the path to position ``k`` alone (quickselect
    style): the left part of each partition is entirely before ``k`` or the path
    goes into it. Each partition is replayed exactly, vectorised: the left scan
    stops at entries not ordered before the pivot (``L``), the right scan at
    entries the pivot is not ordered before (``R``); pairs ``(L_i, R_i)`` are
    swapped while ``L_i < R_i``, and the cut is ``min(L_m, R_{m-1})`` for the first
    ``m`` where that fails. The last segment (≤ 16 entries) is sorted stably.
    Entries ordered strictly before (after) the value at position ``k − 1`` are in
    (out) whatever the sort does, so only the entries equal to it are followed by
    flat index; when no tie straddles the cut the values alone decide (no replay).
    ``tie_value`` is that value when the caller already knows a tie straddles.

    Returns ``None`` (the caller then sorts for real) when the values hold a NaN
    or the path reaches introsort's depth limit (where it switches to heapsort).
    ``values`` must be what the sort sees (float32 on the CPU, as mergekit casts).
    ``overwrite=True`` reorders ``values`` in place (it becomes scratch space).
    The replay is checked against ``torch.argsort`` in ``tests/test_merge_sort_order.py``.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    if flat.device.type != "cpu" or flat.dtype != torch.float32 or not _replay_verified(*_torch_build()):
        return None
    if math.isnan(float(flat.max())):  # max propagates NaN; NaNs sort first (descending) or last
        return None
    return _prefix(flat, k, descending, overwrite=overwrite, tie_value=tie_value)


def _prefix(flat: torch.Tensor, k: int, descending: bool, *, overwrite: bool,
            tie_value: float | torch.Tensor | None = None) -> torch.Tensor | None:
    """:func:`sorted_prefix_mask` for a 1-D CPU float32 tensor without NaN and 0 < k < n."""
    n = flat.numel()
    if tie_value is None:
        v, below, equal = select(flat, n - k if descending else k - 1)  # the value at sort position k − 1
        before = n - below - equal if descending else below  # entries the sort puts before any v
        if k == before + equal:  # no tie straddles the cut: the values alone decide
            return flat >= v if descending else flat <= v
        tie_value = v
    tie = np.float32(float(tie_value))
    # Entries ordered strictly before the tied value are in, strictly after it out; only the
    # ties are open. Their flat indices are followed through the partitions (everything
    # else is only needed for where the partitions cut).
    mask = flat > float(tie) if descending else flat < float(tie)  # before ``flat`` may become scratch
    vals = flat.numpy() if overwrite else flat.numpy().copy()
    pos = np.flatnonzero(vals == tie)  # where each open tie sits in the current segment
    orig = pos.copy()  # and its flat index
    chosen: list[np.ndarray] = []
    # not before the pivot / pivot not before: the left and right scans' stop tests
    stop_left, stop_right = (np.less_equal, np.greater_equal) if descending else (np.greater_equal, np.less_equal)
    depth = _depth_limit(n)
    while pos.shape[0] and k > 0:
        s = vals.shape[0]
        if k >= s:
            chosen.append(orig)
            break
        if s <= _SEGMENT:
            order = np.argsort(-vals if descending else vals, kind="stable")[:k]
            chosen.append(orig[np.isin(pos, order)])
            break
        if depth == 0:
            return None  # std::sort heap-sorts this range: not replayed
        depth -= 1
        med = _median_of_three(vals, s, descending)
        vals[0], vals[med] = vals[med], vals[0]  # the pivot goes first
        at0, atmed = pos == 0, pos == med
        pos[at0], pos[atmed] = med, 0
        pivot = vals[0]
        # Stoppers in [1, s): the pivot itself is outside the scanned range.
        is_l = stop_left(vals, pivot)
        is_l[0] = False
        left = np.flatnonzero(is_l)
        del is_l
        is_r = stop_right(vals, pivot)
        is_r[0] = False
        right = np.flatnonzero(is_r)  # ascending; the scan meets them from the end
        del is_r
        n_l, n_r = left.shape[0], right.shape[0]
        # Swapping rounds: left[i] < right[n_r - 1 - i]; left rises and right falls, so a prefix.
        a, b = 0, min(n_l, n_r)
        while a < b:
            h = (a + b) // 2
            if left[h] < right[n_r - 1 - h]:
                a = h + 1
            else:
                b = h
        swaps = a
        cut = min(int(left[swaps]) if swaps < n_l else s, int(right[n_r - swaps]) if swaps > 0 else s)
        ls = left[:swaps]  # ascending; ls[i] swaps with rs_up[swaps - 1 - i]
        rs_up = right[n_r - swaps:]
        del left, right
        if swaps:
            i = np.searchsorted(ls, pos)
            from_l = ls[np.minimum(i, swaps - 1)] == pos
            j = np.searchsorted(rs_up, pos)
            from_r = rs_up[np.minimum(j, swaps - 1)] == pos
            moved = pos.copy()
            moved[from_l] = rs_up[swaps - 1 - i[from_l]]
            moved[from_r] = ls[swaps - 1 - j[from_r]]
            pos = moved
        if k >= cut:  # [0, cut) all comes first: its ties are in; go on in [cut, s)
            vals[rs_up] = vals[ls[::-1]]
            vals = vals[cut:]
            inside = pos < cut
            chosen.append(orig[inside])
            pos, orig = pos[~inside] - cut, orig[~inside]
            k -= cut
        else:  # go on in [0, cut); the ties in [cut, s) are out
            vals[ls] = vals[rs_up[::-1]]
            vals = vals[:cut]
            inside = pos < cut
            pos, orig = pos[inside], orig[inside]
    if chosen:
        mask[torch.from_numpy(np.concatenate(chosen))] = True
    return mask


def _depth_limit(n: int) -> int:
    """Partitions std::sort makes on one path before it heap-sorts the rest: 2·⌊log₂ n⌋."""
    return 2 * (n.bit_length() - 1)


def _torch_build() -> tuple[str, str]:
    return torch.__version__, torch.backends.cpu.get_cpu_capability()


@functools.lru_cache(maxsize=None)
def _replay_verified(version: str, capability: str) -> bool:
    """Whether this torch's CPU sort is the one :func:`sorted_prefix_mask` replays (keyed by the
    build, which fixes the sort): a build with another algorithm (say x86-simd-sort) makes
    every caller fall back to ``torch.argsort`` instead of giving different tensors."""
    g = torch.Generator().manual_seed(0)
    for n in (1000, 30_011):
        for v in ((torch.randn(n, generator=g) * 8).round().abs(), torch.randn(n, generator=g).abs()):
            for descending in (True, False):
                order = torch.argsort(v, descending=descending)
                for k in (1, n // 3, n // 2, n - 1):
                    ref = torch.zeros(n, dtype=torch.bool)
                    ref[order[:k]] = True
                    got = _prefix(v, k, descending, overwrite=False)
                    if got is None or not torch.equal(got, ref):
                        log.warning("torch %s sorts differently from libstdc++ std::sort; "
                                    "TIES ties are resolved with torch.argsort", version)
                        return False
    return True


def _median_of_three(vals, s: int, descending: bool) -> int:
    """Where std::__move_median_to_first finds its pivot among positions 1, s//2 and s−1."""
    a, b, c = vals[1], vals[s // 2], vals[s - 1]
    if descending:
        ab, bc, ac = a > b, b > c, a > c
    else:
        ab, bc, ac = a < b, b < c, a < c
    if ab:
        return s // 2 if bc else (s - 1 if ac else 1)
    if ac:
        return 1
    return s - 1 if bc else s // 2


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
    mask = rank_range_mask(tensor.abs(), 0, k, descending=True, exact_ties=exact_ties, overwrite=True)
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
    mask = rank_range_mask(tensor.abs(), bottom, bottom + keep, exact_ties=exact_ties, overwrite=True)
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
