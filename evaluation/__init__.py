"""Evaluation: how good is a model (or a merge) on a task, with one function for the CLI, the app and the API.

:func:`evaluate_models` scores models on perplexity text files, multiple-choice and
generation JSONL files (:mod:`evaluation.tasks`), and the demo adapters' style scores
(:mod:`evaluation.style`); results are cached by content (:mod:`evaluation.cache`).
This room imports only ``checkpoints``; ``merging`` (the evolutionary search), ``ui``,
``cli`` and ``bench`` may import it.
"""

from .run import EvalModel, EvalResult, EvalSettings, TaskScore, evaluate_models  # noqa: F401
