"""The optional lm-eval backend gives the built-in scorer's multiple-choice numbers (skipped without lm-eval)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints.errors import WeightsmithError  # noqa: E402
from evaluation import EvalSettings, evaluate_models  # noqa: E402


def test_lm_eval_is_refused_for_other_kinds(tiny_llama_dir):
    with pytest.raises(WeightsmithError, match="multiple-choice files only"):
        evaluate_models([str(tiny_llama_dir)], ["style-prompts"], settings=EvalSettings(backend="lm-eval"),
                        cache=None)


def test_lm_eval_backend_matches_the_builtin_scorer(tiny_llama_dir, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # local files only
    ours = evaluate_models([str(tiny_llama_dir)], ["capitals-mc"], cache=None).scores[0]
    theirs = evaluate_models([str(tiny_llama_dir)], ["capitals-mc"], settings=EvalSettings(backend="lm-eval"),
                             cache=None).scores[0]
    assert theirs.n == ours.n == 32
    assert theirs.metrics == ours.metrics
    assert ours.metrics["acc"] != ours.metrics["acc_norm"]  # the two metrics are both compared, and differ here
