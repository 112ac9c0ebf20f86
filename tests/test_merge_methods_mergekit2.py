"""mergekit 0.1.5's further methods: sce, karcher, multislerp, nearswap, arcee_fusion, ram, ramplus_tl.

Each method has a hand-computed tiny case (called through the registry on small
tensors) and an identity through the real engine (recipe → run_merge → files),
paired with a check that the identity is not vacuous.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from merging.methods import REGISTRY, get_method
from merging.methods.base import TensorContext
from test_merge_methods import MID, load, merge


def call(name: str, base, tensors, per_model=None, **shared) -> torch.Tensor:
    """Run registry method ``name`` on small tensors with its defaults overridden by ``shared``."""
    m = get_method(name)
    params = {p.name: p.default for p in m.shared_parameters} | shared
    per_model = per_model or [{} for _ in tensors]
    per_model = [{p.name: p.default for p in m.model_parameters} | pm for pm in per_model]
    base = None if base is None else torch.tensor(base, dtype=torch.float32)
    inputs = [torch.tensor(t, dtype=torch.float32) for t in tensors]
    return m.func(base, inputs, params, per_model, TensorContext("t"))


@pytest.fixture(scope="module")
def fam(tiny_llama_family):
    return {k: load(v) for k, v in tiny_llama_family.items()}


def _models(*paths, weights=None) -> str:
    lines = []
    for i, p in enumerate(paths):
        lines.append(f"  - model: {p}\n")
        if weights is not None:
            lines.append(f"    parameters: {{weight: {weights[i]}}}\n")
    return "".join(lines)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> bool:
    return torch.allclose(a, b, rtol=0, atol=atol)


# -- sce ------------------------------------------------------------------------------------------

def test_sce_hand_computed():
    # τ1 = [1, -2, 3, 0], τ2 = [3, 1, -1, 2]: energies 3.5 and 3.75, elected signs [+, -, +, +].
    out = call("sce", [0, 0, 0, 0], [[1, -2, 3, 0], [3, 1, -1, 2]])
    w1, w2 = 3.5 / 7.25, 3.75 / 7.25
    assert torch.allclose(out, torch.tensor([(w1 * 1 + w2 * 3) / (w1 + w2), -2, 3, 2]), atol=1e-6)
    # select_topk 0.5 keeps the two entries of largest variance (2.25 and 4): entries 1 and 2.
    out = call("sce", [0, 0, 0, 0], [[1, -2, 3, 0], [3, 1, -1, 2]], select_topk=0.5)
    assert torch.allclose(out, torch.tensor([0.0, -2, 3, 0]), atol=1e-6)


def test_sce_one_model_returns_it(tmp_path, tiny_llama_family, fam):
    f = tiny_llama_family
    out, _ = merge(tmp_path, f"merge_method: sce\nbase_model: {f['base']}\nmodels:\n{_models(f['ft1'])}")
    for k in out:
        assert _close(out[k], fam["ft1"][k]), k
    assert not torch.equal(fam["ft1"][MID], fam["base"][MID])  # non-vacuous: the model is not the base
    # two models: neither of them, and not their mean either (energy weights, sign erasure)
    two, _ = merge(tmp_path, f"merge_method: sce\nbase_model: {f['base']}\nmodels:\n{_models(f['ft1'], f['ft2'])}", "two")
    assert not _close(two[MID], fam["ft1"][MID]) and not _close(two[MID], fam["ft2"][MID])
    assert not _close(two[MID], (fam["ft1"][MID] + fam["ft2"][MID]) / 2)


# -- karcher --------------------------------------------------------------------------------------

def test_karcher_hand_computed():
    # Two orthogonal directions: the geodesic midpoint, scaled by the mean norm (2 + 1) / 2.
    out = call("karcher", None, [[2, 0], [0, 1]])
    assert torch.allclose(out, torch.tensor([1.5, 1.5]) / math.sqrt(2), atol=1e-6)
    assert not torch.allclose(out, torch.tensor([1.0, 0.5]), atol=1e-3)  # not the linear mean
    # Three orthonormal directions: the centre of the octant, by symmetry.
    out = call("karcher", None, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert torch.allclose(out, torch.full((3,), 1 / math.sqrt(3)), atol=1e-6)
    # The base is one more input with the same weight (mergekit ignores the base role here).
    assert torch.allclose(call("karcher", [0, 1], [[2, 0]]), torch.tensor([1.5, 1.5]) / math.sqrt(2), atol=1e-6)
    # An unequal pair is not the midpoint: max_iter 0 stops at the normalised mean of directions.
    a, b = [1, 0], [0.6, 0.8]
    mid = torch.tensor([1.6, 0.8]) / torch.tensor([1.6, 0.8]).norm()
    assert torch.allclose(call("karcher", None, [a, b], max_iter=0), mid, atol=1e-6)


def test_karcher_one_model_and_identical_models(tmp_path, tiny_llama_family, fam):
    f = tiny_llama_family
    one, _ = merge(tmp_path, f"merge_method: karcher\nmodels:\n{_models(f['ft1'])}")
    for k in one:
        assert torch.equal(one[k], fam["ft1"][k]), k
    twin = tmp_path / "twin"
    shutil.copytree(f["ft1"], twin)
    same, _ = merge(tmp_path, f"merge_method: karcher\nmodels:\n{_models(f['ft1'], twin)}", "same")
    for k in same:
        assert _close(same[k], fam["ft1"][k], 1e-5), k
    # non-vacuous: with the base it is neither input, and its norm is the mean of theirs
    both, _ = merge(tmp_path, f"merge_method: karcher\nbase_model: {f['base']}\nmodels:\n{_models(f['ft1'])}", "both")
    assert not _close(both[MID], fam["ft1"][MID]) and not _close(both[MID], fam["base"][MID])
    mean_norm = (fam["ft1"][MID].norm() + fam["base"][MID].norm()) / 2
    assert math.isclose(float(both[MID].norm()), float(mean_norm), rel_tol=1e-5)


# -- multislerp -----------------------------------------------------------------------------------

def test_multislerp_hand_computed():
    w = [{"weight": 0.5}, {"weight": 0.5}]
    # Orthogonal [3, 0] and [0, 1]: the mean direction (1, 1)/√2, scaled by the mean norm 2.
    assert torch.allclose(call("multislerp", None, [[3, 0], [0, 1]], w), torch.tensor([2.0, 2.0]) / math.sqrt(2))
    # Unequal weights 3:1 (normalised): direction ∝ 0.75·(1, 0) + 0.25·(0, 1), norm 0.75·3 + 0.25·1.
    out = call("multislerp", None, [[3, 0], [0, 1]], [{"weight": 3}, {"weight": 1}])
    assert torch.allclose(out, torch.tensor([0.75, 0.25]) / math.hypot(0.75, 0.25) * 2.5, atol=1e-6)
    # With a base: the same on the task vectors, then + base.
    out = call("multislerp", [1, 1], [[4, 1], [1, 2]], w)
    assert torch.allclose(out, torch.tensor([1.0, 1.0]) + torch.tensor([2.0, 2.0]) / math.sqrt(2), atol=1e-6)
    # Task vectors that cancel: the weighted linear mean (here the base), not an error.
    assert torch.allclose(call("multislerp", [1, 1], [[2, 1], [0, 1], [1, 1]],
                               [{"weight": 1}, {"weight": 1}, {"weight": 1}]), torch.tensor([1.0, 1.0]))


def test_multislerp_identical_models_return_them(tmp_path, tiny_llama_family, fam):
    f = tiny_llama_family
    twin = tmp_path / "twin"
    shutil.copytree(f["ft1"], twin)
    for base in ("", f"base_model: {f['base']}\n"):
        out, _ = merge(tmp_path, f"merge_method: multislerp\n{base}models:\n{_models(f['ft1'], twin, weights=[0.3, 0.7])}",
                       f"out{bool(base)}")
        for k in out:
            assert _close(out[k], fam["ft1"][k], 1e-5), k
    # non-vacuous: two different models give neither of them
    mix, _ = merge(tmp_path, f"merge_method: multislerp\nbase_model: {f['base']}\n"
                             f"models:\n{_models(f['ft1'], f['ft2'], weights=[0.5, 0.5])}", "mix")
    assert not _close(mix[MID], fam["ft1"][MID]) and not _close(mix[MID], fam["ft2"][MID])


# -- nearswap -------------------------------------------------------------------------------------

def test_nearswap_hand_computed():
    # |a − b| = [0.1, 1, 4], t = 0.5: weights [1, 0.5, 0.125] toward b.
    out = call("nearswap", [0, 0, 0], [[0.1, 1, 4]], t=0.5)
    assert torch.allclose(out, torch.tensor([0.1, 0.5, 0.5]), atol=1e-7)


def test_nearswap_t_zero_is_base_and_large_t_is_other(tmp_path, tiny_llama_family, fam):
    f = tiny_llama_family
    recipe = f"merge_method: nearswap\nbase_model: {f['base']}\nmodels:\n{_models(f['ft1'])}parameters: {{t: {{t}}}}\n"
    zero, _ = merge(tmp_path, recipe.replace("{t}", "0.0"), "zero")
    far, _ = merge(tmp_path, recipe.replace("{t}", "100.0"), "far")
    for k in zero:
        assert torch.equal(zero[k], fam["base"][k]), k
        assert torch.equal(far[k], fam["ft1"][k]), k
    assert not torch.equal(fam["base"][MID], fam["ft1"][MID])  # non-vacuous
    part, _ = merge(tmp_path, recipe.replace("{t}", "0.01"), "part")
    assert not torch.equal(part[MID], fam["base"][MID]) and not torch.equal(part[MID], fam["ft1"][MID])


# -- arcee_fusion ---------------------------------------------------------------------------------

def test_arcee_fusion_hand_computed():
    # A vector has one KL value, so importance ∝ |b − a| = [1..7, 100]. Order statistics at
    # ⌊q·7⌋ = 1, 3, 5 are 2, 4, 6: the fence is 4 + 1.5·(6 − 2) = 10, passed only by the 100.
    base = [0.0] * 8
    other = [1, 2, 3, 4, 5, 6, 7, 100]
    out = call("arcee_fusion", base, [other])
    assert torch.equal(out, torch.tensor([0.0] * 7 + [100.0]))


def test_arcee_fusion_takes_entries_from_one_or_the_other(tmp_path, tiny_llama_family, fam):
    f = tiny_llama_family
    out, _ = merge(tmp_path, f"merge_method: arcee_fusion\nbase_model: {f['base']}\nmodels:\n{_models(f['ft1'])}")
    taken = 0
    for k in out:
        from_other = out[k] == fam["ft1"][k]
        assert torch.all(from_other | (out[k] == fam["base"][k])), k
        taken += int(from_other.sum())
    total = sum(t.numel() for t in out.values())
    assert 0 < taken < total / 2  # non-vacuous: some entries, only the outliers, come from the fine-tune
    # The base against itself: nothing changes.
    twin = tmp_path / "twin"
    shutil.copytree(f["base"], twin)
    same, _ = merge(tmp_path, f"merge_method: arcee_fusion\nbase_model: {f['base']}\nmodels:\n{_models(twin)}", "same")
    assert all(torch.equal(same[k], fam["base"][k]) for k in same)


def test_arcee_fusion_large_tensor_is_seeded():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1_100_000, generator=g)
    other = base + torch.randn(1_100_000, generator=g) * 0.01
    m = get_method("arcee_fusion")
    runs = [m.func(base, [other], {}, [{}], TensorContext("w", seed=s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1])  # same seed, same sample, same output
    assert not torch.equal(runs[0], runs[2])  # the quantiles of a >1M tensor come from a sample


# -- ram / ramplus_tl -----------------------------------------------------------------------------

def test_ram_hand_computed():
    # τ1 = [1, 2, 0, 1e-6] (the last below epsilon), τ2 = [3, 0, 4, 5]; changed by [2, 1, 1, 1] models.
    base, t1, t2 = [0, 0, 0, 0], [1, 2, 0, 1e-6], [3, 0, 4, 5]
    assert torch.equal(call("ram", base, [t1, t2]), torch.tensor([2.0, 2, 4, 5]))
    # ramplus_tl: model 1 shares 1 of 2 changed entries (ρ = 1/1), model 2 1 of 3 (ρ = 1/2);
    # unique entries are scaled by 1 + r·min(ρ, alpha): 1.5 and 1.25 with r = 0.5, alpha = 1.
    assert torch.equal(call("ramplus_tl", base, [t1, t2], r=0.5, alpha=1.0), torch.tensor([2.0, 3, 5, 6.25]))
    # the defaults (r 0.1, alpha 0.2) cap the boost at 2 %
    assert torch.allclose(call("ramplus_tl", base, [t1, t2]), torch.tensor([2.0, 2.04, 4.08, 5.1]), atol=1e-6)


def test_ram_one_model_returns_it(tmp_path, tiny_llama_family, fam):
    f = tiny_llama_family
    for method in ("ram", "ramplus_tl"):
        out, _ = merge(tmp_path, f"merge_method: {method}\nbase_model: {f['base']}\nmodels:\n{_models(f['ft1'])}", method)
        below = 0
        for k in out:
            changed = (fam["ft1"][k] - fam["base"][k]).abs() > 1e-5  # epsilon: smaller changes are not counted
            assert _close(out[k], torch.where(changed, fam["ft1"][k], fam["base"][k])), (method, k)
            below += int((~changed).sum())
        assert below > 0  # the epsilon rule was exercised
    # non-vacuous: with two models, entries both changed take the mean, not the sum of task vectors
    two, _ = merge(tmp_path, f"merge_method: ram\nbase_model: {f['base']}\nmodels:\n{_models(f['ft1'], f['ft2'])}", "two")
    b, a1, a2 = fam["base"][MID], fam["ft1"][MID], fam["ft2"][MID]
    both = ((a1 - b).abs() > 1e-5) & ((a2 - b).abs() > 1e-5)
    assert both.float().mean() > 0.9
    assert _close(two[MID][both], (b + ((a1 - b) + (a2 - b)) / 2)[both], 1e-6)
    assert not _close(two[MID][both], (a1 + a2 - b)[both])


# -- registry -------------------------------------------------------------------------------------

MERGEKIT_PARAMS = {  # mergekit 0.1.5's names and defaults (None: required)
    "sce": {"select_topk": 1.0, "int8_mask": False},
    "karcher": {"max_iter": 10, "tol": 1e-5},
    "multislerp": {"weight": None, "normalize_weights": True, "eps": 1e-8},
    "nearswap": {"t": None},
    "arcee_fusion": {},
    "ram": {"epsilon": 1e-5},
    "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
}


def test_registry_has_mergekits_twenty_methods_with_their_parameters():
    mergekit = {"linear", "slerp", "nuslerp", "passthrough", "model_stock", "karcher", "arcee_fusion",
                "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                "della", "della_linear", "multislerp", "nearswap", "sce", "ram", "ramplus_tl"}
    assert mergekit <= set(REGISTRY)
    for name, expected in MERGEKIT_PARAMS.items():
        m = get_method(name)
        assert {p.name: p.default for p in m.parameters} == expected, name
        assert m.paper_url and m.paper_url.startswith("https://"), name
        assert all(p.required == (p.default is None) for p in m.parameters), name


@pytest.mark.parametrize("name", sorted(MERGEKIT_PARAMS))
def test_new_method_runs_from_its_form_defaults(tmp_path, tiny_llama_family, fam, name):
    """What the Merge tab builds from the registry (defaults; required numbers filled) merges and validates."""
    from merging.recipe import MergeRecipe

    f = tiny_llama_family
    m = get_method(name)
    n = m.max_models or 2
    models = [f"ft{i}" for i in range(1, n + 1)]
    entry = {p.name: (0.5 if p.default is None else p.default) for p in m.model_parameters}
    data = {"merge_method": name, "models": [{"model": str(f[x]), "parameters": dict(entry)} for x in models],
            "parameters": {p.name: (0.01 if p.default is None else p.default) for p in m.shared_parameters}}
    if m.needs_base != "none":
        data["base_model"] = str(f["base"])
    out, result = merge(tmp_path, MergeRecipe.from_dict(data).to_yaml())
    assert set(out) == set(fam["base"]) and all(torch.isfinite(t).all() for t in out.values())
    assert result.tensors_changed > 0  # the method did something to the base


def test_readme_method_table_lists_every_method_with_its_link():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    for name, m in REGISTRY.items():
        row = next((r for r in rows if f"`{name}`" in r.split("|")[1]), None)
        assert row is not None, f"README method table has no row for {name}"
        assert "](https://" in row.split("|")[-2], name  # a link in the paper column
        if m.paper_url:
            assert m.paper_url in row, name
