"""SEARCH.yaml for ``weightsmith evolve``: what to merge, which numbers to search, how to score, how long.

A search file is a merge recipe whose numbers are ranges, plus the tasks that score a trial and a budget::

    merge_method: task_arithmetic
    base_model: demo
    models:                                   # as in a recipe: refs, base+lora refs, or {model, parameters}
      - demo+assets/adapters/caps
      - demo+assets/adapters/pirate
    parameters: {normalize: false}            # fixed recipe parameters (optional)
    search:                                   # each entry: [low, high] or {range: [low, high], ...}
      weight: [0.0, 2.0]                      # a per-model parameter: one dimension per model
      density: {range: [0.2, 1.0], gradient: 2, shared: true}   # a depth gradient of 2 points, one for all models
      lambda: [0.5, 1.5]                      # a shared parameter of the method: one dimension
      lines: {alpha: [0.0, 1.0], beta: [0.0, 1.0]}             # LiNeS α and β
    tasks:                                    # scored by evaluation.evaluate_models, summed with weights
      - {task: style-prompts, metric: caps, weight: 1.0}
      - {task: capitals-mc, metric: acc, weight: 1.0}
      - {task: wikitext-excerpt, weight: 0.1}  # perplexity counts as −ln(perplexity)
    eval: {limit: 16, max_new_tokens: 32}     # evaluation.EvalSettings fields (optional)
    budget: {trials: 40, minutes: 20}         # at least one of the two
    seed: 0

Dimensions are named ``weight.0`` (parameter, model index among the non-base models),
``density.g1`` (a shared gradient's second point), ``weight.1.g0``, ``lambda``, ``lines.alpha``.
:meth:`SearchSpec.recipe` maps one value per dimension to a :class:`~merging.recipe.MergeRecipe`;
nothing else decides what a trial merges.

Every problem is one :class:`WeightsmithError` line starting ``search:`` that names the key.

Example::

    spec = SearchSpec.from_yaml(Path("search.yaml"))
    [d.name for d in spec.dimensions]      # ['weight.0', 'weight.1', 'lines.alpha', 'lines.beta']
    spec.recipe(spec.start()).to_yaml()
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checkpoints.errors import WeightsmithError
from checkpoints.textfiles import load_yaml_file_or_text
from evaluation.run import EvalResult, EvalSettings
from evaluation.tasks import Task, load_task

from .methods import get_method
from .recipe import MergeRecipe

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source", "seed",
            "search", "tasks", "eval", "budget")
RECIPE_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source", "seed")
METRICS = {"perplexity": ("perplexity",), "choice": ("acc", "acc_norm"), "generate": ("exact_match", "contains"),
           "style": ("caps", "pirate")}
DEFAULT_METRIC = {"perplexity": "perplexity", "choice": "acc", "generate": "exact_match"}
EVAL_KEYS = ("batch_size", "seq_len", "max_tokens", "limit", "max_new_tokens", "chat")
MAX_GRADIENT = 8
MAX_DIMENSIONS = 64


@dataclass(frozen=True)
class Dimension:
    """One searched number: its name, range, and where it goes in the recipe."""

    name: str
    low: float
    high: float
    param: str  # recipe parameter, or "lines.alpha" / "lines.beta"
    model: int | None = None  # index among the non-base models; None: shared or all models
    point: int | None = None  # index in a depth gradient; None: a scalar

    @property
    def start(self) -> float:
        return (self.low + self.high) / 2


@dataclass(frozen=True)
class ScoredTask:
    task: Task
    metric: str
    weight: float

    def contribution(self, value: float) -> float:
        """``weight`` × the metric, higher is better: perplexity counts as −ln(perplexity)."""
        return self.weight * (-math.log(value) if self.metric == "perplexity" else value)


@dataclass
class SearchSpec:
    """A validated SEARCH.yaml (build with :meth:`from_yaml` / :meth:`from_dict`)."""

    recipe_data: dict[str, Any]  # the recipe's fixed part, mergekit layout, models as mappings
    dimensions: list[Dimension]
    tasks: list[ScoredTask]
    settings: EvalSettings
    max_trials: int | None
    minutes: float | None
    seed: int = 0
    source: dict[str, Any] = field(default_factory=dict)  # the file as read (for the card)

    # -- reading -------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> "SearchSpec":
        return cls.from_dict(load_yaml_file_or_text(text_or_path, what="search file"))

    @classmethod
    def from_dict(cls, data: Any) -> "SearchSpec":
        if not isinstance(data, dict):
            raise WeightsmithError("search: the file must be a mapping with merge_method, models, search, tasks "
                                   "and budget")
        unknown = [str(k) for k in data if k not in TOP_KEYS]
        if unknown:
            raise WeightsmithError(f"search: unsupported key(s) {', '.join(unknown)} (supported: {', '.join(TOP_KEYS)})")
        for key in ("merge_method", "models", "search", "tasks", "budget"):
            if key not in data:
                raise WeightsmithError(f"search: {key} is missing")
        recipe_data = {k: copy.deepcopy(data[k]) for k in RECIPE_KEYS if k in data and k != "seed"}
        if not isinstance(recipe_data["models"], list) or not recipe_data["models"]:
            raise WeightsmithError("search: models must be a non-empty list")
        recipe_data["models"] = [m if isinstance(m, dict) else {"model": m} for m in recipe_data["models"]]
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise WeightsmithError(f"search: seed must be an integer, got {seed!r}")
        try:
            base = MergeRecipe.from_dict(_with_placeholders(recipe_data))
        except WeightsmithError as e:
            raise WeightsmithError(_prefixed(e)) from None
        dims = _dimensions(data["search"], base)
        trials, minutes = _budget(data["budget"])
        spec = cls(recipe_data, dims, _tasks(data["tasks"]), _settings(data.get("eval")), trials, minutes, seed,
                   source=copy.deepcopy(data))
        _recipe_error(spec, spec.start())  # the start point must be a valid recipe (missing weight...)
        _recipe_error(spec, {d.name: d.low for d in dims})
        _recipe_error(spec, {d.name: d.high for d in dims})
        return spec

    # -- the space ------------------------------------------------------------------------------------
    def start(self) -> dict[str, float]:
        """The middle of every range (CMA-ES's first mean)."""
        return {d.name: d.start for d in self.dimensions}

    def recipe(self, values: dict[str, float]) -> MergeRecipe:
        """The merge recipe of one point of the space (``values``: one number per dimension)."""
        missing = [d.name for d in self.dimensions if d.name not in values]
        if missing:
            raise WeightsmithError(f"search: no value for {', '.join(missing)}")
        data = copy.deepcopy(self.recipe_data)
        others = _non_base_indices(data)
        lines: dict[str, float] = {}
        grads: dict[tuple[str, int | None], dict[int, float]] = {}
        for d in self.dimensions:
            v = float(values[d.name])
            if d.param.startswith("lines."):
                lines[d.param.split(".", 1)[1]] = v
            elif d.point is not None:
                grads.setdefault((d.param, d.model), {})[d.point] = v
            else:
                _put(data, others, d.param, d.model, v)
        for (param, model), points in grads.items():
            _put(data, others, param, model, [points[i] for i in range(len(points))])
        if lines:
            data["lines"] = {"alpha": lines.get("alpha", 1.0), "beta": lines.get("beta", 0.0)}
        return MergeRecipe.from_dict(data)

    # -- scoring --------------------------------------------------------------------------------------
    def fitness(self, result: EvalResult, model: str) -> tuple[float, dict[str, float]]:
        """(Σ weight × metric, each task's metric) of ``model`` in ``result``."""
        parts: dict[str, float] = {}
        total = 0.0
        for t in self.tasks:
            value = result.value(model, t.task.name, t.metric)
            if value is None or not math.isfinite(value):
                raise WeightsmithError(f"search: {t.task.name} gave no finite {t.metric} for {model}")
            parts[f"{t.task.name}:{t.metric}"] = value
            total += t.contribution(value)
        return total, parts

    def task_files(self) -> list[Task]:
        """Each task once (a task may be listed with several metrics)."""
        return list({t.task.name: t.task for t in self.tasks}.values())

    def identity(self) -> str:
        """A short hash of what decides the scores (space, recipe, tasks, settings): names the study."""
        blob = json.dumps({"recipe": self.recipe_data, "dims": [vars(d) for d in self.dimensions],
                           "tasks": [(t.task.digest, t.metric, t.weight) for t in self.tasks],
                           "settings": vars(self.settings)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def space_lines(self) -> list[str]:
        """One line per dimension, for the card and the app."""
        return [f"{d.name}: [{d.low:g}, {d.high:g}]" for d in self.dimensions]


# -- helpers ---------------------------------------------------------------------------------------------
def _prefixed(e: WeightsmithError) -> str:
    msg = str(e)
    return msg if msg.startswith("search:") else f"search: {msg}"


def _with_placeholders(data: dict[str, Any]) -> dict[str, Any]:
    """The fixed part made checkable before the space is read: each required parameter the file leaves to
    the search gets a placeholder (never merged: every trial's recipe is built from its own values), so the
    models, the base and the method are checked first, each with the recipe's own error line."""
    out = copy.deepcopy(data)
    method = get_method(str(out.get("merge_method")))
    for spec in method.parameters:
        if not spec.required:
            continue
        value = next(v for v in (1.0, 0.5, spec.max, 0.0) if v is not None and _fits(spec, v))
        scopes = [m for m in out["models"] if isinstance(m, dict)] if spec.per_model else [out]
        for scope in scopes:
            if scope.get("parameters") is None:
                scope["parameters"] = {}
            if isinstance(scope["parameters"], dict):
                scope["parameters"].setdefault(spec.name, value)
    return out


def _fits(spec, value: float) -> bool:
    try:
        spec.coerce(value, "")
        return True
    except WeightsmithError:
        return False


def _non_base_indices(data: dict[str, Any]) -> list[int]:
    """Positions in ``models`` of the searched models: all but the base (all for methods without a base)."""
    method = get_method(str(data["merge_method"]))
    base = data.get("base_model")
    return [i for i, m in enumerate(data["models"])
            if method.needs_base == "none" or m.get("model") != base]


def _put(data: dict[str, Any], others: list[int], param: str, model: int | None, value: Any) -> None:
    method = get_method(str(data["merge_method"]))
    spec = method.param(param)
    if spec is not None and spec.per_model:
        for k in (others if model is None else [others[model]]):
            entry = data["models"][k]
            entry["parameters"] = {**(entry.get("parameters") or {}), param: value}
    else:
        data["parameters"] = {**(data.get("parameters") or {}), param: value}


def _range(value: Any, where: str) -> tuple[float, float, dict[str, Any]]:
    options: dict[str, Any] = {}
    if isinstance(value, dict):
        unknown = set(value) - {"range", "gradient", "shared"}
        if unknown:
            raise WeightsmithError(f"search: {where} has unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                                   "(use range, gradient, shared)")
        if "range" not in value:
            raise WeightsmithError(f"search: {where} needs range: [low, high]")
        options = {k: v for k, v in value.items() if k != "range"}
        value = value["range"]
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
        raise WeightsmithError(f"search: {where} must be [low, high] (two numbers), got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise WeightsmithError(f"search: {where} must have low < high, got [{value[0]}, {value[1]}]")
    return low, high, options


def _dimensions(search: Any, base: MergeRecipe) -> list[Dimension]:
    if not isinstance(search, dict) or not search:
        raise WeightsmithError("search: search must map parameter names to ranges, e.g. weight: [0, 1]")
    method = base.method
    n_models = len(base.models if method.needs_base == "none" else base.non_base_models())
    dims: list[Dimension] = []
    for name, value in search.items():
        name = str(name)
        if name == "lines":
            if not isinstance(value, dict) or not value or set(value) - {"alpha", "beta"}:
                raise WeightsmithError("search: lines must be {alpha: [low, high], beta: [low, high]}")
            if not method.task_vector or not base.base_model:
                raise WeightsmithError(f"search: lines scales a task vector; {method.name} needs one and a base_model")
            for k in ("alpha", "beta"):
                if k in value:
                    low, high, opts = _range(value[k], f"lines.{k}")
                    if opts:
                        raise WeightsmithError(f"search: lines.{k} takes a plain [low, high]")
                    dims.append(Dimension(f"lines.{k}", low, high, f"lines.{k}"))
            continue
        spec = method.param(name)
        if spec is None:
            names = ", ".join([p.name for p in method.parameters if p.type != "bool"] + ["lines"])
            raise WeightsmithError(f"search: {name} is not a parameter of {method.name} (searchable: {names})")
        if spec.type != "float":
            raise WeightsmithError(f"search: {name} is a {spec.type} parameter; only numbers are searched")
        low, high, opts = _range(value, name)
        for bound in (low, high):
            spec.coerce(bound, f"search: {name} range")
        points = opts.get("gradient", 1)
        if isinstance(points, bool) or not isinstance(points, int) or not 1 <= points <= MAX_GRADIENT:
            raise WeightsmithError(f"search: {name}.gradient must be a whole number of points, 1 to {MAX_GRADIENT}")
        shared = opts.get("shared", not spec.per_model)
        if not isinstance(shared, bool):
            raise WeightsmithError(f"search: {name}.shared must be true or false")
        if not spec.per_model and not shared:
            raise WeightsmithError(f"search: {name} is one value for all models in {method.name}; it cannot be per model")
        models: list[int | None] = [None] if shared else list(range(n_models))
        for m in models:
            for g in range(points) if points > 1 else [None]:
                label = name + ("" if m is None else f".{m}") + ("" if g is None else f".g{g}")
                dims.append(Dimension(label, low, high, name, m, g))
    if len(dims) > MAX_DIMENSIONS:
        raise WeightsmithError(f"search: {len(dims)} dimensions; at most {MAX_DIMENSIONS}")
    return dims


def _tasks(value: Any) -> list[ScoredTask]:
    if not isinstance(value, list) or not value:
        raise WeightsmithError("search: tasks must be a non-empty list of {task, metric, weight}")
    out: list[ScoredTask] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"task": item}
        if not isinstance(item, dict) or "task" not in item:
            raise WeightsmithError(f"search: tasks[{i}] must be a mapping with a task key")
        unknown = set(item) - {"task", "metric", "weight"}
        if unknown:
            raise WeightsmithError(f"search: tasks[{i}] has unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                                   "(use task, metric, weight)")
        task = load_task(str(item["task"]))
        metric = item.get("metric", DEFAULT_METRIC.get(task.kind))
        if metric is None:
            raise WeightsmithError(f"search: tasks[{i}] ({task.name}) needs a metric: one of "
                                   f"{', '.join(METRICS[task.kind])}")
        if metric not in METRICS[task.kind]:
            raise WeightsmithError(f"search: tasks[{i}] metric {metric!r} is not a metric of {task.name} "
                                   f"({task.kind}: {', '.join(METRICS[task.kind])})")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight == 0:
            raise WeightsmithError(f"search: tasks[{i}] weight must be a non-zero number, got {weight!r}")
        out.append(ScoredTask(task, str(metric), float(weight)))
    keys = [(t.task.name, t.metric) for t in out]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice:
        raise WeightsmithError(f"search: task {twice[0]} is listed twice with metric {twice[1]}")
    files = {}
    for t in out:  # the same name must be the same file (a style task may count caps and pirate both)
        if files.setdefault(t.task.name, t.task.digest) != t.task.digest:
            raise WeightsmithError(f"search: two different task files are named {t.task.name}")
    return out


def _settings(value: Any) -> EvalSettings:
    if value is None:
        return EvalSettings()
    if not isinstance(value, dict):
        raise WeightsmithError(f"search: eval must be a mapping of {', '.join(EVAL_KEYS)}")
    unknown = set(value) - set(EVAL_KEYS)
    if unknown:
        raise WeightsmithError(f"search: eval has unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                               f"(supported: {', '.join(EVAL_KEYS)})")
    for k, v in value.items():
        ok = isinstance(v, bool) if k == "chat" else (v is None or (isinstance(v, int) and not isinstance(v, bool)))
        if not ok:
            raise WeightsmithError(f"search: eval.{k} must be {'true or false' if k == 'chat' else 'a whole number'}")
    try:
        return EvalSettings(**value)
    except WeightsmithError as e:
        raise WeightsmithError(f"search: eval: {e}") from None


def _budget(value: Any) -> tuple[int | None, float | None]:
    if not isinstance(value, dict) or not value or set(value) - {"trials", "minutes"}:
        raise WeightsmithError("search: budget must be {trials: N} and/or {minutes: M}")
    trials, minutes = value.get("trials"), value.get("minutes")
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise WeightsmithError(f"search: budget.trials must be a whole number >= 1, got {trials!r}")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                or not math.isfinite(minutes) or minutes <= 0):
        raise WeightsmithError(f"search: budget.minutes must be a positive number, got {minutes!r}")
    return trials, None if minutes is None else float(minutes)


def _recipe_error(spec: SearchSpec, values: dict[str, float]) -> None:
    """Build the recipe of ``values``; a recipe error becomes a ``search:`` line."""
    try:
        spec.recipe(values)
    except WeightsmithError as e:
        raise WeightsmithError(_prefixed(e)) from None
