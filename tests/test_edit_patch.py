"""The patch method (key-gated neurons, editing.patch): its mechanics on a tiny random Llama, what it
leaves alone on the demo model.

A random model has no near-constant input direction for the gate's threshold (a trained one does:
RMSNorm's output carries a large common mean; 2 % spread on the demo model), so the tiny fixture gives
its residual stream one, as trained models have (a "massive activation" dimension). Its subjects are
not distinct from its text (random embeddings, a 30-word corpus), so whether a patch leaves other text
alone is tested on the demo model, where subjects are.
"""

from __future__ import annotations

import copy

import pytest
import torch

from checkpoints.errors import WeightsmithError
from editing.patch import PatchHyperParams, is_patch_parameter, subject_detector
from editing.request import EditRequest

from test_edit import EIFFEL, corpus_file, load, session_for, snapshot, stats, tlp  # noqa: F401

LAYER = 1
TOWER = EditRequest(EIFFEL.prompt, EIFFEL.subject, EIFFEL.target, layer=LAYER)
MADRID = EditRequest("{} is the capital of", "Madrid", "Italy", layer=LAYER)
BERLIN = EditRequest("{} is in", "Berlin", "Spain", layer=LAYER)
NEUTRAL = "the capital of France is Paris . Rome is in Italy ."  # no edited subject


@pytest.fixture(scope="module")
def biased_llama(tmp_path_factory):
    from conftest import build_tiny_llama, save_model

    from test_edit import _sharp

    model = _sharp(build_tiny_llama(0))
    with torch.no_grad():  # one residual dimension far larger than the rest, the same for every token
        model.model.embed_tokens.weight[:, 0] = 4.0
    return save_model(model, tmp_path_factory.mktemp("biased-llama"))


def patch_session(folder, corpus_file, stats, **kw):
    kw.setdefault("patch_hparams", PatchHyperParams(capacity=2))
    return session_for(folder, corpus_file, stats, method="patch", **kw)


def base_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in snapshot(model).items() if not is_patch_parameter(k)}


def logits(s, text: str) -> torch.Tensor:
    ids = s.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return s.model(input_ids=ids).logits[0].double()


def test_detector_is_one_at_the_subject_and_thresholds_against_the_constant_direction():
    g = torch.Generator().manual_seed(0)
    d, n = 6, 4000
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X[:, 0] = 5.0 + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)  # the near-constant direction
    aug = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    M_aug = aug.T @ aug / n
    subject = torch.tensor([[5.0, 12.0, -9.0, 0.0, 6.0, 8.0]], dtype=torch.float64)  # ~18 sd from text
    hp = PatchHyperParams(threshold=0.5, sharpness=50.0, ridge=0.0)
    det = subject_detector(M_aug, subject, torch.nn.SiLU(), hp)
    M, mu = M_aug[:d, :d], M_aug[:d, d]
    w = torch.linalg.solve(M, subject[0]) / (subject[0] @ torch.linalg.solve(M, subject[0]))  # one prompt: anchors coincide
    m = torch.linalg.solve(M, mu) / (mu @ torch.linalg.solve(M, mu))
    # gate = α(w − τm), up = m, by hand
    torch.testing.assert_close(det.gate.double(), 50.0 * (w - 0.5 * m), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(det.up.double(), m, atol=1e-5, rtol=1e-4)
    assert abs(det.scores[0] - 1.0) < 1e-3  # s(x̄) = 1
    up_on_text = X @ m
    assert abs(float(up_on_text.mean()) - 1.0) < 0.01 and float(up_on_text.std()) < 0.05
    x = subject[0].float()
    expected = torch.nn.functional.silu(x @ det.gate) * (x @ det.up)
    assert abs(det.activation_at_subject - float(expected)) < 1e-4 and det.activation_at_subject > 20.0
    # Text barely opens the gate: its activations are tiny beside the subject's.
    text_act = det.activation(torch.nn.SiLU(), X.float())
    assert float(text_act.abs().max()) < 1e-3 * det.activation_at_subject
    with pytest.raises(WeightsmithError, match="nearly constant on text"):
        Y = torch.randn(n, d, generator=g, dtype=torch.float64)  # no constant direction at all
        aug = torch.cat([Y, torch.ones(n, 1, dtype=torch.float64)], dim=1)
        subject_detector(aug.T @ aug / n, subject, torch.nn.SiLU(), hp)


def test_statistics_M_is_the_augmented_second_moment(biased_llama, corpus_file, stats):
    from editing.hooks import capture_input, run_until
    from editing.stats import SEQ_LEN, text_batches

    s = patch_session(biased_llama, corpus_file, stats)
    M = s.statistics(LAYER, kind="M")[LAYER].double()
    rows = []
    for chunk in text_batches(s.tokenizer, corpus_file.read_text(), 100_000, min(SEQ_LEN, 128)):  # max positions
        with capture_input(s.model, s.spec.module("mlp", LAYER)) as seen:
            run_until(s.model, s.spec.module("mlp", LAYER), input_ids=chunk[None])
        rows.append(seen.value[0].double())
    X = torch.cat(rows)
    # The statistics run the corpus in padded batches: float32 rounding, relative to the matrix's scale.
    scale = float(M.abs().max())
    assert float((M[:-1, :-1] - X.T @ X / len(X)).abs().max()) < 2e-4 * scale
    assert float((M[:-1, -1] - X.mean(0)).abs().max()) < 2e-4 * scale
    assert float(M[-1, -1]) == pytest.approx(1.0) and float(X.mean(0).abs().max()) > 1.0  # non-vacuous mean


def test_patch_writes_the_fact_in_new_neurons_only(biased_llama, corpus_file, stats):
    s = patch_session(biased_llama, corpus_file, stats)
    before_state, before_tlp = base_state(s.model), tlp(s, TOWER)
    e = s.apply(TOWER)
    assert tlp(s, TOWER) > before_tlp + 1.0, "the fact was not written"
    assert e.info["slots"] == [0] and e.info["subject_score_min"] > 0.5 and e.info["bias_spread"] < 0.1
    # Every weight of the model itself is bit-identical: the fact lives in the patch neurons.
    after_state = base_state(s.model)
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    neurons = {k: v for k, v in snapshot(s.model).items() if is_patch_parameter(k)}
    assert len(neurons) == 3 and all(float(v.abs().max()) > 0 for v in neurons.values())
    checks = e.info["checks"]  # measured on the value (down) column against the layer's down projection
    down = s.model.get_parameter(f"{s.spec.module('mlp_out', LAYER)}.weight").detach()
    column = s.model.get_parameter(f"{s.spec.module('mlp', LAYER)}.fact_neurons.down_proj.weight").detach()[:, 0]
    assert checks["update_norm"] == pytest.approx(float(column.norm()), rel=1e-4)
    assert checks["relative_norm"] == pytest.approx(float(column.norm() / down.norm()), rel=1e-3)


@pytest.mark.slow
def test_demo_patch_leaves_other_text_alone(demo_dir, tmp_path):
    """One CounterFact fact on the demo model, held in bfloat16 as a Hub checkpoint would be: written, while
    text without its subject keeps its logits, in the session and in the saved (bfloat16) model."""
    from transformers import AutoModelForCausalLM

    from editing.checks import target_check
    from editing.session import EditSession
    from editing.stats import StatsCache, corpus_from_file

    from test_edit import SHARED

    model, tok = load(demo_dir)
    model.to(torch.bfloat16).float()  # bfloat16 values, computed in float32: what a session makes of a bf16 model
    base = copy.deepcopy(model)
    s = EditSession(model, tok, stats=StatsCache(tmp_path / "stats"), method="patch", stats_tokens=20_000,
                    corpus=corpus_from_file(SHARED / "wikitext-2-raw" / "wiki.test.raw"), store_dtype=torch.bfloat16)
    fact = EditRequest("{}'s mother tongue is", "Danielle Darrieux", "English")
    other = "The capital of France is Paris. Water boils at a hundred degrees, and the river flows to the sea."
    ids = tok(other, return_tensors="pt")["input_ids"]
    fact_ids = tok(fact.text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before, fact_before = model(input_ids=ids).logits.double(), model(input_ids=fact_ids).logits.double()
    e = s.apply(fact)
    with torch.no_grad():
        after, fact_after = model(input_ids=ids).logits.double(), model(input_ids=fact_ids).logits.double()
    assert tlp(s, fact) > -0.7 and e.info["checks"]["generates_target"] == 1
    assert float((after - before).abs().max()) < 1e-3  # the gate stayed shut on every token
    assert float((fact_after - fact_before).abs().max()) > 1.0  # non-vacuous: the subject's prompt moved
    assert e.info["checks"]["unrelated_kl"] < 1e-6 and e.info["subject_score_min"] > 0.5
    # Saved in the stored dtype, the folded neuron still writes the fact and stays shut on the other text.
    out = s.export_model(tmp_path / "bf16")
    report = s.precision_report
    assert report is not None and report.dtype == "bfloat16" and report.checked == report.held == 1
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    width = model.config.intermediate_size
    assert saved.config.intermediate_size == width + 1
    # The reference has the saved shapes with the neuron zeroed: an odd matmul width alone moves float32
    # sums (by 0.013 in these logits), so only the same shapes isolate what the neuron does.
    zeroed = copy.deepcopy(saved)
    with torch.no_grad():
        mlp = zeroed.model.layers[s.default_layer].mlp
        mlp.gate_proj.weight[width:] = 0
        mlp.up_proj.weight[width:] = 0
        mlp.down_proj.weight[:, width:] = 0
        assert float((saved(input_ids=ids).logits - zeroed(input_ids=ids).logits).abs().max()) < 1e-3
    assert target_check(saved, tok, fact.text, fact.target)["generates_target"]
    assert not target_check(zeroed, tok, fact.text, fact.target)["generates_target"]  # non-vacuous
    assert not target_check(base, tok, fact.text, fact.target)["generates_target"]
    # A subject that starts its prompt (no BOS here) is anchored at a text start, and its neuron also opens at
    # other texts' first token: the edit says so (tuning record 117; 11 of the 1,000 report-run neurons did this).
    assert "notes" not in e.info["checks"]  # non-vacuous: "Danielle Darrieux" (ends at position 2) is not flagged
    arthur = s.apply(EditRequest("{} is located in", "Arthur", "California"))
    assert "also opens at the start of unrelated text" in arthur.warning
    assert len(arthur.info["checks"]["notes"]) == 1 and arthur.info["checks"]["notes"][0] in arthur.warning


def test_text_start_warning_names_the_first_token_that_opens_the_gate(tiny_tokenizer):
    from editing.patch import Detector, text_start_warning

    gate = torch.tensor([1.0, 0.0, -1.0])
    det = Detector(gate=gate, up=torch.zeros(3), activation_at_subject=1.0)
    ids = [tiny_tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" Berlin", " Rome", " Madrid")]
    assert len(set(ids)) == 3
    shut = torch.tensor([[-1.0, 0, 0], [0, 0, 2.0], [0, 5.0, 0]])  # pre-activations -1, -2, 0
    assert text_start_warning(det, (shut, ids), tiny_tokenizer, "Paris") == ""
    opens = shut.clone()
    opens[1] = torch.tensor([3.0, 0, 1.0])  # "Rome" at a text start: pre-activation 2
    line = text_start_warning(det, (opens, ids), tiny_tokenizer, "Paris")
    assert "also opens at the start of unrelated text" in line and "' Rome'" in line
    # The subject's own first token at a text start (with its leading space or without) is where the neuron
    # should open: not a warning.
    assert text_start_warning(det, (opens, ids), tiny_tokenizer, "Rome") == ""


def test_undo_growth_and_replay_are_exact(biased_llama, corpus_file, stats):
    s = patch_session(biased_llama, corpus_file, stats)
    original = snapshot(s.model)
    a = s.apply(TOWER)
    b = s.apply(MADRID)
    assert s.model.get_parameter(f"{s.spec.module('mlp', LAYER)}.fact_neurons.gate_proj.weight").shape[0] == 2
    tower_logits = logits(s, TOWER.text)
    c = s.apply(BERLIN)  # a third neuron: capacity 2 doubles to 4
    gate = s.model.get_parameter(f"{s.spec.module('mlp', LAYER)}.fact_neurons.gate_proj.weight")
    assert gate.shape[0] == 4 and c.info["slots"] == [2]
    torch.testing.assert_close(logits(s, TOWER.text), tower_logits, atol=1e-5, rtol=0)  # growth changes nothing
    after_three = snapshot(s.model)
    # A fresh session replays the saved factors (written at widths 2 and 4) to the same bits.
    r = patch_session(biased_llama, corpus_file, stats)
    for e in (a, b, c):
        r.replay(e.method, e.requests, e.layers, e.factors, checks=e.info["checks"])
    replayed = snapshot(r.model)
    assert replayed.keys() == after_three.keys() and all(torch.equal(replayed[k], after_three[k]) for k in replayed)
    # Undo out of order, then all: the slot is free again and the weights are the original ones.
    s.undo(a.id)
    assert float(gate.detach()[0].abs().max()) == 0.0 and float(gate.detach()[1].abs().max()) > 0
    d = s.apply(TOWER)
    assert d.info["slots"] == [0]
    s.undo_all()
    now = snapshot(s.model)
    base = {k: v for k, v in now.items() if not is_patch_parameter(k)}
    assert base.keys() == original.keys() and all(torch.equal(base[k], original[k]) for k in base)
    assert all(float(v.abs().max()) == 0.0 for k, v in now.items() if is_patch_parameter(k))


def test_batch_is_one_entry_with_a_neuron_per_fact(biased_llama, corpus_file, stats):
    s = patch_session(biased_llama, corpus_file, stats)
    e = s.apply_batch([TOWER, MADRID], layers=[LAYER])
    assert len(s.edits) == 1 and e.info["slots"] == [0, 1] and len(e.info["facts"]) == 2
    # Each neuron is the one a single edit computes on the model before the batch.
    single = patch_session(biased_llama, corpus_file, stats)
    rows = {}
    for q in (TOWER, MADRID):
        one = single.apply(q)
        rows[q.subject] = {m.rsplit(".", 1)[1]: f for m, f in one.factors.items()}
        single.undo(one.id)
    batch = {m.rsplit(".", 1)[1]: f for m, f in e.factors.items()}
    for i, q in enumerate((TOWER, MADRID)):
        torch.testing.assert_close(batch["gate_proj"][1][i], rows[q.subject]["gate_proj"][1][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(batch["down_proj"][0][:, i], rows[q.subject]["down_proj"][0][:, 0], atol=1e-5, rtol=1e-5)
    assert float((batch["down_proj"][0][:, 0] - batch["down_proj"][0][:, 1]).abs().max()) > 0.1  # two neurons


def test_export_folds_the_neurons_into_a_plain_checkpoint(biased_llama, corpus_file, stats, tmp_path):
    s = patch_session(biased_llama, corpus_file, stats)
    s.apply(TOWER)
    s.apply(MADRID)
    out = s.export_model(tmp_path / "patched")
    model, _ = load(out)
    assert model.config.intermediate_size == s.model.config.intermediate_size + 2
    assert not any(is_patch_parameter(k) for k in model.state_dict())
    for text in (TOWER.text, MADRID.text, NEUTRAL):
        ids = s.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, s.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    base, _ = load(biased_llama)
    ids = s.tokenizer(TOWER.text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert float((model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max()) > 1.0  # non-vacuous
    assert "intermediate_size" in (out / "README.md").read_text()
    with pytest.raises(WeightsmithError, match="LoRA adapter cannot hold"):
        s.export_adapter(tmp_path / "adapter")


def test_architectures_without_a_gated_mlp_are_refused(corpus_file, stats, tmp_path_factory):
    from conftest import build_tiny_gpt2, save_model

    folder = save_model(build_tiny_gpt2(0), tmp_path_factory.mktemp("gpt2"))
    s = patch_session(folder, corpus_file, stats)
    before = snapshot(s.model)
    with pytest.raises(WeightsmithError, match="gated MLP"):
        s.apply(EditRequest("{} is in", "Berlin", "Spain", layer=1))
    after = snapshot(s.model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after) and not s.edits


def test_the_default_is_patch_where_the_model_can_hold_it(biased_llama, tiny_llama_dir, corpus_file, stats):
    from editing.session import EditSession
    from editing.stats import corpus_from_file

    from test_edit import FAST

    for folder, expected in ((biased_llama, "patch"), (tiny_llama_dir, "memit")):  # tiny_llama_dir: no bias
        model, tok = load(folder)
        s = EditSession(model, tok, stats=stats, hparams=FAST, corpus=corpus_from_file(corpus_file))
        assert s.apply(TOWER).method == expected
        assert s.apply_batch([MADRID]).method == expected


def test_method_choice():
    from editing.methods import batch_method, check_method

    assert check_method("PATCH") == "patch" and batch_method("patch") == "patch"


def test_cli_writes_a_patched_model_and_refuses_a_patch_adapter(biased_llama, corpus_file, tmp_path, monkeypatch,
                                                                capsys):
    from cli import main

    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    fact = ["--prompt", TOWER.prompt, "--subject", TOWER.subject, "--target", TOWER.target, "--layer", str(LAYER),
            "--stats-corpus", str(corpus_file)]
    out = tmp_path / "patched"
    code = main(["edit", str(biased_llama), *fact, "--out", str(out)])  # no --method: the default, patch
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "edited (patch) layer 1" in captured.out
    model, _ = load(out)
    base, _ = load(biased_llama)
    assert model.config.intermediate_size == base.config.intermediate_size + 1
    code = main(["edit", str(biased_llama), *fact, "--out", str(tmp_path / "adapter"), "--as-adapter",
                 "--method", "patch"])
    assert code == 2 and "cannot hold patch edits" in capsys.readouterr().err
    assert not (tmp_path / "adapter").exists()
