"""Task-vector analysis before merging: what a recipe's models changed, block by block, and how they collide.

For a recipe with a ``base_model``, each model's task vector is τᵢ = θᵢ − θ_base. Per row
(the embeddings, each transformer block by the index the architecture map gives it, the
final norm and the head; :mod:`checkpoints.arch`, never a guess from shapes) it reports:

* ``‖τᵢ‖₂``: each model's task-vector L2 norm;
* ``cos(τᵢ, τⱼ)``: the pairwise cosine similarity of the task vectors;
* the **TIES sign-conflict rate**. Each τᵢ is trimmed as TIES trims it: the ``max(1, ⌊d·n⌋)``
  entries of largest |τᵢ| of each tensor are kept, the rest set to 0 (``d`` the density;
  :func:`merging.methods.sparsify.magnitude`, the merge's own code). A parameter is *kept*
  when at least one model's trimmed, weighted value ``wᵢ·τ̂ᵢ`` is nonzero, and *in conflict*
  when those nonzero values do not all have the same sign. Equivalently (mergekit's ``sum``
  consensus, PEFT's ``calculate_majority_sign_mask(..., "total")``, which this module calls):
  the elected sign is sgn(Σᵢ wᵢ·τ̂ᵢ) and some kept value disagrees with it, so TIES's disjoint
  merge drops it. The rate is conflicts / kept parameters;
* the **kept fraction** ``‖τ̂ᵢ‖₁ / ‖τᵢ‖₁``: how much of each model's |τ| mass the density keeps.

The density is ``density`` when given; otherwise each model's own density as the recipe
resolves it per tensor (mergekit's default 1.0 when a TIES-family recipe leaves it out),
and :data:`DEFAULT_DENSITY` for methods that take none. Weights ``wᵢ`` are the recipe's
``weight`` where the method has one, else 1 (only their signs matter for the conflicts).

Tensors are read lazily, one output tensor at a time, from the checked headers
(:class:`checkpoints.tensor_loading.Prefetcher`, as the merge engine reads them), in float32;
sums are accumulated in float64. Progress and cancel go through one :class:`checkpoints.jobs.Job`.

Example::

    result = analyze_recipe(MergeRecipe.from_yaml("recipe.yml"), density=0.2)
    print(result.table())
    result.total.cosine        # whole-model pairwise cosines
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Job, ensure
from checkpoints.tensor_loading import Prefetcher, TensorLoader

from .methods import get_method, sparsify
from .methods.task_arithmetic import calculate_majority_sign_mask
from .planning import TensorPlan, check_compatible, plan_merge, plan_numel, resolve_models, resolve_params
from .recipe import MergeRecipe

log = logging.getLogger(__name__)

DEFAULT_DENSITY = 0.2  # TIES's k = 20 %, for methods that take no density (task_arithmetic, linear...)

# Stacked task-vector slices are this many entries per model, so the (T, chunk) temporaries
# stay a few MB whatever the tensor size.
_CHUNK = 1 << 18

ROW_ORDER = {"embedding": 0, "block": 1, "final_norm": 2, "head": 3, "other": 4}
ROW_LABELS = {"embedding": "embeddings", "final_norm": "final norm", "head": "head", "other": "other"}


@dataclass
class RowStats:
    """Sums over one row's tensors (or the whole model), from which the reported numbers follow.

    ``gram[i][j]`` = Σ τᵢ·τⱼ; ``l1[i]`` = ‖τᵢ‖₁; ``kept_l1[i]`` = ‖τ̂ᵢ‖₁ after the trim;
    ``kept`` = parameters with at least one nonzero trimmed value; ``conflicts`` = those whose
    nonzero trimmed values disagree in sign; ``numel`` = parameters in the row.
    """

    label: str
    kind: str
    block: int | None
    gram: list[list[float]]
    l1: list[float]
    kept_l1: list[float]
    kept: int = 0
    conflicts: int = 0
    numel: int = 0

    @classmethod
    def empty(cls, label: str, kind: str, block: int | None, n: int) -> RowStats:
        return cls(label, kind, block, [[0.0] * n for _ in range(n)], [0.0] * n, [0.0] * n)

    def add(self, other: RowStats) -> None:
        for i, row in enumerate(other.gram):
            for j, v in enumerate(row):
                self.gram[i][j] += v
        self.l1 = [a + b for a, b in zip(self.l1, other.l1)]
        self.kept_l1 = [a + b for a, b in zip(self.kept_l1, other.kept_l1)]
        self.kept += other.kept
        self.conflicts += other.conflicts
        self.numel += other.numel

    @property
    def norms(self) -> list[float]:
        """‖τᵢ‖₂ of each model."""
        return [math.sqrt(max(0.0, self.gram[i][i])) for i in range(len(self.gram))]

    @property
    def cosine(self) -> list[list[float | None]]:
        """cos(τᵢ, τⱼ); None where a task vector is zero (the angle is undefined)."""
        n = self.norms
        return [[self.gram[i][j] / (n[i] * n[j]) if n[i] > 0 and n[j] > 0 else None for j in range(len(n))]
                for i in range(len(n))]

    @property
    def kept_fraction(self) -> list[float | None]:
        """‖τ̂ᵢ‖₁ / ‖τᵢ‖₁ of each model; None where τᵢ is zero."""
        return [k / a if a > 0 else None for k, a in zip(self.kept_l1, self.l1)]

    @property
    def conflict_rate(self) -> float | None:
        """conflicts / kept parameters; None when nothing is kept."""
        return self.conflicts / self.kept if self.kept else None

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.label, "kind": self.kind, "block": self.block, "parameters": self.numel,
                "norms": self.norms, "cosine": self.cosine, "kept_fraction": self.kept_fraction,
                "conflict_rate": self.conflict_rate, "conflicts": self.conflicts, "kept": self.kept,
                "l1": self.l1, "kept_l1": self.kept_l1}


@dataclass
class TaskVectorAnalysis:
    """What :func:`analyze_recipe` found: one :class:`RowStats` per row, and the whole model."""

    method: str
    base: str
    models: list[str]
    rows: list[RowStats]
    total: RowStats
    density: float | None  # the density asked for (None: the recipe's own, see the module docstring)
    density_range: list[tuple[float, float]] = field(default_factory=list)  # (min, max) used per model
    seconds: float = 0.0

    @property
    def blocks(self) -> list[RowStats]:
        return [r for r in self.rows if r.kind == "block"]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "base": self.base, "models": self.models, "density": self.density,
                "density_range": [list(r) for r in self.density_range], "seconds": self.seconds,
                "definitions": {
                    "norms": "L2 norm of tau_i = model_i - base over the row",
                    "cosine": "cosine similarity of tau_i and tau_j over the row",
                    "kept_fraction": "L1 norm of tau_i after the TIES magnitude trim / L1 norm of tau_i",
                    "conflict_rate": "parameters whose nonzero trimmed weighted values w_i*trim(tau_i) differ in "
                                     "sign / parameters with at least one nonzero trimmed value",
                },
                "total": self.total.to_dict(), "rows": [r.to_dict() for r in self.rows]}

    def table(self) -> str:
        """A compact text table: one line per row, then the whole model's pairwise cosines."""
        short = [f"m{i + 1}" for i in range(len(self.models))]
        head = (["row"] + [f"|tau| {s}" for s in short] + [f"kept {s}" for s in short]
                + ["conflict", "mean cos"])
        lines = [head]
        for r in [*self.rows, self.total]:
            pairs = [c for i, row in enumerate(r.cosine) for j, c in enumerate(row) if j > i and c is not None]
            lines.append([r.label] + [f"{v:.4g}" for v in r.norms] + [_pct(v) for v in r.kept_fraction]
                         + [_pct(r.conflict_rate), f"{sum(pairs) / len(pairs):+.3f}" if pairs else "-"])
        widths = [max(len(line[k]) for line in lines) for k in range(len(head))]
        text = ["  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(line, widths)))
                for line in lines]
        legend = [f"{s} = {name} (density {_density_text(rng)})"
                  for s, name, rng in zip(short, self.models, self.density_range or [None] * len(short))]
        cos = ["cosine (whole model): " + "  ".join(
            f"{short[i]}·{short[j]} {c:+.3f}" if c is not None else f"{short[i]}·{short[j]} -"
            for i, row in enumerate(self.total.cosine) for j, c in enumerate(row) if j > i)]
        return "\n".join([f"{self.method} recipe, task vectors against {self.base}:", *legend, *text,
                          *(cos if len(self.models) > 1 else [])])


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _density_text(rng: tuple[float, float] | None) -> str:
    if rng is None:
        return "-"
    lo, hi = rng
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


# ---------------------------------------------------------------------------
# One tensor
# ---------------------------------------------------------------------------

def tensor_stats(taus: list[torch.Tensor], densities: list[float], weights: list[float], *,
                 exact_ties: bool = True) -> RowStats:
    """The sums of :class:`RowStats` for one tensor's task vectors ``taus`` (float32, same shape).

    ``taus`` are trimmed in place (they become TIES's τ̂ᵢ). The trim is
    :func:`merging.methods.sparsify.magnitude` at each model's density; the sign election is
    PEFT's ``calculate_majority_sign_mask`` with "total" (mergekit's ``sum``) on wᵢ·τ̂ᵢ.
    """
    n = len(taus)
    flat = [t.reshape(-1) for t in taus]
    numel = flat[0].numel() if flat else 0
    stats = RowStats.empty("", "", None, n)
    stats.numel = numel
    gram = torch.zeros(n, n, dtype=torch.float64)
    l1 = torch.zeros(n, dtype=torch.float64)
    for start in range(0, numel, _CHUNK):
        chunk = torch.stack([f[start:start + _CHUNK] for f in flat])  # (T, chunk) float32
        gram += (chunk @ chunk.T).double()
        l1 += chunk.abs().sum(dim=1, dtype=torch.float64)
    kept_l1 = []
    for f, d in zip(flat, densities):
        sparsify.magnitude(f, d, exact_ties=exact_ties)  # in place: f is now τ̂
        kept_l1.append(float(f.abs().sum(dtype=torch.float64)))
    w = torch.tensor(weights, dtype=torch.float32).unsqueeze(1)
    for start in range(0, numel, _CHUNK):
        chunk = torch.stack([f[start:start + _CHUNK] for f in flat]).mul_(w)
        agrees = calculate_majority_sign_mask(chunk, method="total")
        nonzero = chunk != 0
        stats.kept += int(nonzero.any(dim=0).sum())
        stats.conflicts += int((nonzero & ~agrees).any(dim=0).sum())
    stats.gram, stats.l1, stats.kept_l1 = gram.tolist(), l1.tolist(), kept_l1
    return stats


# ---------------------------------------------------------------------------
# A recipe
# ---------------------------------------------------------------------------

def analyze_recipe(recipe: MergeRecipe, *, density: float | None = None, job: Job | None = None,
                   device: str = "cpu", exact_ties: bool = True, allow_local: bool = True,
                   trusted_roots: Sequence[Path] = ()) -> TaskVectorAnalysis:
    """Analyse the task vectors of ``recipe``'s models against its base (see the module docstring).

    Args:
        recipe: a validated :class:`MergeRecipe` with a ``base_model`` (per slice, for slices).
        density: the TIES trim density for every model, in (0, 1]; None: the recipe's own.
        job: progress (one step per tensor) and cancel (stops at the next tensor).
        device: where the arithmetic runs ("cpu", "cuda", ...).
        exact_ties: break equal magnitudes at the density cut as mergekit's sort does (see
            :func:`merging.methods.sparsify.rank_range_mask`).
        allow_local, trusted_roots: the resolver's policy (see :func:`checkpoints.sources.resolve`).

    Raises :class:`WeightsmithError` (one line) for a recipe without a base, a model that
    cannot be resolved, incompatible models or a bad density.
    """
    started = time.perf_counter()
    job = ensure(job)
    if density is not None and not (0 < float(density) <= 1):
        raise WeightsmithError(f"analyze: density must be in (0, 1], got {density:g}")
    recipe.validate()
    if not _has_base(recipe):
        raise WeightsmithError("analyze: the recipe has no base_model; task vectors are τ = model − base, so add "
                               "base_model: <the model the others were fine-tuned from>")
    method = recipe.method
    job.progress(0.0, "checking models")
    ckpts = resolve_models(recipe, allow_local=allow_local, trusted_roots=trusted_roots)
    ref = ckpts[recipe.base_model] if recipe.base_model else ckpts[recipe.slices[0].base_model]  # type: ignore[index]
    check_compatible(recipe, ckpts)
    # Methods without a base (linear...) list it under models: plan as the task-vector family does,
    # so the base becomes each plan's base and the others its inputs.
    planner = method if method.needs_base != "none" else get_method("task_arithmetic")
    plans, num_blocks = plan_merge(recipe, planner, ckpts, ref)
    tied = set(ref.spec.tied_head_names(ref.config))
    todo = [p for p in plans if p.base is not None and p.inputs and p.out_name not in tied]
    # A ``models:`` recipe's inputs are its entries, in order (the same checkpoint may be listed twice);
    # slices take their models by reference, each once.
    public = ({a: i.ckpt.name for a, i in enumerate(todo[0].inputs)} if recipe.models and todo
              else {i.ckpt.ref: i.ckpt.name for p in todo for i in p.inputs})
    keys, names = list(public), list(public.values())
    if not todo or not names:
        raise WeightsmithError("analyze: the recipe has no model besides its base to compare against it")
    dev = torch.device(device)
    compute_dtype = recipe.torch_dtype("dtype")
    rows: dict[tuple[int, int], RowStats] = {}
    ranges: list[tuple[float, float] | None] = [None] * len(names)
    sizes = [plan_numel(p) for p in todo]
    capacity = max(sizes)

    def read(i: int, loader: TensorLoader) -> tuple[torch.Tensor, list[torch.Tensor]]:
        plan = todo[i]
        base = loader.get(plan.base.ckpt.reader(), plan.base.name, compute_dtype)  # type: ignore[union-attr]
        return base, [loader.get(inp.ckpt.reader(), inp.name, compute_dtype) for inp in plan.inputs]

    with Prefetcher(sizes, read, capacity, mapped=dev.type == "cpu") as prefetch:
        for i, plan in enumerate(todo):
            job.check("the analysis")
            (base, inputs), _ = prefetch.take(i)
            prefetch.start_after(i)
            if base.is_floating_point():
                base = base.to(dev)
                taus = [torch.sub(t.to(dev), base) for t in inputs]  # fresh float32: the inputs stay untouched
                del inputs, base
                densities, weights = _settings(method, plan, density)
                index = (list(range(len(plan.inputs))) if recipe.models
                         else [keys.index(inp.ckpt.ref) for inp in plan.inputs])
                if len(set(index)) != len(index):
                    raise WeightsmithError(f"analyze: a slice lists the same model twice for tensor {plan.out_name}")
                for k, d in zip(index, densities):
                    lo, hi = ranges[k] or (d, d)
                    ranges[k] = (min(lo, d), max(hi, d))
                stats = tensor_stats(taus, densities, weights, exact_ties=exact_ties)
                del taus
                _row(rows, plan, ref.spec, len(names)).add(_spread(stats, index, len(names)))
            job.step(i + 1, len(todo), plan.out_name)
    ordered = [rows[k] for k in sorted(rows)]
    total = RowStats.empty("whole model", "total", None, len(names))
    for r in ordered:
        total.add(r)
    base_name = ref.name
    log.info("analysed %d tensors of %d models against %s in %.1f s", len(todo), len(names), base_name,
             time.perf_counter() - started)
    return TaskVectorAnalysis(method=method.name, base=base_name, models=names, rows=ordered, total=total,
                              density=density, density_range=[r or (0.0, 0.0) for r in ranges],
                              seconds=time.perf_counter() - started)


def _has_base(recipe: MergeRecipe) -> bool:
    if recipe.models:
        return recipe.base_model is not None
    return all(sl.base_model or recipe.base_model for sl in recipe.slices)


def _settings(method, plan: TensorPlan, density: float | None) -> tuple[list[float], list[float]]:
    """Each input's trim density and sign weight for this tensor."""
    _, per_model = resolve_params(method, plan)
    densities = [float(density) if density is not None
                 else float(p["density"]) if p.get("density") is not None
                 else DEFAULT_DENSITY for p in per_model]
    weights = [float(p["weight"]) if p.get("weight") is not None else 1.0 for p in per_model]
    return densities, weights


def _row(rows: dict[tuple[int, int], RowStats], plan: TensorPlan, spec, n: int) -> RowStats:
    """The row ``plan``'s tensor belongs to: its block (from the plan, which the architecture map
    located), or the non-block part :meth:`checkpoints.arch.ArchSpec.locate` names."""
    if plan.block is not None:
        kind, block, label = "block", plan.block, f"block {plan.block}"
    else:
        kind, block = spec.locate(plan.out_name).kind, None
        label = ROW_LABELS.get(kind, kind)
    key = (ROW_ORDER.get(kind, len(ROW_ORDER)), block if block is not None else 0)
    if key not in rows:
        rows[key] = RowStats.empty(label, kind, block, n)
    return rows[key]


def _spread(stats: RowStats, index: list[int], n: int) -> RowStats:
    """``stats`` over this tensor's inputs, placed at their models' positions among all ``n``
    (a slice recipe may use a different subset of models in each block)."""
    if index == list(range(n)):
        return stats
    out = RowStats.empty("", "", None, n)
    for a, i in enumerate(index):
        out.l1[i], out.kept_l1[i] = stats.l1[a], stats.kept_l1[a]
        for b, j in enumerate(index):
            out.gram[i][j] = stats.gram[a][b]
    out.kept, out.conflicts, out.numel = stats.kept, stats.conflicts, stats.numel
    return out
