"""Disabling-edit checks: norms, outliers against the session's history, KL on neutral text, refusal of NaN."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import editing.session as session_module
from checkpoints.errors import WeightsmithError
from editing.edit_card import edit_card
from editing.checks import CheckSettings, unrelated_kl, update_checks, update_norms
from editing.request import EditRequest

from test_edit import EIFFEL, corpus_file, same, session_for, sharp_dirs, snapshot, stats  # noqa: F401

# Edits of the sharpened tiny model are large against its small random weights (‖ΔW‖/‖W‖ ≈ 2):
# the absolute bounds are raised here so that only the outlier rule and the KL decide.
TINY = CheckSettings(max_relative_norm=20.0, max_unrelated_kl=5.0, outlier_factor=5.0, min_history=3,
                     max_drift_kl=50.0)
FACTS = [EditRequest(EIFFEL.prompt, EIFFEL.subject, "Rome", layer=1),
         EditRequest("The capital of {} is", "France", "Berlin", layer=1),
         EditRequest("{} is the capital of", "Madrid", "Italy", layer=1)]


def test_update_checks_by_hand():
    s = CheckSettings(outlier_factor=5.0, min_history=3, max_relative_norm=1.0, max_unrelated_kl=0.5)
    ok = update_checks(9.0, 0.1, None, None, [1.0, 2.0, 3.0], s)
    assert ok["flag"] is False and ok["warning"] == "" and ok["median_earlier_norm"] == 2.0
    out = update_checks(10.5, 0.1, None, None, [1.0, 2.0, 3.0], s)  # 10.5 > 5 × median 2
    assert out["flag"] is True and "5.2× the median 2 of 3 earlier edits" in out["warning"]
    assert update_checks(10.5, 0.1, None, None, [1.0, 2.0], s)["flag"] is False  # too little history yet
    assert "‖ΔW‖/‖W‖ = 1.50 > 1" in update_checks(1.0, 1.5, None, None, [], s)["warning"]  # absolute bound
    p = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    q = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1]]))
    kl = 0.5 * (0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))  # KL(p‖q) on row 0, 0 on row 1
    assert abs(unrelated_kl(p, q) - kl) < 1e-6 and unrelated_kl(p, p) == 0.0
    # Identical distributions that float32 rounds apart read 0, not "-0"; a NaN still reads NaN (and flags).
    near = torch.log_softmax(torch.tensor([[0.3, 0.1, 2.0]]) + 1e-7, -1)
    assert str(round(unrelated_kl(torch.log_softmax(torch.tensor([[0.3, 0.1, 2.0]]), -1), near), 5)) == "0.0"
    assert math.isnan(unrelated_kl(p, torch.full_like(q, float("nan"))))
    moved = update_checks(1.0, 0.1, p, q, [], CheckSettings(max_unrelated_kl=0.1))
    assert moved["flag"] and moved["unrelated_kl"] == round(kl, 5) and "unrelated text moved" in moved["warning"]
    # Drift: KL(unedited ‖ now) over all the edits, its own line, not a disabling-edit flag.
    drift = update_checks(1.0, 0.1, q, q, [], CheckSettings(max_drift_kl=0.1), unedited=p, active_edits=7)
    assert drift["drift_kl"] == round(kl, 5) and drift["drifted"] and not drift["flag"]
    assert drift["warning"].startswith("the 7 edit(s) applied have moved the model away from the unedited one: KL 0.")
    calm = update_checks(1.0, 0.1, q, q, [], CheckSettings(max_drift_kl=0.5), unedited=p)
    assert not calm["drifted"] and calm["warning"] == ""  # kl = 0.33 < 0.5
    nan = update_checks(1.0, 0.1, q, torch.full_like(q, float("nan")), [], CheckSettings(), unedited=p)
    assert nan["drifted"]
    assert "drift_kl" not in update_checks(1.0, 0.1, p, q, [], CheckSettings())  # no reference, no drift


def test_update_norms():
    B, A = torch.tensor([[3.0], [4.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    W = torch.full((2, 3), 2.0)  # ‖W‖ = √24
    norm, rel = update_norms({"m": (B, A)}, {"m": W})
    assert norm == pytest.approx(5.0) and rel == pytest.approx(5.0 / math.sqrt(24.0))


def test_huge_update_is_flagged_and_normal_ones_are_not(sharp_dirs, corpus_file, stats, monkeypatch):  # noqa: F811
    s = session_for(sharp_dirs["llama"], corpus_file, stats, check_settings=TINY)
    normal = [s.apply(r) for r in FACTS]
    for e in normal:  # non-vacuous: ordinary edits pass, with the numbers the user sees
        c = e.info["checks"]
        assert c["finite"] and c["update_norm"] > 0 and c["unrelated_kl"] >= 0 and not c["flag"], c
    assert "median_earlier_norm" not in normal[0].info["checks"]
    real = session_module.compute_rome

    def crafted(*args, **kwargs):  # the same edit with a 50× larger update, like the 38× outlier
        r = real(*args, **kwargs)
        r.B = r.B * 50
        return r

    monkeypatch.setattr(session_module, "compute_rome", crafted)
    huge = s.apply(FACTS[0])
    c = huge.info["checks"]
    assert c["flag"] and "the median" in c["warning"] and c["update_norm"] > 5 * c["median_earlier_norm"]
    assert c["unrelated_kl"] > 0
    assert s.history[-1]["checks"]["flag"] is True and huge.warning.startswith("possible disabling edit")
    card = edit_card(s, "finetune", None, "transformers")
    assert card.edit_log[-1]["check"] == huge.warning
    assert "disabling" not in card.edit_log[0]["check"]  # the normal edits are not flagged as disabling
    assert "looked like disabling edits" in card.summary
    s.undo(huge.id)
    monkeypatch.setattr(session_module, "compute_rome", real)
    again = s.apply(FACTS[0])  # the flagged norm is not part of the reference: the median is the normal edits'
    assert again.info["checks"]["median_earlier_norm"] == c["median_earlier_norm"] and not again.info["checks"]["flag"]


def test_kl_is_against_the_weights_just_before_the_edit(sharp_dirs, corpus_file, stats):  # noqa: F811
    from editing.checks import neutral_logprobs

    s = session_for(sharp_dirs["llama"], corpus_file, stats, check_settings=TINY)
    fresh = lambda: neutral_logprobs(s.model, s.tokenizer, TINY.prompts)  # noqa: E731
    original = fresh()
    first = s.apply(FACTS[0])
    s.undo(first.id)  # back to the original state (the session reuses its log-probs)
    second = s.apply(FACTS[1])
    after_second = fresh()
    assert second.info["checks"]["unrelated_kl"] == round(unrelated_kl(original, after_second), 5) > 0
    third = s.apply(FACTS[2])  # "before" is now the state with the second edit
    s.undo(third.id)
    assert torch.equal(fresh(), after_second)
    third = s.apply(FACTS[2])
    assert third.info["checks"]["unrelated_kl"] == round(unrelated_kl(after_second, fresh()), 5)
    assert third.info["checks"]["unrelated_kl"] != round(unrelated_kl(original, fresh()), 5)  # non-vacuous


def test_drift_is_against_the_unedited_model(sharp_dirs, corpus_file, stats):  # noqa: F811
    """drift_kl compares with the weights before any edit, however many edits and undos came between."""
    from editing.checks import neutral_logprobs

    s = session_for(sharp_dirs["llama"], corpus_file, stats, check_settings=TINY)
    fresh = lambda: neutral_logprobs(s.model, s.tokenizer, TINY.prompts)  # noqa: E731
    original = fresh()
    first = s.apply(FACTS[0])
    c = first.info["checks"]
    assert c["drift_kl"] == c["unrelated_kl"] and not c["drifted"]  # one edit: the same comparison
    second = s.apply(FACTS[1])
    c = second.info["checks"]
    assert c["drift_kl"] == round(unrelated_kl(original, fresh()), 5)
    assert c["drift_kl"] != c["unrelated_kl"] and c["drift_kl"] > 0  # non-vacuous: two edits' drift
    s.undo(first.id)
    third = s.apply(FACTS[2])
    assert third.info["checks"]["drift_kl"] == round(unrelated_kl(original, fresh()), 5)
    # A session that never saw the unedited model (edits replayed) swaps the unedited weights in once.
    t = session_for(sharp_dirs["llama"], corpus_file, stats, check_settings=TINY)
    for e in s.edits:
        t.replay(e.method, e.requests, list(e.layers), dict(e.factors), keys=dict(e.keys), checks=e.info["checks"])
    fourth = t.apply(FACTS[0])
    assert fourth.info["checks"]["drift_kl"] == round(unrelated_kl(original, neutral_logprobs(
        t.model, t.tokenizer, TINY.prompts)), 5)


def test_a_sequence_that_drifts_is_told_so(sharp_dirs, corpus_file, stats, caplog):  # noqa: F811
    strict = CheckSettings(max_relative_norm=20.0, max_unrelated_kl=5.0, min_history=3, max_drift_kl=1e-9)
    s = session_for(sharp_dirs["llama"], corpus_file, stats, check_settings=strict)
    with caplog.at_level(logging.WARNING, logger="editing.session"):
        edits = [s.apply(r) for r in FACTS[:2]]
    assert all(e.info["checks"]["drifted"] and not e.info["checks"]["flag"] for e in edits)
    assert "the 2 edit(s) applied have moved the model away" in edits[1].warning
    logged = [r for r in caplog.records if "moved the model away" in r.getMessage()]
    assert len(logged) == 2  # non-vacuity: an edit made here logs its warning
    # A replayed edit (a long run resumed) keeps its warning but does not log it a second time.
    caplog.clear()
    t = session_for(sharp_dirs["llama"], corpus_file, stats, check_settings=strict)
    with caplog.at_level(logging.WARNING, logger="editing.session"):
        replayed = [t.replay(e.method, e.requests, list(e.layers), dict(e.factors), keys=dict(e.keys),
                             checks=e.info["checks"]) for e in edits]
    assert replayed[1].warning == edits[1].warning
    assert not [r for r in caplog.records if "moved the model away" in r.getMessage()]


def test_non_finite_update_is_refused(sharp_dirs, corpus_file, stats, monkeypatch):  # noqa: F811
    s = session_for(sharp_dirs["llama"], corpus_file, stats)
    before = snapshot(s.model)
    real = session_module.compute_rome

    def broken(*args, **kwargs):
        r = real(*args, **kwargs)
        r.B = r.B.clone()
        r.B[0] = float("nan")
        return r

    monkeypatch.setattr(session_module, "compute_rome", broken)
    with pytest.raises(WeightsmithError, match="not finite"):
        s.apply(FACTS[0])
    assert same(snapshot(s.model), before) and s.history == []


def test_cli_method_and_warning_line(sharp_dirs, corpus_file, tmp_path, monkeypatch, capsys):  # noqa: F811
    from cli import main

    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    out = tmp_path / "adapter"
    # The default bound ‖ΔW‖/‖W‖ ≤ 1 flags edits of the tiny model (≈ 2): the CLI must say so.
    code = main(["edit", str(sharp_dirs["llama"]), "--prompt", EIFFEL.prompt, "--subject", EIFFEL.subject,
                 "--target", "Rome", "--out", str(out), "--as-adapter", "--layer", "1", "--method", "r-rome",
                 "--stats-corpus", str(corpus_file)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "edited (r-rome) layer 1" in captured.out and "of ‖W‖" in captured.out
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: possible disabling edit")]
    assert len(warnings) == 1
    log = json.loads((out / "edit_log.json").read_text())
    assert log[0]["method"] == "r-rome" and log[0]["checks"]["flag"] is True
    card = (out / "README.md").read_text()
    assert "| method | check |" in card and "| r-rome | possible disabling edit" in card
    with pytest.raises(SystemExit) as exited:  # argparse: usage error, exit status 2
        main(["edit", str(sharp_dirs["llama"]), "--prompt", EIFFEL.prompt, "--subject", EIFFEL.subject,
              "--target", "Rome", "--out", str(tmp_path / "x"), "--method", "nope"])
    assert exited.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_app_history_shows_the_check():
    from ui.tables import history_rows

    flagged = {"id": 2, "method": "rome", "layers": [4], "prompt": "{} is in", "subject": "X", "target_new": "Y",
               "seconds": 1.0, "checks": {"relative_norm": 7.2, "flag": True, "warning": "possible disabling edit: ..."}}
    fine = {**flagged, "id": 1, "checks": {"relative_norm": 0.0812, "flag": False, "warning": ""}}
    drift = {**fine, "id": 3, "checks": {**fine["checks"], "drift_kl": 0.0123}}
    rows = history_rows([fine, flagged, drift])
    assert [r[-1] for r in rows] == ["ok (‖ΔW‖/‖W‖ 0.0812)", "possible disabling edit: ...",
                                     "ok (‖ΔW‖/‖W‖ 0.0812, drift KL 0.012)"]
    assert len(rows[0]) == 7 and rows[1][3] == "X is in"


@pytest.mark.slow
def test_demo_disabling_edit_is_flagged_and_r_rome_avoids_it(demo_dir, tmp_path):
    # CounterFact record 258 (tuning half), "BRIC" -> "Apollo": the bare prompt's key is almost orthogonal
    # to C⁻¹k* (u·k(s) ≈ u·k*/4000 with 100k tokens of statistics), so the prompt-key update explodes.
    # With 100k tokens: ROME ‖ΔW‖ 7,227 (42× ‖W‖), KL 6.97, "The capital of France is" -> ", the, [,,,,";
    # r-ROME ‖ΔW‖ 1.8, KL 0.0. Kept cheap here: 5k tokens (in a temp cache) and 4 prefixes.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editing.evaluate import parse_record
    from editing.rome import RomeHyperParams
    from editing.session import EditSession
    from editing.stats import StatsCache, corpus_from_file
    from test_edit import SHARED

    wiki, records = SHARED / "wikitext-2-raw" / "wiki.test.raw", SHARED / "counterfact" / "dev-1000.json"
    if not (wiki.is_file() and records.is_file()):
        pytest.skip("shared WikiText / CounterFact data not present")
    model = AutoModelForCausalLM.from_pretrained(demo_dir).eval()
    tok = AutoTokenizer.from_pretrained(demo_dir)
    s = EditSession(model, tok, stats=StatsCache(tmp_path / "stats"), corpus=corpus_from_file(wiki), stats_tokens=5_000,
                    hparams=RomeHyperParams(prefix_lengths=((5, 4),)))
    rec = parse_record(json.loads(records.read_text())[258])
    assert rec.subject == "BRIC"
    rome = s.apply(rec.request(), method="rome")
    c = rome.info["checks"]
    assert c["flag"] and c["relative_norm"] > 5 and c["unrelated_kl"] > 1, c  # ~9.5 and ~2.7 measured
    s.undo(rome.id)
    r = s.apply(rec.request(), method="r-rome")
    c = r.info["checks"]
    assert not c["flag"] and c["relative_norm"] < 0.1 and c["unrelated_kl"] < 0.01, c  # ~0.017 and ~1e-5 measured


def test_target_check_by_hand():
    s = CheckSettings()
    hit = {"generates_target": True, "target_prob": 0.8, "continuation": " Rome"}
    miss = {"generates_target": False, "target_prob": 0.125, "continuation": " Paris"}
    ok = update_checks(1.0, 0.1, None, None, [], s, [("Rome", hit)])
    assert ok["missed"] == 0 and ok["generates_target"] == 1 and ok["warning"] == "" and not ok["flag"]
    out = update_checks(1.0, 0.1, None, None, [], s, [("Rome", hit), ("Berlin", miss), ("Italy", miss)])
    assert out["missed"] == 2 and out["generates_target"] == 1 and out["target_prob"] == 0.125
    assert not out["flag"]  # a miss is not a disabling edit: it does not leave the norm history
    assert out["warning"] == ("the edit did not take on its prompt: the model continues ' Paris', not 'Berlin' "
                              "(P = 0.12) (and 1 more of 3); try another layer or method")
    assert "missed" not in update_checks(1.0, 0.1, None, None, [], s)  # no targets given: no claim


def test_target_check_by_hand_on_a_bigram_model(tiny_tokenizer):
    from bigram_model import bigram_model
    from editing.checks import target_check
    from test_generation_checks import ROWS

    # After "of" the model says " Rome" (logit ln 3), then " is" (ln 2), then " Paris" (ln 4), " is", ...
    m = bigram_model(tiny_tokenizer, ROWS)
    V = m.config.vocab_size
    text = "The Eiffel Tower is located in the city of"
    got = target_check(m, tiny_tokenizer, text, "Rome is")
    assert got["generates_target"] is True and got["continuation"] == " Rome is Paris is Paris is Paris is Paris is"
    assert got["target_prob"] == round(math.sqrt(3 / (V + 2) * 2 / (V + 1)), 5)
    later = target_check(m, tiny_tokenizer, text, "Paris")  # said within the ten greedy tokens, not first
    assert later["generates_target"] is True and later["target_prob"] == round(1 / (V + 2), 5)
    short = target_check(m, tiny_tokenizer, text, "Paris", window=1)  # non-vacuous: the window matters
    assert short["generates_target"] is False and short["continuation"] == " Rome"
    assert target_check(m, tiny_tokenizer, text, "Berlin")["generates_target"] is False


def test_each_edit_reports_whether_it_took(sharp_dirs, corpus_file, stats, monkeypatch):  # noqa: F811
    from editing.checks import target_check

    s = session_for(sharp_dirs["llama"], corpus_file, stats, check_settings=TINY)
    e = s.apply(FACTS[0])
    c = e.info["checks"]
    assert c["missed"] == 0 and c["generates_target"] == 1 and "did not take" not in e.warning, c
    assert c["target_prob"] == target_check(s.model, s.tokenizer, FACTS[0].text, "Rome")["target_prob"]
    s.undo(e.id)
    real = session_module.compute_rome

    def feeble(*args, **kwargs):  # the same edit scaled down to nothing: the model keeps its answer
        r = real(*args, **kwargs)
        r.B = r.B * 1e-6
        return r

    monkeypatch.setattr(session_module, "compute_rome", feeble)
    weak = s.apply(FACTS[0])
    c = weak.info["checks"]
    after = target_check(s.model, s.tokenizer, FACTS[0].text, "Rome")
    assert c["missed"] == 1 and c["generates_target"] == 0 and not after["generates_target"], c
    assert f"the model continues {after['continuation']!r}, not 'Rome'" in weak.warning and not c["flag"]
    assert s.history[-1]["checks"]["missed"] == 1
    assert "did not take on their own prompt" in edit_card(s, "finetune", None, "transformers").summary
