"""Scores of one fact on the model as it is now: the app's Evaluate button, on prompts a user typed.

The CounterFact scores of :func:`editing.evaluate.evaluate_edit` (efficacy, paraphrase,
neighbourhood and their magnitudes), their harmonic mean ``score`` when all three were measured,
and the checks by generation of :mod:`editing.generation_checks` (is the new answer in what a
user would see?).

Example::

    fact_scores(model, tok, {"prompt": "{} is in", "subject": "The Eiffel Tower", "target_new": "Rome",
                             "ground_truth": "Paris", "rephrase_prompt": ["The Eiffel Tower is in the city of"]})
"""

from __future__ import annotations

from typing import Any

from .evaluate import EvalRecord, evaluate_edit, harmonic_mean
from .generation_checks import GenerationConfig, generation_scores

MAIN_SCORES = ("efficacy", "paraphrase", "neighborhood")


def fact_scores(model, tokenizer, record: EvalRecord | dict[str, Any], *,
                generation: GenerationConfig | None = GenerationConfig()) -> dict[str, float]:
    """Teacher-forced scores, ``score`` (harmonic mean of :data:`MAIN_SCORES` when all are present),
    then the generation checks (none when ``generation`` is None)."""
    scores = evaluate_edit(model, tokenizer, record)
    main = [scores[k] for k in MAIN_SCORES if k in scores]
    if len(main) == len(MAIN_SCORES):
        scores["score"] = harmonic_mean(main)
    if generation is not None:
        scores.update(generation_scores(model, tokenizer, record, generation))
    return scores
