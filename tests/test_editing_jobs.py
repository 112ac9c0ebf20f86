"""Editing, evaluation and tracing report and stop through the one Job protocol (checkpoints.jobs)."""

from __future__ import annotations

import pytest

from checkpoints.jobs import Cancelled, Job
from editing.evaluate import EvalRecord, run_eval
from editing.trace import causal_trace

from test_edit import EIFFEL, corpus_file, same, session_for, sharp_dirs, snapshot, stats  # noqa: F401


def test_edit_reports_through_a_job_and_a_stop_changes_nothing(sharp_dirs, corpus_file, stats):  # noqa: F811
    s = session_for(sharp_dirs["llama"], corpus_file, stats)
    job = Job.recording()
    edit = s.apply(EIFFEL, job=job)
    fractions = [f for f, _ in job.events if f is not None]
    assert fractions and fractions == sorted(fractions) and all(0 <= f <= 1 for f in fractions)
    assert any("v*" in text for _, text in job.events)
    s.undo(edit.id)
    before = snapshot(s.model)
    stopped = Job.recording()
    stopped.listener = lambda f, t: stopped.cancel() if "v*" in t else None  # Stop pressed mid-optimisation
    with pytest.raises(Cancelled, match="the edit was cancelled; nothing was written"):
        s.apply(EIFFEL, job=stopped)
    assert same(before, snapshot(s.model)) and s.edits == []  # non-vacuous: the first apply did change them


def test_evaluation_reports_baseline_then_each_record(sharp_dirs, corpus_file, stats):  # noqa: F811
    s = session_for(sharp_dirs["llama"], corpus_file, stats)
    recs = [EvalRecord(EIFFEL.prompt, EIFFEL.subject, "Rome", "Paris", ["The Eiffel Tower is in"], ["Paris is in"]),
            EvalRecord("The capital of {} is", "France", "Berlin", "Paris", [], ["Spain is in"])]
    job = Job.recording()
    out = run_eval(s, recs, layer=1, job=job)
    texts = [t for _, t in job.events]
    assert texts[0] == "scoring the unedited model on record 1/2" and "editing record 2/2" in texts
    first_edit = texts.index("editing record 1/2")
    assert job.events[first_edit][0] == pytest.approx(0.2)  # the baseline owns the first fifth
    fractions = [f for f, _ in job.events if f is not None]
    assert fractions == sorted(fractions) and fractions[-1] <= 1.0
    assert out["n"] == 2 and s.edits == []
    stop = Job()
    stop.cancel()
    with pytest.raises(Cancelled):
        run_eval(s, recs, layer=1, job=stop)


def test_trace_reports_each_layer_and_stops(tiny_llama_dir):
    from test_trace import load

    model, tok = load(tiny_llama_dir)
    job = Job.recording()
    causal_trace(model, tok, "The Eiffel Tower is in", "Eiffel Tower", samples=1, job=job)
    L = model.config.num_hidden_layers
    assert [t for _, t in job.events] == [f"tracing layer {i + 1}/{L}" for i in range(L)]
    assert job.events[-1][0] == 1.0
    stop = Job()
    stop.cancel()
    with pytest.raises(Cancelled, match="the trace was cancelled"):
        causal_trace(model, tok, "The Eiffel Tower is in", "Eiffel Tower", samples=1, job=stop)
