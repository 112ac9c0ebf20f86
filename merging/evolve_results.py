"""What an evolutionary search yields (trials, the best, the result) and how a trial's folder is scored.

Shared by :mod:`merging.evolve` (the search) and :mod:`merging.evolve_output` (the written best), which
must not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from checkpoints.jobs import Job
from evaluation.run import evaluate_models, model_from_ref

from .evolve_space import SearchSpec
from .recipe import MergeRecipe


@dataclass
class TrialRecord:
    """One finished (or running) trial as the log, the card and the app's plot see it."""

    number: int
    state: str  # complete, fail, running
    score: float | None
    values: dict[str, float]
    parts: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    worker: str = ""
    error: str = ""


@dataclass
class BestTrial:
    number: int
    score: float
    parts: dict[str, float]
    values: dict[str, float]
    recipe: MergeRecipe


@dataclass
class SearchResult:
    out_dir: Path | None
    study: str
    best: BestTrial
    trials: list[TrialRecord]
    ran_here: int  # trials this run finished
    stopped: str  # why this run stopped starting trials
    verified_score: float | None = None  # the written model's score, scored again
    verified_parts: dict[str, float] = field(default_factory=dict)
    state_dir: Path | None = None


def score_folder(spec: SearchSpec, folder: Path, name: str, *, job: Job | None = None, device: str = "cpu",
                 roots: Sequence[Path] = ()) -> tuple[float, dict[str, float]]:
    """``spec``'s fitness of the model in ``folder``, scored by :func:`evaluation.evaluate_models` (no cache)."""
    model = model_from_ref(str(folder), device=device, cache=None, name=name, allow_local=True,
                           trusted_roots=roots)
    # Uncached, so the weights' content hash would be computed for nothing: a trial's folder is new each time.
    model = replace(model, digest=lambda: "")
    result = evaluate_models([model], spec.task_files(), settings=spec.settings, job=job, device=device,
                             cache=None)
    return spec.fitness(result, name)
