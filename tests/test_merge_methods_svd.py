"""TSV-M, Iso-C and Iso-CTS: the papers' formulas on hand-computed matrices, identities through the engine.

Hand cases use task matrices whose singular vectors are known (diagonal or
orthogonal), where each method reduces to a result that can be written down.
"""

from __future__ import annotations


import pytest
import torch

from merging.methods import get_method
from merging.methods.base import TensorContext
from merging.methods.svd_merges import common_space_size, nearest_orthogonal
from test_merge_methods import MID, load, merge


def call(name: str, base: torch.Tensor, tensors: list[torch.Tensor], *, transposed: bool = False, **shared):
    m = get_method(name)
    params = {p.name: p.default for p in m.shared_parameters} | shared
    return m.func(base, list(tensors), params, [{} for _ in tensors], TensorContext("t", transposed=transposed))


def diag(*values: float) -> torch.Tensor:
    return torch.diag(torch.tensor(values, dtype=torch.float32))


@pytest.fixture(scope="module")
def fam(tiny_llama_family):
    return {k: load(v) for k, v in tiny_llama_family.items()}


def test_orthogonal_rank_one_task_vectors():
    # τ1 = 3·e1e1ᵀ, τ2 = 1·e2e2ᵀ: orthogonal singular vectors.
    base = torch.zeros(2, 2)
    t1, t2 = diag(3, 0), diag(0, 1)
    # TSV-M keeps each task's top 2/2 = 1 direction; they are already orthogonal: task arithmetic.
    assert torch.allclose(call("tsv_m", base, [t1, t2]), diag(3, 1), atol=1e-6)
    # Iso-C flattens the spectrum {3, 1} of the sum to its mean 2.
    assert torch.allclose(call("iso_c", base, [t1, t2]), diag(2, 2), atol=1e-6)
    # λ scales the merged matrix, and the base is added back.
    assert torch.allclose(call("iso_c", torch.ones(2, 2), [t1 + 1, t2 + 1], **{"lambda": 0.5}),
                          torch.ones(2, 2) + diag(1, 1), atol=1e-6)


def test_tsv_m_truncates_each_task_to_rank_over_t():
    # 4×4, two tasks: each keeps its top 2 directions. τ1's third direction (1·e3e3ᵀ) is dropped,
    # so the merge is diag(4, 2, 3, 1), not task arithmetic's diag(4, 2, 4, 1).
    t1, t2 = diag(4, 2, 1, 0), diag(0, 0, 3, 1)
    out = call("tsv_m", torch.zeros(4, 4), [t1, t2])
    assert torch.allclose(out, diag(4, 2, 3, 1), atol=1e-5)
    assert not torch.allclose(out, t1 + t2, atol=1e-2)


def test_tsv_m_decorrelates_overlapping_directions():
    # Both tasks' top direction is close to e1 (rank 1 each, 2×2): the concatenated U = [u1, u2] is
    # replaced by its nearest orthogonal matrix, so the two directions no longer add up along e1.
    c, s = 0.8, 0.6
    u1, u2 = torch.tensor([1.0, 0.0]), torch.tensor([c, s])
    t1, t2 = 2 * torch.outer(u1, u1), 2 * torch.outer(u2, u2)
    out = call("tsv_m", torch.zeros(2, 2), [t1, t2])
    uo = nearest_orthogonal(torch.stack([u1, u2], dim=1))
    expected = uo @ torch.diag(torch.tensor([2.0, 2.0])) @ uo.T
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(uo.T @ uo, torch.eye(2), atol=1e-6)  # orthogonal
    assert not torch.allclose(out, t1 + t2, atol=1e-2)  # unlike task arithmetic


def test_iso_cts_hand_computed_and_differs_from_iso_c():
    # 3×3, two tasks, fraction 0.5: k_c = 1 common direction, 1 per task.
    assert common_space_size(3, 2, 0.5) == (1, 1)
    t1 = diag(4, 2, 0)        # sum = diag(7, 2.5, 1); common direction e1 (σ 7)
    t2 = diag(3, 0.5, 1)      # task-specific: τ1 → e2 (σ 2), τ2 → e3 (σ 1; its 0.5·e2 is not its top)
    out = call("iso_cts", torch.zeros(3, 3), [t1, t2], common_space_fraction=0.5)
    assert torch.allclose(out, torch.eye(3) * (7 + 2 + 1) / 3, atol=1e-5)
    # Iso-C flattens the sum's own spectrum {7, 2.5, 1} instead: 3.5·I.
    assert torch.allclose(call("iso_c", torch.zeros(3, 3), [t1, t2]), torch.eye(3) * 3.5, atol=1e-5)


def test_common_space_size_matches_the_authors_rounding():
    assert common_space_size(768, 8, 0.8) == (616, 19)  # ⌊614.4⌋ = 614 → 154/8 = 19.25 → 152
    assert common_space_size(10, 4, 0.8) == (10, 0)     # 2/4 rounds (half to even) to 0
    assert common_space_size(7, 2, 0.0) == (1, 3)       # round(3.5) = 4 → 8 > 7: one task-block less


def test_flat_spectra_and_one_task():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    tasks = [base + torch.randn(6, 4, generator=g) for _ in range(3)]
    for name, kw in (("iso_c", {}), ("iso_cts", {}), ("iso_cts", {"common_space_fraction": 0.25})):
        sv = torch.linalg.svdvals(call(name, base, tasks, **kw) - base)
        assert torch.allclose(sv, sv.mean().expand_as(sv), atol=1e-4), name  # isotropic
    ta = sum(t - base for t in tasks)
    assert not torch.allclose(torch.linalg.svdvals(ta), torch.linalg.svdvals(ta).mean().expand(4), atol=1e-1)
    # One task: TSV-M returns it; Iso-CTS's common + task-specific directions are all of its own: Iso-C.
    assert torch.allclose(call("tsv_m", base, tasks[:1]), tasks[0], atol=1e-5)
    assert torch.allclose(call("iso_cts", base, tasks[:1]), call("iso_c", base, tasks[:1]), atol=1e-5)
    # Vectors (norms, biases) take the mean task vector.
    b1 = torch.zeros(4)
    assert torch.allclose(call("iso_c", b1, [torch.ones(4), torch.full((4,), 3.0)]), torch.full((4,), 2.0))


def test_iso_cts_projects_on_the_output_side_of_a_transposed_weight():
    g = torch.Generator().manual_seed(1)
    base = torch.zeros(6, 4)
    tasks = [torch.randn(6, 4, generator=g) for _ in range(2)]
    out = call("iso_cts", base, tasks, common_space_fraction=0.5)
    stored_in_out = call("iso_cts", base.T, [t.T for t in tasks], transposed=True, common_space_fraction=0.5)
    assert torch.allclose(stored_in_out, out.T, atol=1e-5)
    # non-vacuous: projecting on the other side gives another matrix
    other_side = call("iso_cts", base.T, [t.T for t in tasks], common_space_fraction=0.5)
    assert not torch.allclose(other_side, out.T, atol=1e-3)
    # TSV-M and Iso-C do not depend on the side
    for name in ("tsv_m", "iso_c"):
        assert torch.allclose(call(name, base.T, [t.T for t in tasks]), call(name, base, tasks).T, atol=1e-5)


def test_engine_one_model_identities(tmp_path, tiny_llama_family, fam):
    f = tiny_llama_family
    one = f"base_model: {f['base']}\nmodels:\n  - model: {f['ft1']}\n"
    tsv, _ = merge(tmp_path, f"merge_method: tsv_m\n{one}", "tsv")
    for k in tsv:
        assert torch.allclose(tsv[k], fam["ft1"][k], atol=1e-5), k
    assert not torch.equal(fam["ft1"][MID], fam["base"][MID])
    iso, _ = merge(tmp_path, f"merge_method: iso_c\n{one}", "iso")
    cts, _ = merge(tmp_path, f"merge_method: iso_cts\n{one}", "cts")
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.allclose(iso[norm], fam["ft1"][norm], atol=1e-6)  # vectors: the mean task vector
    assert not torch.allclose(iso[MID], fam["ft1"][MID], atol=1e-3)  # matrices: the spectrum is flattened
    for k in iso:
        assert torch.allclose(cts[k], iso[k], atol=1e-5), k


def test_lines_scales_the_svd_merges(tmp_path, tiny_llama_family, fam):
    f = tiny_llama_family
    recipe = (f"merge_method: iso_c\nbase_model: {f['base']}\n"
              f"models:\n  - model: {f['ft1']}\n  - model: {f['ft2']}\n")
    plain, _ = merge(tmp_path, recipe, "plain")
    half, _ = merge(tmp_path, recipe + "lines: {alpha: 0.5, beta: 0.0}\n", "half")
    b = fam["base"][MID]
    assert torch.allclose(half[MID], b + 0.5 * (plain[MID] - b), atol=1e-6)
    assert not torch.allclose(half[MID], plain[MID], atol=1e-4)


def test_gpt2_weights_merge(tmp_path, tiny_gpt2_family):
    f = tiny_gpt2_family
    for name in ("tsv_m", "iso_c", "iso_cts"):
        out, result = merge(tmp_path, f"merge_method: {name}\nbase_model: {f['base']}\n"
                                      f"models:\n  - model: {f['ft1']}\n  - model: {f['ft2']}\n", name)
        assert all(torch.isfinite(t).all() for t in out.values()) and result.tensors_changed > 0


def test_engine_tells_iso_cts_a_conv1d_weight_is_stored_in_out(tmp_path, tiny_gpt2_family):
    # GPT-2's c_fc is a Conv1D, stored [in, out]: the engine passes transposed=True from the
    # architecture map, so the merged tensor is the per-tensor method's with that flag.
    f = tiny_gpt2_family
    out, _ = merge(tmp_path, f"merge_method: iso_cts\nbase_model: {f['base']}\n"
                             f"models:\n  - model: {f['ft1']}\n  - model: {f['ft2']}\n", "iso_cts")
    name = next(k for k in out if k.endswith("h.0.mlp.c_fc.weight"))
    base, ft1, ft2 = (load(f[k])[name] for k in ("base", "ft1", "ft2"))
    assert torch.allclose(out[name], call("iso_cts", base, [ft1, ft2], transposed=True), atol=1e-5)
    assert not torch.allclose(out[name], call("iso_cts", base, [ft1, ft2]), atol=1e-4)  # non-vacuous
    head = next(k for k in out if k.endswith("wte.weight"))  # an embedding is no Conv1D: not transposed
    b, a1, a2 = (load(f[k])[head] for k in ("base", "ft1", "ft2"))
    assert torch.allclose(out[head], call("iso_cts", b, [a1, a2]), atol=1e-5)
