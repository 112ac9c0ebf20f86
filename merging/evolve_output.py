"""The evolutionary search's output: the best trial's recipe as a normal merge, with a card that records the search.

The best recipe is merged again by the engine into a staging folder beside ``OUT``
(:func:`checkpoints.staging.new_staging_dir`), scored again with the same tasks and settings
(the card and the caller show both the trial's score and the written model's), given a
"Evolutionary search" card section (space, budget, trials, best score, best recipe) and
``weightsmith_search.json`` (the search file, every trial), and only then renamed into ``OUT``:
a failure or a cancel on the way leaves no ``OUT``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import yaml

from checkpoints.cards import add_card_section, scrub_local_paths
from checkpoints.jobs import Job, ensure
from checkpoints.staging import new_staging_dir, publish_folder

from .engine import run_merge
from .evolve_results import SearchResult, score_folder
from .evolve_space import SearchSpec

SEARCH_FILE = "weightsmith_search.json"


def write_best(spec: SearchSpec, result: SearchResult, out_dir: Path, *, job: Job | None = None,
               device: str = "cpu", overwrite: bool = False, allow_local: bool = True,
               trusted_roots: Sequence[Path] = ()) -> tuple[float, dict[str, float]]:
    """Merge ``result.best``'s recipe into ``out_dir`` with the search's card; returns the written model's
    (score, each task's metric), scored again."""
    job = ensure(job)
    staging = new_staging_dir(out_dir, overwrite=overwrite)
    try:
        merged = staging / "merge"
        job.progress(0.0, f"writing the best recipe (trial {result.best.number})")
        run_merge(result.best.recipe, merged, job=job.part(0.0, 0.4), collect_norms=False,
                  allow_local=allow_local, trusted_roots=trusted_roots)
        for f in merged.iterdir():  # same file system: renames, no copy
            os.replace(f, staging / f.name)
        merged.rmdir()
        job.progress(0.4, "scoring the written model")
        score, parts = score_folder(spec, staging, "written", job=job.part(0.4, 1.0), device=device,
                                    roots=(*trusted_roots, staging.parent))
        add_card_section(staging, "Evolutionary search", search_section(spec, result, score), tags=("evolve",))
        (staging / SEARCH_FILE).write_text(json.dumps(search_record(spec, result, score, parts), indent=1),
                                           encoding="utf-8")
        job.check("the search")
        publish_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return score, parts


def search_section(spec: SearchSpec, result: SearchResult, written: float) -> str:
    """The card's account of the search: space, tasks, budget, trials, best score and recipe."""
    complete = [t for t in result.trials if t.state == "complete"]
    failed = [t for t in result.trials if t.state == "fail"]
    budget = ", ".join(x for x in (f"{spec.max_trials} trials" if spec.max_trials else "",
                                   f"{spec.minutes:g} minutes per run" if spec.minutes else "") if x)
    tasks = ", ".join(f"{t.task.name} {t.metric} × {t.weight:g}" + (" (as −ln)" if t.metric == "perplexity" else "")
                      for t in spec.tasks)
    best = result.best
    lines = [
        f"The merge parameters were found by an evolutionary search (CMA-ES, optuna's `CmaEsSampler`) "
        f"with `weightsmith evolve`; study `{result.study}`.",
        "",
        f"- Search space ({len(spec.dimensions)} dimensions): " + "; ".join(spec.space_lines()),
        f"- Score: Σ weight × metric over {tasks}",
        f"- Evaluation settings: {json.dumps({k: v for k, v in vars(spec.settings).items() if v is not None})}",
        f"- Budget: {budget}; trials: {len(complete)} complete, {len(failed)} failed",
        f"- Best: trial {best.number}, score {best.score:.6g} ("
        + ", ".join(f"{k} {v:.4g}" for k, v in best.parts.items()) + ")",
        f"- This model, scored again after writing: {written:.6g}",
        "",
        "Best values: " + ", ".join(f"`{k}` = {v:.4g}" for k, v in best.values.items()),
        "",
        "The best recipe is the Recipe above (also `weightsmith_recipe.yml`); every trial is in "
        f"`{SEARCH_FILE}`.",
    ]
    return scrub_local_paths("\n".join(lines))


def search_record(spec: SearchSpec, result: SearchResult, score: float, parts: dict[str, float]) -> dict:
    """Everything about the search, as data (the file as given, the best, every trial)."""
    return {
        "search": json.loads(json.dumps(spec.source, default=str)),
        "study": result.study,
        "dimensions": [vars(d) for d in spec.dimensions],
        "best": {"trial": result.best.number, "score": result.best.score, "parts": result.best.parts,
                 "values": result.best.values, "recipe": yaml.safe_load(result.best.recipe.to_yaml())},
        "written_score": score,
        "written_parts": parts,
        "trials": [vars(t) for t in result.trials],
    }
