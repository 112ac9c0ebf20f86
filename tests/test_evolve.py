"""Evolutionary merge search: the space maps to recipes exactly, bad files give one line, the written best
reproduces the best trial's score, a cancel writes nothing (tiny random models, a perplexity task)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

import cli
from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Cancelled, Job
from merging.evolve import read_log, run_search, score_folder, state_dir_for, trial_records
from merging.evolve_plots import best_so_far
from merging.evolve_space import SearchSpec

TEXT = " ".join(["the capital of France is Paris . the capital of Italy is Rome ."] * 12)


def search_text(fam, text_file, *, budget="{trials: 4}", extra="") -> str:
    return f"""
merge_method: task_arithmetic
base_model: {fam['base']}
models: [{fam['ft1']}, {fam['ft2']}]
search: {{weight: [0.0, 1.0], lines: {{alpha: [0.0, 1.0]}}}}
tasks: [{{task: {text_file}}}]
eval: {{seq_len: 32}}
budget: {budget}
{extra}"""


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


# -- the space ---------------------------------------------------------------------------------------------
def test_space_maps_to_recipes_by_hand(text_file):
    spec = SearchSpec.from_yaml(f"""
merge_method: ties
base_model: b
models: [b, x, {{model: y, parameters: {{weight: 0.3, density: 0.9}}}}]
parameters: {{normalize: false}}
search:
  weight: [0.0, 2.0]
  density: {{range: [0.2, 1.0], gradient: 2, shared: true}}
  lambda: [0.5, 1.5]
  lines: {{alpha: [0.0, 1.0], beta: [0.0, 1.0]}}
tasks: [{{task: {text_file}}}]
budget: {{trials: 3}}
""")
    assert [(d.name, d.low, d.high) for d in spec.dimensions] == [
        ("weight.0", 0.0, 2.0), ("weight.1", 0.0, 2.0), ("density.g0", 0.2, 1.0), ("density.g1", 0.2, 1.0),
        ("lambda", 0.5, 1.5), ("lines.alpha", 0.0, 1.0), ("lines.beta", 0.0, 1.0)]
    values = {"weight.0": 0.25, "weight.1": 1.75, "density.g0": 0.3, "density.g1": 0.8, "lambda": 1.2,
              "lines.alpha": 0.1, "lines.beta": 0.7}
    assert spec.recipe(values).to_dict() == {
        "models": [{"model": "b"},  # the base takes no searched parameter
                   {"model": "x", "parameters": {"weight": 0.25, "density": [0.3, 0.8]}},
                   {"model": "y", "parameters": {"weight": 1.75, "density": [0.3, 0.8]}}],  # searched beat fixed
        "merge_method": "ties", "base_model": "b", "parameters": {"normalize": False, "lambda": 1.2},
        "lines": {"alpha": 0.1, "beta": 0.7}}
    assert spec.start() == {"weight.0": 1.0, "weight.1": 1.0, "density.g0": 0.6, "density.g1": 0.6, "lambda": 1.0,
                            "lines.alpha": 0.5, "lines.beta": 0.5}
    other = dict(values, **{"weight.1": 0.5})
    assert spec.recipe(other).models[2].parameters["weight"] == 0.5  # non-vacuous: each value lands where named
    with pytest.raises(WeightsmithError, match="no value for lambda"):
        spec.recipe({k: v for k, v in values.items() if k != "lambda"})


def test_per_model_gradients_and_methods_without_a_base(text_file):
    spec = SearchSpec.from_yaml(f"""
merge_method: linear
models: [x, y]
search: {{weight: {{range: [0, 1], gradient: 3}}}}
tasks: [{{task: {text_file}}}]
budget: {{minutes: 1}}
""")
    assert [d.name for d in spec.dimensions] == ["weight.0.g0", "weight.0.g1", "weight.0.g2",
                                                 "weight.1.g0", "weight.1.g1", "weight.1.g2"]
    r = spec.recipe({"weight.0.g0": 0.1, "weight.0.g1": 0.2, "weight.0.g2": 0.3,
                     "weight.1.g0": 0.9, "weight.1.g1": 0.8, "weight.1.g2": 0.7})
    assert [m.parameters for m in r.models] == [{"weight": [0.1, 0.2, 0.3]}, {"weight": [0.9, 0.8, 0.7]}]
    assert r.lines is None and (spec.max_trials, spec.minutes) == (None, 1.0)


def test_fitness_sums_weighted_metrics_with_perplexity_as_minus_log(text_file):
    from evaluation.run import EvalResult, TaskScore

    spec = SearchSpec.from_yaml(f"""
merge_method: task_arithmetic
base_model: b
models: [x]
search: {{weight: [0, 1]}}
tasks: [{{task: {text_file}, weight: 0.5}}, {{task: style-prompts, metric: caps, weight: 2}},
        {{task: style-prompts, metric: pirate}}]
budget: {{trials: 1}}
""")
    assert [t.name for t in spec.task_files()] == ["text", "style-prompts"]  # the style file scored once
    result = EvalResult([TaskScore("m", "text", "perplexity", {"perplexity": 20.0}, 10, 0.0),
                         TaskScore("m", "style-prompts", "style", {"caps": 0.25, "pirate": 0.5}, 16, 0.0)])
    score, parts = spec.fitness(result, "m")
    assert score == pytest.approx(0.5 * -math.log(20.0) + 2 * 0.25 + 0.5)
    assert parts == {"text:perplexity": 20.0, "style-prompts:caps": 0.25, "style-prompts:pirate": 0.5}


BAD = [
    ("search: {weight: [0, 1]}\ntasks: [wikitext-excerpt]\nbudget: {trials: 2}\nfoo: 1", "unsupported key(s) foo"),
    ("search: {weight: [0, 1]}\ntasks: [wikitext-excerpt]", "search: budget is missing"),
    ("search: {weight: [1, 0]}\ntasks: [wikitext-excerpt]\nbudget: {trials: 2}", "weight must have low < high"),
    ("search: {weight: [0]}\ntasks: [wikitext-excerpt]\nbudget: {trials: 2}", "weight must be [low, high]"),
    ("search: {density: [0, 1]}\ntasks: [wikitext-excerpt]\nbudget: {trials: 2}", "density is not a parameter of "
                                                                                  "task_arithmetic"),
    ("search: {weight: {range: [0, 1], gradient: 0}}\ntasks: [wikitext-excerpt]\nbudget: {trials: 2}",
     "weight.gradient must be a whole number"),
    ("search: {weight: [0, 1]}\ntasks: [{task: capitals-mc, metric: caps}]\nbudget: {trials: 2}",
     "metric 'caps' is not a metric of capitals-mc"),
    ("search: {weight: [0, 1]}\ntasks: [style-prompts]\nbudget: {trials: 2}", "needs a metric"),
    ("search: {weight: [0, 1]}\ntasks: [no-such-task]\nbudget: {trials: 2}", "no-such-task: no such file"),
    ("search: {weight: [0, 1]}\ntasks: [wikitext-excerpt]\nbudget: {trials: 0}", "budget.trials must be"),
    ("search: {weight: [0, 1]}\ntasks: [wikitext-excerpt]\nbudget: {trials: 2}\neval: {limt: 3}",
     "eval has unknown key(s) limt"),
    ("search: {weight: [0, 1], lines: {alpha: [0, 1]}}\ntasks: [wikitext-excerpt]\nbudget: {trials: 2}",
     "lines scales a task vector"),
]


@pytest.mark.parametrize("body, message", BAD)
def test_bad_search_file_is_one_error_line(body, message, tmp_path, capsys):
    method = "linear\nmodels: [a, b]" if "lines" in body else "task_arithmetic\nbase_model: a\nmodels: [b]"
    path = tmp_path / "search.yaml"
    path.write_text(f"merge_method: {method}\n{body}\n", encoding="utf-8")
    assert cli.main(["evolve", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("weightsmith: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.search").exists()


def test_a_density_range_outside_the_method_bounds_is_refused(text_file):
    with pytest.raises(WeightsmithError, match=r"density must be in \(0"):
        SearchSpec.from_yaml(f"merge_method: ties\nbase_model: a\nmodels: [b]\nsearch: {{density: [0, 1]}}\n"
                             f"tasks: [{{task: {text_file}}}]\nbudget: {{trials: 2}}\n")


# -- a whole search on tiny models ---------------------------------------------------------------------------
def test_search_writes_the_best_merge_which_reproduces_its_score(tiny_llama_family, text_file, tmp_path):
    spec = SearchSpec.from_yaml(search_text(tiny_llama_family, text_file))
    out = tmp_path / "best"
    seen: list[int] = []
    job = Job.recording()
    result = run_search(spec, out, job=job, on_trial=lambda records: seen.append(len(records)))
    done = [t for t in result.trials if t.state == "complete"]
    assert len(done) == 4 and seen == [1, 2, 3, 4]
    scores = [t.score for t in done]
    assert len(set(scores)) == 4  # non-vacuous: the points differ, so their merges score differently
    assert result.best.score == max(scores) and result.best.values == done[scores.index(max(scores))].values
    assert result.best.recipe.to_dict() == spec.recipe(result.best.values).to_dict()
    # The written model, scored afresh, gives the best trial's score exactly (same recipe, same engine).
    again, parts = score_folder(spec, out, "again")
    assert again == result.best.score == result.verified_score and parts == result.best.parts
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "## Evolutionary search" in card and f"trial {result.best.number}, score" in card
    assert "4 trials; trials: 4 complete, 0 failed" in card and str(tiny_llama_family["base"]) not in card
    record = json.loads((out / "weightsmith_search.json").read_text())
    assert record["best"]["score"] == result.best.score and len(record["trials"]) == 4
    public = result.best.recipe.with_models_renamed(lambda ref: Path(ref).name)  # the card's names, no paths
    assert yaml.safe_load((out / "weightsmith_recipe.yml").read_text()) == public.to_dict()
    # Every trial is logged with its recipe; the progress is monotone and ends at 1.
    rows = read_log(state_dir_for(out) / "trials.jsonl")
    assert [r["number"] for r in rows] == [0, 1, 2, 3]
    assert all(r["recipe"] == spec.recipe(r["values"]).to_dict() for r in rows)
    fractions = [f for f, _ in job.events if f is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [b for _, b in best_so_far(result.trials)][-1] == result.best.score
    assert not any((state_dir_for(out) / "scratch").iterdir())  # trial merges are removed


def test_cancel_after_a_trial_writes_nothing_and_keeps_the_trial(tiny_llama_family, text_file, tmp_path):
    spec = SearchSpec.from_yaml(search_text(tiny_llama_family, text_file))
    out = tmp_path / "best"
    job = Job()
    with pytest.raises(Cancelled):
        run_search(spec, out, job=job, on_trial=lambda records: job.cancel())
    assert not out.exists()
    assert len(read_log(state_dir_for(out) / "trials.jsonl")) == 1
    from merging.evolve import open_study

    study, _ = open_study(spec, None, state_dir_for(out))
    assert [t.state for t in trial_records(study)] == ["complete"]
