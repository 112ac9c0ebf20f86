"""``evaluate_models``: several models on several tasks, cached, with one progress and cancel protocol.

The CLI (``weightsmith eval``), the app's Evaluate tab and its ``/eval`` endpoint all call
:func:`evaluate_models`. For each model, the cache is asked first with the model's content
hash (:mod:`checkpoints.fingerprint`): a model whose every task is cached is never loaded.

Example::

    result = evaluate_models(["demo", "demo-adapter:caps"], ["capitals-mc", "style-prompts"])
    result.pivot()      # rows (task, metric), a column per model
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from checkpoints.demo_adapters import demo_adapter_path, is_demo_adapter_ref
from checkpoints.errors import WeightsmithError
from checkpoints.fingerprint import checkpoint_digest, file_sha256, module_digest
from checkpoints.jobs import Job, ensure
from checkpoints.model_cache import LoadedModel, release_memory
from checkpoints.peft_adapter import base_plus_adapter, declared_base, is_adapter_folder
from checkpoints.perplexity import token_nll
from checkpoints.sources import resolve

from .cache import EvalCache, result_key
from .scoring import answer_metrics, choice_metrics, choice_requests, greedy_answers, loglikelihoods
from .style import style_scores
from .tasks import Task, load_task

log = logging.getLogger(__name__)

SAMPLES_KEPT = 3  # generated answers kept with a result, to show what was scored
DEFAULT_CACHE = object()
BACKENDS = ("weightsmith", "lm-eval")  # evaluate_models(cache=...) default: EvalCache.default()


@dataclass(frozen=True)
class EvalSettings:
    """What changes a score besides the model and the task (each kind keys its cache by its own)."""

    batch_size: int = 8
    seq_len: int = 256  # perplexity windows (tokens)
    max_tokens: int | None = None  # perplexity: the text's first tokens only
    limit: int | None = None  # question files: the first items only
    max_new_tokens: int = 48  # generation and style answers
    chat: bool = True  # generation and style prompts as a user message through the chat template
    backend: str = "weightsmith"  # or "lm-eval" for multiple choice (evaluation.lm_eval_backend), if installed

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise WeightsmithError(f"{name.replace('_', ' ')} must be at least 1, not {getattr(self, name)}")
        if self.seq_len < 2:
            raise WeightsmithError(f"seq len must be at least 2, not {self.seq_len}")
        for name in ("max_tokens", "limit"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise WeightsmithError(f"{name.replace('_', ' ')} must be at least 1, not {v}")
        if self.backend not in BACKENDS:
            raise WeightsmithError(f"unknown backend {self.backend!r} (have: {', '.join(BACKENDS)})")

    def for_kind(self, kind: str) -> dict[str, Any]:
        """The settings that change a ``kind`` task's score (batch size changes none)."""
        if kind == "perplexity":
            return {"seq_len": self.seq_len, "max_tokens": self.max_tokens}
        if kind == "choice":
            return {"limit": self.limit, **({"backend": self.backend} if self.backend != "weightsmith" else {})}
        return {"limit": self.limit, "max_new_tokens": self.max_new_tokens, "chat": self.chat}


@dataclass
class EvalModel:
    """A model to evaluate: a public ``name``, its content ``digest`` (computed without loading it when
    possible) and how to ``load`` it."""

    name: str
    digest: Callable[[], str]
    load: Callable[[], LoadedModel]
    folder: Path | None = None  # a checkpoint folder (what the lm-eval backend loads)


@dataclass
class TaskScore:
    model: str
    task: str
    kind: str
    metrics: dict[str, float]
    n: int  # questions, answers or predicted tokens
    seconds: float
    cached: bool = False
    samples: list[dict[str, str]] = field(default_factory=list)


@dataclass
class EvalResult:
    scores: list[TaskScore]

    def models(self) -> list[str]:
        return list(dict.fromkeys(s.model for s in self.scores))

    def value(self, model: str, task: str, metric: str) -> float | None:
        for s in self.scores:
            if s.model == model and s.task == task:
                return s.metrics.get(metric)
        return None

    def pivot(self) -> tuple[list[str], list[list[Any]]]:
        """(headers, rows): one row per (task, metric), one column per model (``None`` where missing)."""
        models = self.models()
        keys: dict[tuple[str, str], None] = {}
        for s in self.scores:
            for m in s.metrics:
                keys[(s.task, m)] = None
        rows = [[task, metric, *[self.value(m, task, metric) for m in models]] for task, metric in keys]
        return ["task", "metric", *models], rows

    def to_dict(self) -> dict[str, Any]:
        return {"scores": [asdict(s) for s in self.scores]}


# -- models -----------------------------------------------------------------------------------------------
def _adapter_dir(ref: str, resolve_kw: dict[str, Any]) -> Path | None:
    """The adapter folder ``ref`` names (``demo-adapter:<name>``, or a PEFT adapter folder the policy lets us
    read: any with local paths on, else one inside the trusted roots), or None for a model."""
    if is_demo_adapter_ref(ref):
        return demo_adapter_path(ref)
    path = Path(ref).expanduser()
    if not ref or "\x00" in ref or not path.is_dir() or not is_adapter_folder(path):
        return None
    roots = [Path(r).resolve() for r in resolve_kw.get("trusted_roots", ())]
    if resolve_kw.get("allow_local", True) or any(path.resolve().is_relative_to(r) for r in roots):
        return path
    return None


def model_from_ref(ref: str, *, device: str = "cpu", cache: EvalCache | None = None, name: str | None = None,
                   base: str | None = None, **resolve_kw) -> EvalModel:
    """A model reference as :func:`checkpoints.sources.resolve` takes it, or an adapter applied to its base
    (``demo-adapter:<name>`` or a PEFT adapter folder; ``base`` overrides the base its config declares): the
    adapter's merged weights are what is scored. ``name`` is what tables show (default: ``ref``)."""
    ref = str(ref).strip()
    name = name or ref
    file_digest = cache.file_digest if cache is not None else file_sha256
    adapter_dir = _adapter_dir(ref, resolve_kw)
    if adapter_dir is None:
        ckpt = resolve(ref, **resolve_kw)
        folder = ckpt.support_dir if all(Path(f).parent == Path(ckpt.support_dir) for f in ckpt.files) else None
        return EvalModel(name, lambda: checkpoint_digest(ckpt, file_digest=file_digest),
                         lambda: LoadedModel(ckpt.load_model(device=device), ckpt.load_tokenizer(), name), folder)
    base_ckpt = resolve(base or declared_base(adapter_dir), **resolve_kw)

    def adapter_digest() -> str:  # the base's content, and the adapter's config and factors
        files = sorted(p for p in adapter_dir.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
        return _joined("adapter", checkpoint_digest(base_ckpt, file_digest=file_digest),
                       *[f"{p.name}:{file_digest(p)}" for p in files])

    return EvalModel(name, adapter_digest, lambda: LoadedModel(
        base_plus_adapter(base_ckpt, adapter_dir, device=device), base_ckpt.load_tokenizer(), name))


def model_in_memory(name: str, model, tokenizer) -> EvalModel:
    """A model that exists only in memory (e.g. a merge being searched), keyed by its parameters."""
    return EvalModel(name, lambda: module_digest(model), lambda: LoadedModel(model, tokenizer, name))


def _joined(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


# -- tasks ------------------------------------------------------------------------------------------------
def score_task(loaded: LoadedModel, task: Task, settings: EvalSettings, job: Job) -> TaskScore:
    """One task on one loaded model (not cached)."""
    model, tok = loaded.model, loaded.tokenizer
    t0 = time.monotonic()
    if task.kind == "perplexity":
        ids = tok(task.text, add_special_tokens=False)["input_ids"]
        if settings.max_tokens:
            ids = ids[:settings.max_tokens]
        nll, count = token_nll(model, ids, seq_len=settings.seq_len, batch_size=settings.batch_size, job=job)
        return TaskScore(loaded.name, task.name, task.kind, {"perplexity": math.exp(nll / count)}, count,
                         time.monotonic() - t0)
    items = task.head(settings.limit)
    if task.kind == "choice":
        lls = loglikelihoods(model, tok, choice_requests(items), batch_size=settings.batch_size, job=job)
        per, at = [], 0
        for it in items:
            per.append(choice_metrics(it, [ll for ll, _ in lls[at:at + len(it.choices)]]))
            at += len(it.choices)
        metrics = {k: sum(p[k] for p in per) / len(per) for k in ("acc", "acc_norm")}
        return TaskScore(loaded.name, task.name, task.kind, metrics, len(items), time.monotonic() - t0)
    answers = greedy_answers(model, tok, [it.prompt for it in items], max_new_tokens=settings.max_new_tokens,
                             chat=settings.chat, batch_size=settings.batch_size, job=job)
    if task.kind == "generate":
        per = [answer_metrics(a, it.answers) for a, it in zip(answers, items)]
        metrics = {k: sum(p[k] for p in per) / len(per) for k in ("exact_match", "contains")}
    else:
        metrics = style_scores(answers)
    samples = [{"prompt": it.prompt, "answer": a} for it, a in list(zip(items, answers))[:SAMPLES_KEPT]]
    return TaskScore(loaded.name, task.name, task.kind, metrics, len(items), time.monotonic() - t0,
                     samples=samples)


def lm_eval_score(spec: EvalModel, task: Task, settings: EvalSettings, device: str, job: Job) -> TaskScore:
    """One multiple-choice task scored by lm-eval-harness (optional backend) on a checkpoint folder."""
    from .lm_eval_backend import choice_scores

    if task.kind != "choice" or task.source is None:
        raise WeightsmithError(f"the lm-eval backend scores multiple-choice files only ({task.name} is {task.kind})")
    if spec.folder is None:
        raise WeightsmithError(f"{spec.name}: the lm-eval backend takes model folders (not adapters or bare files)")
    job.progress(None, f"{spec.name}: {task.name} with lm-eval")
    t0 = time.monotonic()
    metrics = choice_scores(spec.folder, task.source, limit=settings.limit, batch_size=settings.batch_size,
                            device=device)
    return TaskScore(spec.name, task.name, task.kind, metrics, len(task.head(settings.limit)), time.monotonic() - t0)


def evaluate_models(models: Sequence[str | EvalModel], tasks: Sequence[str | Path | Task], *,
                    settings: EvalSettings | None = None, job: Job | None = None, device: str = "cpu",
                    cache: EvalCache | None | object = DEFAULT_CACHE, **resolve_kw) -> EvalResult:
    """Score every model on every task.

    ``models``: references (``demo``, a folder, a Hub id, ``demo-adapter:caps``, an adapter folder) or
    :class:`EvalModel`; ``tasks``: bundled task names, task files or loaded :class:`Task`. Results come
    from ``cache`` when the model's content, the task file and the settings that matter are the same
    (``cache=None``: no cache). ``resolve_kw`` is the resolver's policy (the app passes its own).
    Reports through ``job`` (a part per model and task) and stops at the next batch on a cancel.
    """
    if not models:
        raise WeightsmithError("no model to evaluate")
    if not tasks:
        raise WeightsmithError("no task: name a bundled task or a task file")
    settings = settings or EvalSettings()
    job = ensure(job)
    store = EvalCache.default() if cache is DEFAULT_CACHE else cache
    loaded_tasks = [t if isinstance(t, Task) else load_task(t) for t in tasks]  # every file checked first
    task_names = [t.name for t in loaded_tasks]
    if len(set(task_names)) < len(task_names):
        raise WeightsmithError(f"task {next(n for n in task_names if task_names.count(n) > 1)} is named twice")
    specs = [m if isinstance(m, EvalModel) else model_from_ref(m, device=device, cache=store, **resolve_kw)
             for m in models]
    names = [s.name for s in specs]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise WeightsmithError(f"model {twice} is named twice")
    scores: list[TaskScore] = []
    for i, spec in enumerate(specs):
        part = job.part(i / len(specs), (i + 1) / len(specs))
        part.check("the evaluation")
        part.progress(0.0, f"{spec.name}: hashing its weights")
        digest = spec.digest()
        keys = [result_key(digest, t.digest, t.kind, settings.for_kind(t.kind)) for t in loaded_tasks]
        hits = [store.get(k) if store is not None else None for k in keys]
        loaded: LoadedModel | None = None
        try:
            for j, (task, key, hit) in enumerate(zip(loaded_tasks, keys, hits)):
                sub = part.part(j / len(loaded_tasks), (j + 1) / len(loaded_tasks))
                if hit is not None:
                    hit.update(model=spec.name, task=task.name, cached=True)
                    scores.append(TaskScore(**hit))
                    job.note(f"{spec.name} on {task.name}: from the cache")
                    continue
                if settings.backend == "lm-eval":
                    score = lm_eval_score(spec, task, settings, device, sub)
                    scores.append(score)
                    if store is not None:
                        store.put(key, {k: v for k, v in asdict(score).items() if k not in ("model", "task", "cached")})
                    continue
                if loaded is None:
                    sub.progress(0.0, f"loading {spec.name}")
                    loaded = spec.load()
                    loaded = LoadedModel(loaded.model, loaded.tokenizer, spec.name)
                sub.progress(0.0, f"{spec.name}: {task.name}")
                score = score_task(loaded, task, settings, sub)
                scores.append(score)
                if store is not None:
                    store.put(key, {k: v for k, v in asdict(score).items() if k not in ("model", "task", "cached")})
        finally:
            if loaded is not None:
                del loaded
                release_memory()
    job.progress(1.0, "evaluation done")
    return EvalResult(scores)
