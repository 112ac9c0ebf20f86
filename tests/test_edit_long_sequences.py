"""The options for long edit sequences: how v* stops (MPES, L-BFGS), MEMIT's norm ridge, the guards against
the shared direction, and further passes for facts not yet reached. The fixtures are test_edit's."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from checkpoints.arch import spec_for
from checkpoints.errors import WeightsmithError
from editing.request import EditRequest, target_ids
from editing.rome import RomeHyperParams
from test_edit import (EIFFEL, FAST, corpus_file, load, session_for, sharp_dirs, stats,  # noqa: F401 (fixtures)
                       tiny_llama_dir)


def test_mpes_stops_at_the_first_step_where_the_target_is_most_probable(tiny_llama_dir):
    """early_stop="argmax" (MPES) ends v*'s optimisation at the first step where every target token is the
    argmax in every prompt of the loss; the loss rule goes on. Checked by an independent forward pass with
    δ added at the subject's last token: true at the step it stopped, false one step earlier."""
    from editing.hooks import patch_output
    from editing.request import tokenise
    from editing.rome import compute_value, prefixed

    model, tok = load(tiny_llama_dir)
    spec = spec_for("llama")
    # The sharpened tiny model's logits are hard to move from one position: a bare prompt and a target
    # it can reach (the argmax after ~27 steps) keep the test about the stopping rule.
    req = EditRequest(EIFFEL.prompt, EIFFEL.subject, "Italy")
    prefixes: list[str] = []
    module = spec.module("mlp_out", 1)
    hp = replace(FAST, v_steps=60, early_stop_loss=0.0, v_prompts=None, kl_factor=0.0, clamp_norm_factor=100.0,
                 v_lr=3.0, v_weight_decay=0.0)
    tgt = target_ids(tok, req.target)

    def target_is_argmax_everywhere(delta) -> bool:
        for text in prefixed(prefixes, req.text):
            t = tokenise(tok, text, req.subject, subject_at=len(text) - len(req.text) + req.text.find(req.subject),
                         target=tgt)
            at = torch.zeros(1, len(t.ids), 1)
            at[0, t.subject_last, 0] = 1.0
            with torch.no_grad(), patch_output(model, module, lambda y: y + at * delta):
                logits = model(input_ids=torch.tensor([t.ids])).logits[0]
            if not all(int(logits[t.prompt_len - 1 + i].argmax()) == tok_id for i, tok_id in enumerate(tgt)):
                return False
        return True

    d_loss, _, info_loss = compute_value(model, tok, spec, req, 1, prefixes, hp)
    d_mpes, _, info_mpes = compute_value(model, tok, spec, req, 1, prefixes, replace(hp, early_stop="argmax"))
    stop = info_mpes["steps"]
    assert info_loss["steps"] == 60 and 1 < stop < 60
    assert float(d_mpes.norm()) < float(d_loss.norm())  # the point of MPES: a smaller change
    # The loop checks before each update: stopping at step s returns δ after s-1 updates, and the check
    # at step s-1 (δ after s-2 updates) failed.
    assert target_is_argmax_everywhere(d_mpes)
    d_before, _, _ = compute_value(model, tok, spec, req, 1, prefixes, replace(hp, v_steps=stop - 2))
    assert not target_is_argmax_everywhere(d_before)
    with pytest.raises(WeightsmithError, match="early_stop"):
        compute_value(model, tok, spec, req, 1, prefixes, replace(hp, early_stop="soon"))


def test_lbfgs_v_star_stops_at_the_first_point_that_meets_the_rule_with_a_smaller_delta(demo_dir):
    """v_optimizer="lbfgs" keeps the first evaluated δ whose target NLL is below early_stop_loss (every
    earlier evaluation was above it, and an independent forward pass with that δ gives the recorded NLL),
    and on the real model reaches the target with far less change than Adam's per-coordinate steps
    (which run into the clamp). MEMIT's target: the residual after block 5, one prompt, KL term on."""
    from editing.hooks import patch_output
    from editing.memit import MemitHyperParams, value_hparams
    from editing.request import tokenise
    from editing.rome import compute_value

    model, tok = load(demo_dir)
    spec = spec_for("llama")
    module = spec.block(5)
    hp = value_hparams(MemitHyperParams(v_steps=40), RomeHyperParams(early_stop_loss=0.05))
    req = EIFFEL
    tgt = target_ids(tok, req.target)

    def target_nll(delta) -> float:
        t = tokenise(tok, req.text, req.subject, subject_at=req.text.find(req.subject), target=tgt)
        at = torch.zeros(1, len(t.ids), 1)
        at[0, t.subject_last, 0] = 1.0
        with torch.no_grad(), patch_output(model, module, lambda y: y + at * delta):
            logp = torch.log_softmax(model(input_ids=torch.tensor([t.ids])).logits[0].float(), -1)
        return -float(sum(logp[t.prompt_len - 1 + i, tok_id] for i, tok_id in enumerate(tgt))) / len(tgt)

    d_adam, v, info_adam = compute_value(model, tok, spec, req, 5, [], hp, module=module)
    d_lbfgs, _, info = compute_value(model, tok, spec, req, 5, [], replace(hp, v_optimizer="lbfgs"), module=module)
    nll = info["nll"]
    assert nll[0] > 1.0 and len(nll) > 2  # not reached before optimising
    assert nll[-1] < 0.05 and all(x >= 0.05 for x in nll[:-1])
    assert target_nll(d_lbfgs) == pytest.approx(nll[-1], abs=2e-3)
    assert info_adam["nll"][-1] < 0.05  # both reached the target ...
    assert float(d_lbfgs.norm()) < 0.5 * float(d_adam.norm())  # ... L-BFGS with far less change
    with pytest.raises(WeightsmithError, match="v_optimizer"):
        compute_value(model, tok, spec, req, 5, [], replace(hp, v_optimizer="sgd"), module=module)


def two_memit_edits(folder, corpus_file, stats, **memit_settings):
    """A MEMIT session (layers 1-2) after two facts, one after the other: (session, first, second)."""
    from editing.memit import MemitHyperParams

    reqs = [EditRequest(EIFFEL.prompt, EIFFEL.subject, "Rome"), EditRequest("{} is the capital of", "Madrid", "Italy")]
    s = session_for(folder, corpus_file, stats, method="memit",
                    memit_hparams=MemitHyperParams(v_steps=5, **memit_settings))
    first = s.apply_batch(reqs[:1], layers=[1, 2])
    second = s.apply_batch(reqs[1:], layers=[1, 2])
    return s, first, second


def test_memit_norm_ridge_and_edit_keys(tiny_llama_dir, corpus_file, stats):
    """norm_ridge shrinks every layer's update; keep_edit_keys keeps the earlier edit's keys in the solve,
    so the second edit changes the first edit's key's outputs less than without them."""

    def run(**kw):
        s, first, second = two_memit_edits(tiny_llama_dir, corpus_file, stats, **kw)
        # what the second edit does at the first edit's keys, per layer
        moved = sum(float((second.deltas[s.spec.module("mlp_out", layer) + ".weight"] @ first.keys[layer].T).norm())
                    for layer in (1, 2))
        return first, moved

    plain, moved_plain = run()
    ridged, _ = run(norm_ridge=10.0)
    kept, moved_kept = run(keep_edit_keys=True)
    norm = lambda e: sum(float(d.norm()) for d in e.deltas.values())  # noqa: E731
    assert norm(ridged) < 0.9 * norm(plain)
    assert torch.equal(kept.factors[next(iter(kept.factors))][1], plain.factors[next(iter(plain.factors))][1])
    assert moved_kept < 0.8 * moved_plain, (moved_kept, moved_plain)  # 1.32 against 2.08 when written


def test_memit_shared_key_guard_leaves_the_shared_direction_alone(tiny_llama_dir, corpus_file, stats):
    """shared_key_guard: the second edit's update is exactly blind to ŵ = C⁻¹k̄ (k̄ the first edit's
    key), and among updates blind to ŵ it is MEMIT's least-squares one; without the guard it is not blind."""
    from editing.memit import _without_directions, shared_key_direction

    def second_update(**kw):
        s, first, second = two_memit_edits(tiny_llama_dir, corpus_file, stats, **kw)
        Cs = s.statistics([1, 2])
        w = {layer: shared_key_direction(Cs[layer], first.keys[layer].T) for layer in (1, 2)}
        return s, second, w

    s, plain, w = second_update()
    _, guarded, w_g = second_update(shared_key_guard=True)
    for layer in (1, 2):
        assert torch.allclose(w[layer], w_g[layer])  # the first edits are the same with and without
        module = s.spec.module("mlp_out", layer)
        along = lambda e: float((e.deltas[module + ".weight"].double() @ w[layer]).norm())  # noqa: E731
        assert along(plain) > 1e-3  # not vacuous: an unguarded update does respond along ŵ
        assert along(guarded) < 1e-6 * float(guarded.deltas[module + ".weight"].norm())
    # The constrained solution, hand-checked for one and for two directions: X = M⁻¹K − M⁻¹W (WᵀM⁻¹W)⁻¹ WᵀM⁻¹K
    # satisfies WᵀX = 0 and beats every other X' = X + t·u with Wᵀu = 0 on the normal equations' quadratic form.
    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    M = B @ B.T + torch.eye(6, dtype=torch.float64)
    K = torch.randn(6, 2, generator=g, dtype=torch.float64)
    objective = lambda Y: float(torch.trace(Y.T @ M @ Y) - 2 * torch.trace(Y.T @ K))  # noqa: E731
    for n_dirs in (1, 2):
        W, _ = torch.linalg.qr(torch.randn(6, n_dirs, generator=g, dtype=torch.float64))
        X = _without_directions(torch.linalg.solve(M, K), M, W)
        assert float((W.T @ X).abs().max()) < 1e-12
        assert float((W.T @ torch.linalg.solve(M, K)).abs().max()) > 1e-3  # the unconstrained one is not blind
        for _ in range(5):
            u = torch.randn(6, 2, generator=g, dtype=torch.float64)
            u = u - W @ (W.T @ u)
            assert objective(X + 0.1 * u) > objective(X)


def test_memit_gain_guard_leaves_the_cumulative_updates_top_direction_alone(tiny_llama_dir, corpus_file, stats):
    """gain_guard=1: the second edit's update is exactly blind to the top right singular vector of the
    session's update so far (after one edit: the first update's own input direction A₁); without it, not.
    With both guards, the directions are orthonormal and span ŵ and that vector."""
    from editing.memit import (
        MemitHyperParams,
        guard_directions,
        shared_key_direction,
        top_gain_directions,
    )

    s, plain_first, plain = two_memit_edits(tiny_llama_dir, corpus_file, stats)
    _, first, guarded = two_memit_edits(tiny_llama_dir, corpus_file, stats, gain_guard=1)
    Cs = s.statistics([1, 2])
    for layer in (1, 2):
        module = s.spec.module("mlp_out", layer)
        B1, A1 = first.factors[module]
        assert torch.equal(A1, plain_first.factors[module][1])  # the guard has nothing to act on at edit 1
        v = top_gain_directions(B1, A1, 1)[:, 0]
        assert torch.allclose(v.abs(), (A1[0] / A1[0].norm()).double().abs(), atol=1e-6)  # rank one: v = ±A₁/‖A₁‖
        plain_along, guarded_along = (float((e.deltas[module + ".weight"].double() @ v).norm()) for e in (plain, guarded))
        assert plain_along > 1e-3
        assert guarded_along < 1e-6 * float(guarded.deltas[module + ".weight"].norm())
        # After one edit both guards name the same direction (M⁻¹k ∝ C⁻¹k): one column is kept.
        one = guard_directions(MemitHyperParams(shared_key_guard=True, gain_guard=1), Cs[layer],
                               first.keys[layer].T, (B1, A1))
        assert one.shape[1] == 1
        # After two they differ: two orthonormal columns spanning both.
        both = guard_directions(MemitHyperParams(shared_key_guard=True, gain_guard=1), Cs[layer],
                                s.prior_keys(layer), s.stacked_factors(module))
        assert both.shape[1] == 2
        assert torch.allclose(both.T @ both, torch.eye(2, dtype=both.dtype), atol=1e-10)
        top_now = top_gain_directions(*s.stacked_factors(module), 1)[:, 0]
        for w in (top_now, shared_key_direction(Cs[layer], s.prior_keys(layer))):
            assert float((w - both @ (both.T @ w)).norm()) < 1e-8  # in the span
    assert guard_directions(MemitHyperParams(), Cs[1], first.keys[1].T, None) is None


def test_memit_further_passes_only_for_facts_not_yet_reached(tiny_llama_dir, corpus_file, stats, monkeypatch):
    """max_passes: after a pass, the facts whose target is not yet the argmax after their own prompt get another
    pass (one more rank per fact per layer); reached facts get none. The argmax test is stubbed here (the tiny
    model never makes the target the argmax) and checked on its own below."""
    import editing.memit as memit_module
    from editing.memit import MemitHyperParams

    reqs = [EditRequest("{} is the capital of", "Madrid", "Italy"), EditRequest(EIFFEL.prompt, EIFFEL.subject, "Rome")]
    hp = MemitHyperParams(v_steps=5, mom2_update_weight=1e3)
    one = session_for(tiny_llama_dir, corpus_file, stats, method="memit", memit_hparams=hp)
    e1 = one.apply_batch(reqs, layers=[1, 2])
    reached = {"Italy"}  # after the first pass only Madrid's fact counts as reached
    monkeypatch.setattr(memit_module, "target_is_argmax", lambda model, tok, r: r.target in reached)
    more = session_for(tiny_llama_dir, corpus_file, stats, method="memit",
                       memit_hparams=replace(hp, max_passes=3))
    e3 = more.apply_batch(reqs, layers=[1, 2])
    assert e1.info["passes"] == 1 and e3.info["passes"] == 3
    for module, (B, A) in e3.factors.items():
        assert B.shape[1] == A.shape[0] == 2 + 1 + 1  # two facts, then the unreached one twice
        assert torch.allclose(B[:, :2], e1.factors[module][0], atol=1e-6)  # the first pass is MEMIT's
    left = e3.info["residual_left"]  # ‖z − h‖ at the top layer after each pass: each pass closes more of it
    assert len(left) == 3 and left[0] == pytest.approx(e1.info["residual_left"][0], rel=1e-5)
    assert left[2] < left[1] < left[0]
    reached.add("Rome")
    done = session_for(tiny_llama_dir, corpus_file, stats, method="memit", memit_hparams=replace(hp, max_passes=3))
    assert done.apply_batch(reqs, layers=[1, 2]).info["passes"] == 1


def test_target_is_argmax_reads_every_target_token(tiny_llama_dir):
    from editing.evaluate import target_logprobs
    from editing.memit import target_is_argmax

    model, tok = load(tiny_llama_dir)
    for prompt in ("The Eiffel Tower is located in the city of", "The Eiffel Tower is", "The Eiffel Tower plays",
                   "The Eiffel Tower speaks", "The Eiffel Tower is in"):
        with torch.no_grad():
            best = int(model(**tok(prompt, return_tensors="pt")).logits[0, -1].argmax())
        piece = tok.convert_ids_to_tokens(best)
        if piece.startswith("Ġ"):  # a word the target tokenisation (leading space) gives back
            word = piece[1:]
            break
    assert target_ids(tok, word) == [best]
    assert target_is_argmax(model, tok, EditRequest(prompt, "Eiffel Tower", word))
    other = "Rome" if word != "Rome" else "Paris"
    assert not target_is_argmax(model, tok, EditRequest(prompt, "Eiffel Tower", other))
    assert target_logprobs(model, tok, [prompt], [word])[0] > target_logprobs(model, tok, [prompt], [other])[0]
