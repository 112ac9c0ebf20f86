"""Merge-method identities on tiny models, each paired with a non-vacuity check.

Every test runs the real engine (recipe → run_merge → safetensors folder) and
compares tensors exactly where the algebra says they are equal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoints.tensors import CheckpointReader
from merging.engine import run_merge
from merging.lines import LinesConfig, lines_curve, lines_scale
from merging.methods import REGISTRY, get_method
from merging.methods.sparsify import magnitude, magnitude_outliers, rank_range_mask
from merging.recipe import MergeRecipe
from merging.schedule import depth_t, evaluate, resolve

BLOCK0 = "model.layers.0.mlp.down_proj.weight"
LAST = "model.layers.3.mlp.down_proj.weight"
MID = "model.layers.1.self_attn.q_proj.weight"
EMB = "model.embed_tokens.weight"


def load(folder: Path) -> dict[str, torch.Tensor]:
    r = CheckpointReader.from_folder(Path(folder))
    return {k: r.get(k) for k in r.keys()}


def merge(tmp_path: Path, text: str, name: str = "out", **kw) -> tuple[dict[str, torch.Tensor], object]:
    result = run_merge(MergeRecipe.from_yaml(text), tmp_path / name, **kw)
    return load(tmp_path / name), result


@pytest.fixture(scope="module")
def fam(tiny_llama_family):
    return {k: load(v) for k, v in tiny_llama_family.items()}


def test_linear_one_zero_returns_a(tmp_path, tiny_llama_family, fam):
    f = tiny_llama_family
    out, res = merge(tmp_path, f"""
merge_method: linear
models:
  - model: {f['ft1']}
    parameters: {{weight: 1.0}}
  - model: {f['ft2']}
    parameters: {{weight: 0.0}}
""")
    assert set(out) == set(fam["ft1"])
    for k in out:
        assert torch.equal(out[k], fam["ft1"][k]), k
        assert not torch.equal(fam["ft1"][k], fam["ft2"][k]), k  # non-vacuous: the inputs differ everywhere
    # and with weights [1, 1] the output is the mean, not A
    mean, _ = merge(tmp_path, f"merge_method: linear\nmodels:\n  - model: {f['ft1']}\n    parameters: {{weight: 1}}\n"
                              f"  - model: {f['ft2']}\n    parameters: {{weight: 1}}\n", "mean")
    assert torch.allclose(mean[MID], (fam["ft1"][MID] + fam["ft2"][MID]) / 2, atol=1e-7)
    assert not torch.equal(mean[MID], fam["ft1"][MID])


def test_linear_without_normalize_is_weighted_sum(tmp_path, tiny_llama_family, fam):
    f = tiny_llama_family
    out, _ = merge(tmp_path, f"""
merge_method: linear
parameters: {{normalize: false}}
models:
  - model: {f['ft1']}
    parameters: {{weight: 0.5}}
  - model: {f['ft2']}
    parameters: {{weight: 0.25}}
""")
    assert torch.allclose(out[MID], 0.5 * fam["ft1"][MID] + 0.25 * fam["ft2"][MID], atol=1e-7)


def test_task_arithmetic_lambda_zero_returns_base(tmp_path, tiny_llama_family, fam):
    f = tiny_llama_family
    recipe = f"""
merge_method: task_arithmetic
base_model: {f['base']}
parameters: {{lambda: LAMBDA}}
models:
  - model: {f['ft1']}
    parameters: {{weight: 0.7}}
  - model: {f['ft2']}
    parameters: {{weight: 0.4}}
"""
    out, res = merge(tmp_path, recipe.replace("LAMBDA", "0.0"), "zero")
    for k in out:
        assert torch.equal(out[k], fam["base"][k]), k
    assert res.tensors_changed == 0
    one, res1 = merge(tmp_path, recipe.replace("LAMBDA", "1.0"), "one")
    expected = fam["base"][MID] + 0.7 * (fam["ft1"][MID] - fam["base"][MID]) + 0.4 * (fam["ft2"][MID] - fam["base"][MID])
    assert torch.allclose(one[MID], expected, atol=1e-6)
    assert not torch.equal(one[MID], fam["base"][MID])
    assert res1.tensors_changed == res1.tensors_total > 0


def test_slerp_endpoints(tmp_path, tiny_llama_family, fam):
    f = tiny_llama_family
    text = f"merge_method: slerp\nbase_model: {f['base']}\nmodels:\n  - model: {f['ft1']}\nparameters: {{t: T}}\n"
    at0, _ = merge(tmp_path, text.replace("T", "0.0"), "t0")
    at1, _ = merge(tmp_path, text.replace("T", "1.0"), "t1")
    half, _ = merge(tmp_path, text.replace("T", "0.5"), "half")
    for k in at0:
        assert torch.equal(at0[k], fam["base"][k]), k
        assert torch.equal(at1[k], fam["ft1"][k]), k
    assert not torch.equal(half[MID], fam["base"][MID]) and not torch.equal(half[MID], fam["ft1"][MID])


def test_slerp_follows_the_arc(tmp_path):
    """Orthogonal unit vectors: slerp at t keeps unit norm (a lerp would not)."""
    from merging.methods.slerp import slerp_tensors

    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = slerp_tensors(0.5, a, b)
    assert torch.allclose(mid.norm(), torch.tensor(1.0), atol=1e-6)
    assert torch.allclose(mid, torch.tensor([0.5**0.5, 0.5**0.5]), atol=1e-6)


TA = """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6}}
  - model: {ft2}
    parameters: {{weight: 0.5}}
"""


def test_lines_alpha1_beta0_equals_task_arithmetic(tmp_path, tiny_llama_family, fam):
    plain, _ = merge(tmp_path, TA.format(**tiny_llama_family), "plain")
    lines, res = merge(tmp_path, TA.format(**tiny_llama_family) + "lines: {alpha: 1.0, beta: 0.0}\n", "lines")
    for k in plain:
        assert torch.equal(plain[k], lines[k]), k
    assert not torch.equal(plain[MID], fam["base"][MID])  # the task vector is not zero
    assert res.lines_curve == [1.0] * 4


def test_lines_alpha0_beta1_scales_by_depth(tmp_path, tiny_llama_family, fam):
    plain, _ = merge(tmp_path, TA.format(**tiny_llama_family), "plain")
    lines, res = merge(tmp_path, TA.format(**tiny_llama_family) + "lines: {alpha: 0.0, beta: 1.0}\n", "lines")
    base = fam["base"]
    # block 0 and everything outside the blocks stay at the base
    for k in lines:
        if k.startswith("model.layers.0.") or not k.startswith("model.layers."):
            assert torch.equal(lines[k], base[k]), k
    # the last block gets the full task vector
    for k in lines:
        if k.startswith("model.layers.3."):
            assert torch.equal(lines[k], plain[k]), k
    # a middle block gets a third of it, so it equals neither
    expected = base[MID] + (plain[MID] - base[MID]) / 3
    assert torch.allclose(lines[MID], expected, atol=1e-6)
    assert not torch.equal(lines[MID], base[MID]) and not torch.equal(lines[MID], plain[MID])
    assert not torch.equal(plain[BLOCK0], base[BLOCK0])  # non-vacuous: TA did move block 0
    assert res.lines_curve == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_lines_auto_alpha_is_one_over_t_for_task_arithmetic(tmp_path, tiny_llama_family, fam):
    f = tiny_llama_family
    text = f"""
merge_method: task_arithmetic
base_model: {f['base']}
models:
  - model: {f['ft1']}
    parameters: {{weight: 1.0}}
  - model: {f['ft2']}
    parameters: {{weight: 1.0}}
  - model: {f['ft3']}
    parameters: {{weight: 1.0}}
lines: {{alpha: auto, beta: 0.0}}
"""
    out, res = merge(tmp_path, text)
    assert res.lines_alpha == pytest.approx(1 / 3, rel=1e-6)
    base = fam["base"]
    expected = base[MID] + sum(fam[m][MID] - base[MID] for m in ("ft1", "ft2", "ft3")) / 3
    assert torch.allclose(out[MID], expected, atol=1e-6)
    assert not torch.allclose(out[MID], base[MID])
    # a TIES merge shrinks the merged vector less than the sum, so its auto α differs from 1/T
    _, ties = merge(tmp_path, text.replace("task_arithmetic", "ties").replace("weight: 1.0", "weight: 1.0, density: 0.5"), "ties")
    assert ties.lines_alpha != pytest.approx(1 / 3, rel=1e-3)


def test_lines_curve_and_scale():
    assert lines_curve(0.2, 0.8, 5) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lines_scale(None, 5, 0.2, 0.8) == 0.2
    cfg = LinesConfig.single_task(0.3)
    assert (cfg.alpha, cfg.beta) == (0.3, pytest.approx(0.7))
    assert lines_curve(cfg.alpha, cfg.beta, 30)[-1] == pytest.approx(1.0)


def test_schedule_evaluation():
    assert depth_t(None, 30) == 0.0 and depth_t(29, 30) == 1.0 and depth_t(0, 1) == 1.0
    assert evaluate([0, 1], "x", 0.25) == pytest.approx(0.25)
    assert evaluate([1, 0, 1], "x", 0.5) == pytest.approx(0.0)
    assert evaluate([1, 0, 1], "x", 0.75) == pytest.approx(0.5)
    filters = [{"filter": "mlp", "value": [0, 1]}, {"filter": "self_attn", "value": 0.3}, {"value": 0.9}]
    assert evaluate(filters, "model.layers.2.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate(filters, "model.layers.2.self_attn.q_proj.weight", 0.5) == 0.3
    assert evaluate(filters, "model.norm.weight", 0.0) == 0.9
    assert evaluate([{"filter": "mlp", "value": 1}], "model.norm.weight", 0.0) is None
    # precedence: the first scope that gives a value wins; unmatched filters fall through
    scopes = [{"weight": [{"filter": "mlp", "value": 2.0}]}, {"weight": 1.0}]
    assert resolve("weight", scopes, "a.mlp.b", 0.0) == 2.0
    assert resolve("weight", scopes, "a.attn.b", 0.0) == 1.0


def test_schedule_gradient_in_a_merge(tmp_path, tiny_llama_family, fam):
    """weight [0, 1] over 4 blocks: block ℓ gets ℓ/3 of the task vector; the embeddings (t=0) get 0."""
    f = tiny_llama_family
    out, _ = merge(tmp_path, f"""
merge_method: task_arithmetic
base_model: {f['base']}
models:
  - model: {f['ft1']}
    parameters:
      weight: [0, 1]
""")
    base, ft = fam["base"], fam["ft1"]
    assert torch.equal(out[EMB], base[EMB])
    assert torch.allclose(out[MID], base[MID] + (ft[MID] - base[MID]) / 3, atol=1e-6)
    assert torch.allclose(out[LAST], ft[LAST], atol=1e-6)
    assert not torch.allclose(out[MID], ft[MID]) and not torch.allclose(out[MID], base[MID])


def test_filters_and_model_parameters_precedence(tmp_path, tiny_llama_family, fam):
    f = tiny_llama_family
    out, _ = merge(tmp_path, f"""
merge_method: task_arithmetic
base_model: {f['base']}
parameters:
  weight: 0.0
models:
  - model: {f['ft1']}
    parameters:
      weight:
        - filter: mlp
          value: 1.0
""")
    base, ft = fam["base"], fam["ft1"]
    assert torch.allclose(out[LAST], ft[LAST], atol=1e-6)  # model filter matched
    assert torch.equal(out[MID], base[MID])  # no match: fell through to the top-level 0
    assert not torch.equal(ft[MID], base[MID])


def test_seeded_dare_is_reproducible(tmp_path, tiny_llama_family):
    f = tiny_llama_family
    text = f"""
merge_method: dare_ties
base_model: {f['base']}
seed: SEED
models:
  - model: {f['ft1']}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {f['ft2']}
    parameters: {{weight: 0.5, density: 0.5}}
"""
    a, _ = merge(tmp_path, text.replace("SEED", "7"), "a")
    b, _ = merge(tmp_path, text.replace("SEED", "7"), "b")
    c, _ = merge(tmp_path, text.replace("SEED", "8"), "c")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                                    "model_stock", "nuslerp"])
def test_every_method_runs_and_moves_away_from_the_base(tmp_path, tiny_llama_family, fam, method):
    f = tiny_llama_family
    m = get_method(method)
    params = []
    if m.param("weight") is not None:
        params.append("weight: 0.5")
    if m.param("density") is not None:
        params.append("density: 0.5")
    ps = f"\n    parameters: {{{', '.join(params)}}}" if params else ""
    models = "".join(f"\n  - model: {f[k]}{ps}" for k in ("ft1", "ft2"))
    out, res = merge(tmp_path, f"merge_method: {method}\nbase_model: {f['base']}\nmodels:{models}\n")
    assert res.tensors_changed > 0
    assert all(torch.isfinite(v).all() for v in out.values())
    assert not torch.equal(out[MID], fam["base"][MID])


def test_sparsify_matches_a_full_sort():
    """The linear-time selection keeps exactly what mergekit's argsort keeps, ties included."""
    g = torch.Generator().manual_seed(0)
    for n in (1000, 2_500_000):
        x = torch.randn(n, generator=g)
        y = (x * 40).round() / 40  # many exact ties
        for v in (x, y):
            k = int(0.3 * n)
            ref = torch.zeros(n)
            ref[torch.argsort(v.abs(), descending=True)[:k]] = 1
            assert torch.equal(magnitude(v.clone(), 0.3), v * ref)
            lo, hi = n // 10, n // 10 + k
            ref2 = torch.zeros(n, dtype=torch.bool)
            ref2[torch.argsort(v.abs())[lo:hi]] = True
            assert torch.equal(rank_range_mask(v.abs(), lo, hi), ref2)
    # index-order ties (--fast-ties): same count, differs from the sort only among equal values
    v = (torch.randn(200_000, generator=g) * 30).round().abs()
    fast = rank_range_mask(v, 0, 50_000, descending=True, exact_ties=False)
    exact = rank_range_mask(v, 0, 50_000, descending=True)
    assert int(fast.sum()) == int(exact.sum()) == 50_000
    assert v[fast ^ exact].unique().numel() <= 1 and (v[fast] >= v[~fast].max()).all()
    t = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05])
    # n=5, keep int(0.4·5)=2, drop int(0.2·5)=1 outlier (-5.0) and the 2 smallest
    assert torch.equal(magnitude_outliers(t.clone(), density=0.4, gamma=0.2), torch.tensor([0.0, 0, 0.2, 3.0, 0]))


def test_registry_entries_are_complete():
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
            "della", "della_linear", "slerp", "nuslerp", "model_stock", "passthrough"} <= set(REGISTRY)
    for m in REGISTRY.values():
        assert m.label and callable(m.func)
        assert len({p.name for p in m.parameters}) == len(m.parameters)
    assert get_method("linear").param("normalize").default is True
    assert get_method("dare_ties").deterministic is False and get_method("ties").deterministic is True
