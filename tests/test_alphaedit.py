"""AlphaEdit (null-space projected updates), r-ROME and the method choice on tiny random models."""

from __future__ import annotations

import pytest
import torch

from checkpoints.errors import WeightsmithError
from editing.alphaedit import AlphaEditHyperParams, alphaedit_factors, nullspace_projector
from editing.methods import check_method
from editing.request import EditRequest
from editing.rome import RomeHyperParams
from editing.stats import StatsCache

from test_edit import EIFFEL, FAST, corpus_file, same, session_for, sharp_dirs, snapshot, stats, tlp  # noqa: F401

# The tiny corpus's C has eigenvalues 0.04..7.5 at layer 1 (a flat spectrum): 1.0 keeps 42 of 48
# the directions, the authors' 2e-2 none (their keys come from a trained model on Wikipedia).
ALPHA = AlphaEditHyperParams(nullspace_threshold=1.0, l2=1.0)
MADRID = EditRequest("{} is the capital of", "Madrid", "Italy", layer=1)


def eiffel(layer: int = 1) -> EditRequest:
    return EditRequest(EIFFEL.prompt, EIFFEL.subject, EIFFEL.target, layer=layer)


def delta_out_in(s, edit, layer: int) -> torch.Tensor:
    return s.spec.as_out_in(edit.deltas[f"{s.spec.module('mlp_out', layer)}.weight"]).double()


def preserved_basis(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """Eigenvectors of C with eigenvalue ≥ threshold: the span AlphaEdit must leave alone, ``[in, d]``."""
    evals, evecs = torch.linalg.eigh(C.double())
    return evecs[:, evals >= threshold]


def relative_effect(dW: torch.Tensor, keys: torch.Tensor) -> float:
    """max over columns k of ‖ΔW k‖ / (‖ΔW‖ ‖k‖)."""
    return float(((dW @ keys).norm(dim=0) / (dW.norm() * keys.norm(dim=0))).max())


def test_methods_named():
    assert check_method("R_ROME") == "r-rome" and check_method(None) == "patch"  # the measured default
    with pytest.raises(WeightsmithError, match="unknown editing method 'fancy'.*alphaedit-memit"):
        check_method("fancy")
    from editing.methods import batch_method

    # A batch keeps the chosen family: AlphaEdit's projection, else MEMIT (ROME edits one fact at a time).
    assert [batch_method(m) for m in ("rome", "r-rome", "alphaedit", "memit", "alphaedit-memit", "patch")] == [
        "memit", "memit", "alphaedit-memit", "memit", "alphaedit-memit", "patch"]


def test_projector_is_an_orthogonal_projector_onto_small_eigenvalues():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 12, generator=g) * torch.linspace(0.05, 3.0, 12)  # eigenvalues ≈ scale²
    C = X.T @ X / 200
    P, kept = nullspace_projector(C, 0.1)
    evals, evecs = torch.linalg.eigh(C.double())
    assert 0 < kept < 12 and kept == int((evals < 0.1).sum())  # non-vacuous: some kept, some not
    P64 = P.double()
    torch.testing.assert_close(P64 @ P64, P64, atol=1e-6, rtol=0)
    torch.testing.assert_close(P64, P64.T, atol=1e-7, rtol=0)
    assert abs(float(P64.trace()) - kept) < 1e-5
    assert float((P64 @ evecs[:, evals >= 0.1]).norm()) < 1e-5  # large-eigenvalue directions removed
    torch.testing.assert_close(P64 @ evecs[:, evals < 0.1], evecs[:, evals < 0.1], atol=1e-6, rtol=0)  # others kept
    with pytest.raises(WeightsmithError, match="no eigenvalue.*below the null-space threshold"):
        nullspace_projector(C, 1e-9)


def test_alphaedit_factors_match_the_closed_form():
    g = torch.Generator().manual_seed(1)
    d_in, d_out, n, m = 10, 7, 2, 3
    U = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))[0]
    P = U[:, :6] @ U[:, :6].T
    K1, Kp = torch.randn(d_in, n, generator=g, dtype=torch.float64), torch.randn(d_in, m, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    lam = 0.5
    B, A = alphaedit_factors(R, K1, P, Kp, l2=lam)
    # Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁K₁ᵀ P + λI)⁻¹, the paper's equation, written out directly
    expected = R @ K1.T @ P @ torch.linalg.inv(Kp @ Kp.T @ P + K1 @ K1.T @ P + lam * torch.eye(d_in, dtype=torch.float64))
    assert B.shape == (d_out, n) and A.shape == (n, d_in)
    torch.testing.assert_close((B.double() @ A.double()), expected, atol=1e-5, rtol=1e-5)
    preserved = U[:, 6:]
    assert float((expected @ preserved).norm()) < 1e-10 * float(expected.norm())  # exactly zero on the preserved span
    assert float((expected @ K1 - R).norm()) > 1e-2  # the ridge solution does not reach R exactly ...
    # more keys than dimensions: the direct d×d solve instead of Woodbury's r×r one, same result
    Kmany = torch.randn(d_in, 9, generator=g, dtype=torch.float64)
    Bm, Am = alphaedit_factors(R, K1, P, Kmany, l2=lam)
    direct = R @ K1.T @ P @ torch.linalg.inv((Kmany @ Kmany.T + K1 @ K1.T) @ P + lam * torch.eye(d_in, dtype=torch.float64))
    torch.testing.assert_close(Bm.double() @ Am.double(), direct, atol=1e-5, rtol=1e-5)
    Be, Ae = alphaedit_factors(R, K1, P, Kp, l2=lam, exact=True)
    torch.testing.assert_close(Be.double() @ (Ae.double() @ K1), R, atol=1e-4, rtol=1e-4)  # ... exact=True does
    assert float((Be.double() @ Ae.double() @ preserved).norm()) < 1e-5


@pytest.fixture
def llama(sharp_dirs):  # noqa: F811
    return sharp_dirs["llama"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D stores W transposed
def test_alphaedit_preserves_the_span_and_reaches_the_target(arch, sharp_dirs, corpus_file, stats):  # noqa: F811
    s = session_for(sharp_dirs[arch], corpus_file, stats, alpha_hparams=ALPHA)
    original = snapshot(s.model)
    C = s.statistics(1)[1]
    keep = preserved_basis(C, ALPHA.nullspace_threshold)
    assert 0 < keep.shape[1] < C.shape[0]
    lp0 = tlp(s, EIFFEL)
    rome = s.apply(eiffel(), method="rome")
    dW_rome = delta_out_in(s, rome, 1)
    s.undo(rome.id)
    e = s.apply(eiffel(), method="alphaedit")
    dW = delta_out_in(s, e, 1)
    assert e.method == "alphaedit" and s.history[0]["method"] == "alphaedit"
    B, A = e.factors[s.spec.module("mlp_out", 1)]
    assert B.shape == (dW.shape[0], 1) and A.shape == (1, dW.shape[1])  # still rank one: LoRA export holds
    module = s.spec.module("mlp_out", 1)
    tensors, ranks = s.adapter_tensors()
    assert ranks == {module: 1} and torch.equal(
        s.spec.from_out_in(tensors[f"base_model.model.{module}.lora_B.weight"] @ tensors[f"base_model.model.{module}.lora_A.weight"]),
        e.deltas[f"{module}.weight"])
    assert relative_effect(dW, keep) < 1e-5  # ‖ΔW k₀‖ ≈ 0 for every preserved key k₀
    assert relative_effect(dW_rome, keep) > 1e-2  # non-vacuous: plain ROME moves them
    assert tlp(s, EIFFEL) > lp0 + 0.3  # and the edit still reaches the new target
    assert e.info["nullspace_dim"] == C.shape[0] - keep.shape[1]
    s.undo(e.id)
    assert same(snapshot(s.model), original)  # undo stays bit-exact


def test_sequential_keys_constrain_later_edits_until_undone(llama, corpus_file, stats):  # noqa: F811
    s = session_for(llama, corpus_file, stats, alpha_hparams=ALPHA, method="alphaedit")
    original = snapshot(s.model)
    first = s.apply(eiffel())
    k1 = first.keys[1]  # [1, in]: k* of the first edit
    assert s.prior_keys(1).shape == (k1.shape[1], 1) and s.prior_keys(2) is None
    second = s.apply(MADRID)
    assert second.info["prior_keys"] == 1
    pname = f"{s.spec.module('mlp_out', 1)}.weight"  # applying adds in place: the refold's exact bits
    assert torch.equal(s.model.get_parameter(pname), (original[pname] + first.deltas[pname]) + second.deltas[pname])
    assert first.deltas[pname] is not first.deltas[pname]  # rank one: rebuilt from B, A when read, not kept
    constrained = float((delta_out_in(s, second, 1) @ k1.double().T).norm())
    s.undo(first.id)
    assert s.prior_keys(1).shape[1] == 1  # only the second edit's key is left
    s.undo(second.id)
    assert s.prior_keys(1) is None and same(snapshot(s.model), original)
    alone = s.apply(MADRID)
    assert alone.info["prior_keys"] == 0  # the undone edit's key no longer constrains
    free = float((delta_out_in(s, alone, 1) @ k1.double().T).norm())
    assert constrained < 0.5 * free, (constrained, free)  # K_p made the second update spare k1
    s.undo(alone.id)
    assert same(snapshot(s.model), original)


def test_r_rome_is_the_update_at_the_mean_key(llama, corpus_file, stats):  # noqa: F811
    s = session_for(llama, corpus_file, stats)
    a = s.apply(eiffel(), method="r-rome")
    dA = delta_out_in(s, a, 1)
    s.undo(a.id)
    b = s.apply(eiffel(), method="rome")
    dB = delta_out_in(s, b, 1)
    s.undo(b.id)
    mean_session = session_for(llama, corpus_file, stats, method="rome",
                               hparams=RomeHyperParams(**{**FAST.__dict__, "update_at": "mean"}))
    c = mean_session.apply(eiffel())
    assert torch.equal(delta_out_in(mean_session, c, 1), dA)  # r-rome == rome with update_at="mean"
    assert (dA - dB).abs().max() > 1e-3  # and differs from the prompt-key update
    assert a.info["update_at"] == "mean" and b.info["update_at"] == "prompt"


def test_alphaedit_memit_batch_projects_every_layer(llama, corpus_file, stats):  # noqa: F811
    from editing.memit import MemitHyperParams

    s = session_for(llama, corpus_file, stats, alpha_hparams=ALPHA, memit_hparams=MemitHyperParams(v_steps=25))
    original = snapshot(s.model)
    reqs = [EditRequest(EIFFEL.prompt, EIFFEL.subject, "Rome"), EditRequest("{} is the capital of", "Madrid", "Italy")]
    lp0 = [tlp(s, r) for r in reqs]
    e = s.apply_batch(reqs, layers=[1, 2], method="alphaedit-memit")
    assert e.method == "alphaedit-memit" and set(e.keys) == {1, 2} and e.keys[1].shape[0] == 2
    assert all(b > a + 0.1 for a, b in zip(lp0, [tlp(s, r) for r in reqs]))
    for layer in (1, 2):
        keep = preserved_basis(s.statistics(layer)[layer], ALPHA.nullspace_threshold)
        dW = delta_out_in(s, e, layer)
        assert dW.abs().max() > 1e-4 and relative_effect(dW, keep) < 1e-5
        pname = f"{s.spec.module('mlp_out', layer)}.weight"
        assert e.deltas[pname] is e.deltas[pname]  # rank 2: kept (a sum's rounding may depend on the BLAS path)
    with pytest.raises(WeightsmithError, match="one fact at a time"):
        s.apply_batch(reqs, method="rome")
    one = s.apply(EditRequest("{} is the capital of", "Madrid", "Italy", layer=2), method="memit")
    top = min(s.num_layers - 1, 3)  # the four around the request's layer: two below it to one above
    assert one.method == "memit" and one.layers == list(range(max(0, top - 3), top + 1)) and 2 in one.layers
    s.undo(one.id)
    s.undo(e.id)
    assert same(snapshot(s.model), original)


def test_statistics_and_projector_describe_the_unedited_model(llama, corpus_file, tmp_path):  # noqa: F811
    cache = StatsCache(tmp_path / "st")
    s = session_for(llama, corpus_file, cache, alpha_hparams=ALPHA)
    C2 = s.statistics(2)[2]
    base_key = cache.key(s.model, s.spec, 2, s.corpus, 100_000)
    s.apply(eiffel(layer=1))  # changes what layer 2's keys are
    assert cache.key(s.model, s.spec, 2, s.corpus, 100_000) != base_key  # non-vacuous: the edited model differs
    edited = snapshot(s.model)
    assert torch.equal(s.statistics(2)[2], C2)  # still the base model's (from the cache, not recomputed)
    assert same(snapshot(s.model), edited)  # and the edit is back in place, bit for bit
    P, kept = s.projectors(2)[2]
    names = sorted(p.name for p in (tmp_path / "st").glob("*.safetensors"))
    assert len(names) == 3 and sum(n.endswith("-P1.safetensors") for n in names) == 1  # C of layers 1, 2; P next to them
    fresh = StatsCache(tmp_path / "st", memory=False)  # from disk: the same projector
    s.stats = fresh
    P2, kept2 = s.projectors(2)[2]
    assert torch.equal(P, P2) and kept == kept2
