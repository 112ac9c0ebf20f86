"""The linear-time replay of torch's CPU sort order (``sparsify.sorted_prefix_mask``).

TIES and breadcrumbs keep the entries at positions [lo, hi) of
``torch.argsort(|τ|)``, as mergekit does. torch's CPU sort is not stable, so
when equal magnitudes straddle a cut the kept ones are an artefact of the
sort; the replay must pick exactly the same set. Every check here compares it
with ``torch.argsort`` itself, on inputs built to make ties straddle the cut,
and asserts that the choice is not trivial (a stable sort would pick others).
"""

from __future__ import annotations

import random

import pytest
import torch

from merging.methods import sparsify
from merging.methods.sparsify import magnitude, magnitude_outliers, rank_range_mask, sorted_prefix_mask


def _inputs(n: int, kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "bf16":  # bf16-quantised magnitudes: ties everywhere
        return torch.randn(n, generator=g).to(torch.bfloat16).float().abs()
    if kind == "few":  # a handful of distinct values
        return torch.randint(0, 5, (n,), generator=g).float()
    if kind == "equal":
        return torch.full((n,), 0.25)
    if kind == "sorted":
        return torch.randn(n, generator=g).to(torch.bfloat16).float().abs().sort().values
    if kind == "reversed":
        return torch.randn(n, generator=g).to(torch.bfloat16).float().abs().sort(descending=True).values
    if kind == "float32-delta":  # a task vector as float32 rounding leaves it: (θ + ε) − θ
        base = torch.randn(n, generator=g)
        return ((base + torch.randn(n, generator=g) * 1e-3) - base).abs()
    return torch.randn(n, generator=g).abs()  # distinct values


def _reference(order: torch.Tensor, k: int) -> torch.Tensor:
    ref = torch.zeros(order.numel(), dtype=torch.bool)
    ref[order[:k]] = True
    return ref


KINDS = ["bf16", "few", "equal", "sorted", "reversed", "float32-delta", "distinct"]


@pytest.mark.parametrize("kind", KINDS)
def test_replay_matches_argsort(kind):
    """Random sizes from 17 up (odd ones too), k near 0, near n and in between, both directions."""
    rng = random.Random(kind)
    g = torch.Generator().manual_seed(len(kind))
    sizes = [17, 18, 33, rng.randint(19, 200), rng.randint(200, 5000) | 1, rng.randint(5000, 50_000),
             rng.randint(50_000, 150_000) | 1]
    nontrivial = 0
    for n in sizes:
        v = _inputs(n, kind, g)
        for descending in (True, False):
            order = torch.argsort(v, descending=descending)
            stable = torch.argsort(v, descending=descending, stable=True)
            for k in sorted({1, 2, 3, n // 2, (n + 1) // 2, n - 2, n - 1, rng.randint(1, n - 1), int(0.3 * n)}):
                if not 0 < k < n:
                    continue
                ref = _reference(order, k)
                got = sorted_prefix_mask(v, k, descending=descending)
                assert got is not None, (kind, n, k, descending)
                assert torch.equal(got, ref), (kind, n, k, descending)
                nontrivial += int(not torch.equal(ref, _reference(stable, k)))
    if kind not in ("distinct",):
        assert nontrivial > 0  # ties really straddled cuts, and the sort's choice differed from index order


def test_replay_on_two_million_entries():
    g = torch.Generator().manual_seed(3)
    n = 2_000_003
    v = _inputs(n, "bf16", g)
    for descending, k in ((True, n // 2), (False, int(0.7 * n) + 1)):
        ref = _reference(torch.argsort(v, descending=descending), k)
        got = sorted_prefix_mask(v, k, descending=descending)
        assert got is not None and torch.equal(got, ref)
        assert not torch.equal(ref, _reference(torch.argsort(v, descending=descending, stable=True), k))


def test_overwrite_and_input_left_alone():
    g = torch.Generator().manual_seed(5)
    v = _inputs(50_001, "bf16", g)
    keep = v.clone()
    ref = _reference(torch.argsort(v, descending=True), 20_000)
    assert torch.equal(sorted_prefix_mask(v, 20_000, descending=True), ref)
    assert torch.equal(v, keep)  # not overwritten by default
    scratch = v.clone()
    assert torch.equal(sorted_prefix_mask(scratch, 20_000, descending=True, overwrite=True), ref)
    assert not torch.equal(scratch, keep)  # overwrite really used it as scratch


def test_unmodelled_inputs_fall_back_to_the_real_sort():
    g = torch.Generator().manual_seed(7)
    v = _inputs(10_000, "bf16", g)
    v[17] = float("nan")
    assert sorted_prefix_mask(v, 5000, descending=True) is None
    assert sorted_prefix_mask(v.double(), 5000, descending=True) is None
    # rank_range_mask then sorts for real, and still matches argsort
    ref = _reference(torch.argsort(v, descending=True), 5000)
    assert torch.equal(rank_range_mask(v, 0, 5000, descending=True), ref)


def test_depth_limit_falls_back(monkeypatch):
    """Where introsort would switch to heapsort the replay gives up (None), never a guess."""
    g = torch.Generator().manual_seed(9)
    v = _inputs(5000, "few", g)
    ref = _reference(torch.argsort(v, descending=True), 2500)
    assert torch.equal(sorted_prefix_mask(v, 2500, descending=True), ref)  # (also verifies the build first)
    monkeypatch.setattr(sparsify, "_depth_limit", lambda n: 1)
    assert sorted_prefix_mask(v, 2500, descending=True) is None
    assert torch.equal(rank_range_mask(v, 0, 2500, descending=True), ref)


@pytest.mark.parametrize("kind", ["bf16", "float32-delta", "few"])
def test_ties_and_breadcrumbs_keep_what_mergekit_keeps(kind):
    """The sparsifiers end to end, against mergekit's formulas written with torch.argsort."""
    g = torch.Generator().manual_seed(11)
    for n in (4097, 300_000):
        t = _inputs(n, kind, g) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        for density in (0.2, 0.5, 0.9):
            k = max(1, int(density * n))
            mask = torch.zeros(n)
            mask[torch.argsort(t.abs(), descending=True)[:k]] = 1
            assert torch.equal(magnitude(t.clone(), density), t * mask), (kind, n, density)
            gamma = 0.05
            keep, top = int(density * n), int(gamma * n)
            bottom = max(0, n - keep - top)
            mask2 = torch.zeros(n)
            mask2[torch.sort(t.abs(), descending=False).indices[bottom:bottom + keep]] = 1
            assert torch.equal(magnitude_outliers(t.clone(), density, gamma), t * mask2), (kind, n, density)


def test_a_torch_that_sorts_differently_is_caught(monkeypatch):
    """The replay is checked once per torch build; a sort it does not model switches it off."""
    assert sparsify._replay_verified(*sparsify._torch_build())  # this build: the replay agrees with argsort
    monkeypatch.setattr(sparsify, "_prefix", lambda v, k, d, overwrite: torch.ones(v.numel(), dtype=torch.bool))
    assert not sparsify._replay_verified("another-build", "AVX512")
    sparsify._replay_verified.cache_clear()  # do not leave the fake build's answer behind
