"""Does LiNeS do on the demo model what its paper says? A small-scale reproduction.

LiNeS (Wang et al. 2024, arXiv 2410.17146) scales a task vector τ = θ_ft − θ_base per block,
λ(ℓ) = α + β·ℓ/(L−1), and claims (1) on one fine-tune, with β = 1 − α, the fine-tuned task is
kept while general ability comes back, and (2) in multi-task merges (α = ‖Σ τ_t‖₁ / (T·‖τ_merged‖₁),
``alpha: auto``), it beats the same merge without it.

The fine-tunes are ``scripts/finetune_lines.py``'s (full fine-tunes of SmolLM2-135M-Instruct on
two-digit addition and on reversing five letters). Every model here is made by the library as a
user makes it (a :class:`merging.recipe.MergeRecipe` run by :func:`merging.engine.run_merge`, the
recipe's ``lines:`` block) and scored by :func:`evaluation.evaluate_models` (cached by content):

* target tasks: ``lines-add-mc``, ``lines-reverse-mc`` (held-out questions, the first 20 of each;
  accuracy, 4 choices);
* general ability: ``wikitext-excerpt`` perplexity (its first 512 tokens; the fine-tunes never saw
  WikiText) and ``general-mc`` accuracy (30 questions).

Rows: the base; each fine-tune; LiNeS on each fine-tune for every α in :data:`ALPHAS` (β = 1 − α;
α = 1 is the fine-tune itself); task arithmetic, TIES and TSV-M merges of the fine-tunes, each
without LiNeS and with ``lines: {alpha: auto, beta: MERGE_BETA}``.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/lines_reproduction.py   # table + plot

Merges go to ``$WEIGHTSMITH_HOME/lines-bench`` and are reused while their recipe and inputs are
unchanged; the table is also written as JSON beside the plot (``assets/plots/lines_reproduction.*``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from checkpoints.home import weightsmith_home  # noqa: E402
from evaluation import EvalResult, EvalSettings, evaluate_models  # noqa: E402
from evaluation.cache import EvalCache  # noqa: E402
from evaluation.run import model_from_ref  # noqa: E402
from merging.engine import run_merge  # noqa: E402
from merging.lines import LinesConfig  # noqa: E402
from merging.recipe import MergeRecipe  # noqa: E402

log = logging.getLogger("lines_reproduction")

FINETUNE_TASKS = ("add", "reverse")  # scripts/finetune_lines.py's tasks
TARGET = {"add": "lines-add-mc", "reverse": "lines-reverse-mc"}
GENERAL_MC = ("general-mc",)
PERPLEXITY = "wikitext-excerpt"
TASKS = (*TARGET.values(), *GENERAL_MC, PERPLEXITY)
ALPHAS = (0.0, 0.25, 0.5, 0.75)  # LiNeS on one fine-tune: α = γ, β = 1 − γ (α = 1 is the fine-tune)
MERGE_METHODS = ("task_arithmetic", "ties", "tsv_m")
MERGE_BETA = 0.5  # fixed in advance, not tuned (the paper tunes β on validation data)
TIES_DENSITY = 0.2  # the TIES paper's top-20 %
# Controls: the task vector scaled by one λ everywhere, the mean λ of LiNeS at α = 0 (mean of ℓ/(L−1)) and
# the α that ``auto`` gives task arithmetic (1/T): is it the depth profile that helps, or a shorter τ?
CONTROL_SCALE = 0.5
PLOT = ROOT / "assets" / "plots" / "lines_reproduction.png"
TABLE_JSON = ROOT / "assets" / "plots" / "lines_reproduction.json"
# To fit a ~1/6 share of 2 cores: the target tasks' first 20 questions, WikiText's first 512 tokens
# (2 windows of 256); general-mc whole (30 questions).
TARGET_SETTINGS = EvalSettings(limit=20)
GENERAL_SETTINGS = EvalSettings(max_tokens=512)


@dataclass
class Row:
    """One model of the table: its scores as :func:`evaluation.evaluate_models` returned them."""

    name: str
    group: str  # "base", "fine-tune", "lines-single", "merge"
    finetune: str | None = None  # the fine-tune a single-task row belongs to
    alpha: float | None = None  # LiNeS α of the row (None: no LiNeS)
    beta: float | None = None
    method: str | None = None
    scores: dict[str, float] = field(default_factory=dict)  # "task/metric" -> value

    def target(self, task: str) -> float:
        return self.scores.get(f"{TARGET[task]}/acc", float("nan"))

    def tasks(self) -> tuple[str, ...]:
        """What the row is scored on: a single-task LiNeS row skips the other fine-tune's task (CPU time)."""
        if self.group == "lines-single" or (self.group == "control" and self.finetune):
            return (TARGET[self.finetune], *GENERAL_MC, PERPLEXITY)
        return TASKS

    def general_acc(self, counts: dict[str, int]) -> float:
        """The general question sets pooled: correct answers over all their questions."""
        total = sum(counts[t] for t in GENERAL_MC)
        return sum(self.scores[f"{t}/acc"] * counts[t] for t in GENERAL_MC) / total

    @property
    def perplexity(self) -> float:
        return self.scores[f"{PERPLEXITY}/perplexity"]


# -- recipes (what a user writes) ---------------------------------------------------------------------------
def single_task_recipe(base: str, finetune: str, alpha: float) -> MergeRecipe:
    """LiNeS on one fine-tune's task vector: α = γ, β = 1 − γ (``LinesConfig.single_task``)."""
    return MergeRecipe.from_dict({
        "merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
        "models": [{"model": finetune, "parameters": {"weight": 1.0}}],
        "lines": LinesConfig.single_task(alpha).to_dict(),
    })


def multi_task_recipe(method: str, base: str, finetunes: list[str], lines_beta: float | None) -> MergeRecipe:
    """A merge of the fine-tunes; with ``lines_beta``, ``lines: {alpha: auto, beta: lines_beta}``."""
    per_model = {"task_arithmetic": {"weight": 1.0}, "ties": {"weight": 1.0, "density": TIES_DENSITY},
                 "tsv_m": {}}[method]
    data = {"merge_method": method, "base_model": base, "dtype": "float32",
            "models": [{"model": ft, "parameters": dict(per_model)} for ft in finetunes]}
    if lines_beta is not None:
        data["lines"] = {"alpha": "auto", "beta": lines_beta}
    return MergeRecipe.from_dict(data)


def uniform_recipe(base: str, finetunes: list[str], scale: float) -> MergeRecipe:
    """Control: every tensor's summed task vector times the same ``scale`` (task arithmetic, weight = scale)."""
    return MergeRecipe.from_dict({
        "merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
        "models": [{"model": ft, "parameters": {"weight": scale}} for ft in finetunes],
    })


def plan_rows(base: str, finetunes: dict[str, str], alphas=ALPHAS, methods=MERGE_METHODS,
              merge_beta: float = MERGE_BETA, control: float | None = CONTROL_SCALE) -> list[tuple[Row, MergeRecipe | None, str]]:
    """(row, recipe or None, model reference) for every row of the table, in table order."""
    rows: list[tuple[Row, MergeRecipe | None, str]] = [(Row("base", "base"), None, base)]
    for task, ft in finetunes.items():
        rows.append((Row(f"ft-{task}", "fine-tune", finetune=task, alpha=1.0, beta=0.0), None, ft))
    for task, ft in finetunes.items():
        for a in alphas:
            rows.append((Row(f"lines-{task}-a{a:g}", "lines-single", finetune=task, alpha=a, beta=1.0 - a),
                         single_task_recipe(base, ft, a), ""))
    fts = list(finetunes.values())
    for method in methods:
        rows.append((Row(f"{method}", "merge", method=method), multi_task_recipe(method, base, fts, None), ""))
        rows.append((Row(f"{method}+lines", "merge", method=method, alpha=None, beta=merge_beta),
                     multi_task_recipe(method, base, fts, merge_beta), ""))
    if control is not None:
        for task, ft in finetunes.items():
            rows.append((Row(f"uniform-{task}-{control:g}", "control", finetune=task),
                         uniform_recipe(base, [ft], control), ""))
        rows.append((Row(f"task_arithmetic-uniform-{control:g}", "control", method="task_arithmetic"),
                     uniform_recipe(base, fts, control), ""))
    return rows


# -- running ------------------------------------------------------------------------------------------------
def _inputs_tag(recipe: MergeRecipe) -> dict:
    """What a cached merge output was made from: the recipe and each input's weight files (size, mtime)."""
    files = {}
    for ref in recipe.model_refs():
        folder = Path(ref)
        if folder.is_dir():
            files[ref] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors"))
    return {"recipe": recipe.to_yaml(), "files": files}


def make_model(recipe: MergeRecipe, out_dir: Path, *, fresh: bool = False) -> tuple[Path, float | None]:
    """Run ``recipe`` into ``out_dir`` unless an output of the same recipe and inputs is there; returns the
    folder and the LiNeS α the merge used (``auto`` resolved)."""
    tag_file = out_dir / "bench_inputs.json"
    tag = json.loads(json.dumps(_inputs_tag(recipe)))  # as stored: tuples come back as lists
    if not fresh and tag_file.is_file() and json.loads(tag_file.read_text()).get("inputs") == tag:
        return out_dir, json.loads(tag_file.read_text()).get("lines_alpha")
    result = run_merge(recipe, out_dir, overwrite=True, threads=1, collect_norms=False)
    log.info("%s: %s, LiNeS α %s, %.0f s", out_dir.name, result.finite_check, result.lines_alpha, result.seconds)
    tag_file.write_text(json.dumps({"inputs": tag, "lines_alpha": result.lines_alpha}, indent=1))
    return out_dir, result.lines_alpha


def score_rows(refs: list[tuple[Row, str]], tasks=TASKS, *, settings: EvalSettings | None = None,
               cache: EvalCache | None = None) -> EvalResult:
    """Score every row's model with :func:`evaluation.evaluate_models` and store the scores in the rows."""
    cache = cache if cache is not None else EvalCache.default()
    models = [model_from_ref(ref, name=row.name, cache=cache) for row, ref in refs]
    result = evaluate_models(models, list(tasks), settings=settings or EvalSettings(), cache=cache)
    for row, _ in refs:
        row.scores |= {f"{s.task}/{metric}": value for s in result.scores if s.model == row.name
                      for metric, value in s.metrics.items()}
    return result


def question_counts(result: EvalResult) -> dict[str, int]:
    return {s.task: s.n for s in result.scores}


# -- table --------------------------------------------------------------------------------------------------
def _lines_cell(r: Row) -> str:
    if r.group == "lines-single":
        return f"{r.alpha:g}, {r.beta:g}"
    if r.group == "merge" and r.beta is not None:
        return f"auto = {r.alpha:.3g}, {r.beta:g}" if r.alpha is not None else f"auto, {r.beta:g}"
    if r.group == "control":
        return f"none (λ = {CONTROL_SCALE:g} everywhere)"
    return "–"


def table_markdown(rows: list[Row], counts: dict[str, int]) -> str:
    n_general = sum(counts[t] for t in GENERAL_MC)
    lines = [f"| model | LiNeS α, β | add acc | reverse acc | general acc ({n_general} q) | WikiText ppl |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        add, rev = (f"{r.target(t):.3f}" if TARGET[t] + "/acc" in r.scores else "–" for t in FINETUNE_TASKS)
        lines.append(f"| {r.name} | {_lines_cell(r)} | {add} | {rev} | {r.general_acc(counts):.3f} | "
                     f"{r.perplexity:.2f} |")
    return "\n".join(lines)


def plot_reproduction(rows: list[Row], counts: dict[str, int], path: Path) -> None:
    """Left: the single-task sweep (target accuracy, general accuracy, perplexity against α; α = 1 is the
    fine-tune, dotted lines the base). Right: the multi-task merges with and without LiNeS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r.group == "base")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    axes = axes.ravel()
    panels = [("target-task accuracy", lambda r, t: r.target(t), base.target),
              (f"general accuracy ({sum(counts[t] for t in GENERAL_MC)} q)", lambda r, t: r.general_acc(counts),
               lambda t: base.general_acc(counts)),
              ("WikiText perplexity", lambda r, t: r.perplexity, lambda t: base.perplexity)]
    colors = {"add": "tab:blue", "reverse": "tab:orange"}
    for ax, (title, value, base_value) in zip(axes[:3], panels):
        for task in FINETUNE_TASKS:
            pts = sorted((r.alpha, value(r, task)) for r in rows
                         if r.finetune == task and r.group in ("lines-single", "fine-tune"))
            ax.plot([a for a, _ in pts], [v for _, v in pts], "o-", color=colors[task], label=f"ft-{task} + LiNeS")
            for r in rows:
                if r.group == "control" and r.finetune == task:  # same mean λ as α = 0, flat along depth
                    ax.plot([0.0], [value(r, task)], "x", markersize=10, mew=2, color=colors[task],
                            label=f"ft-{task}, λ = {CONTROL_SCALE:g} everywhere")
            ax.axhline(base_value(task), color=colors[task] if title.startswith("target") else "gray",
                       linestyle=":", label="base" if task == FINETUNE_TASKS[0] or title.startswith("target") else None)
        ax.set_xlabel("LiNeS α (β = 1 − α; α = 1: the fine-tune)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    merges = [r for r in rows if r.group == "merge"]
    methods = list(dict.fromkeys(r.method for r in merges))

    def picked(lines_on: bool) -> list[Row]:
        return [next(r for r in merges if r.method == m and (r.beta is not None) == lines_on) for m in methods]

    ax = axes[3]
    width = 0.2
    for k, (label, hatch) in enumerate([("no LiNeS", ""), ("LiNeS", "//")]):
        for j, task in enumerate(FINETUNE_TASKS):
            xs = [i + (2 * k + j - 1.5) * width for i in range(len(methods))]
            ax.bar(xs, [r.target(task) for r in picked(bool(k))], width, color=colors[task], hatch=hatch,
                   edgecolor="black", label=f"{task} acc, {label}")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylim(0, 1)
    ax.set_title("merges of both fine-tunes: target accuracy")
    ax.legend(fontsize=7)
    for ax, (title, value) in zip(axes[4:], [("merges: general accuracy", lambda r: r.general_acc(counts)),
                                             ("merges: WikiText perplexity", lambda r: r.perplexity)]):
        for k, (label, hatch) in enumerate([("no LiNeS", ""), ("LiNeS", "//")]):
            xs = [i + (k - 0.5) * 0.35 for i in range(len(methods))]
            ax.bar(xs, [value(r) for r in picked(bool(k))], 0.35, color="tab:green", hatch=hatch, edgecolor="black",
                   label=label)
        ax.axhline(value(base), color="gray", linestyle=":", label="base")
        ax.set_xticks(range(len(methods)), methods)
        if "perplexity" in title:  # bars from 0 would hide differences of a few percent
            lows = [value(r) for r in merges] + [value(base)]
            ax.set_ylim(0.95 * min(lows), 1.03 * max(lows))
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="demo")
    ap.add_argument("--finetunes-dir", type=Path, default=weightsmith_home() / "lines-finetunes",
                    help="scripts/finetune_lines.py's output (one folder per task)")
    ap.add_argument("--out-dir", type=Path, default=weightsmith_home() / "lines-bench", help="merge outputs")
    ap.add_argument("--fresh", action="store_true", help="merge again even when an output is there")
    ap.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="LiNeS α of the single-task rows")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(1)
    finetunes = {t: str(args.finetunes_dir / t) for t in FINETUNE_TASKS}
    missing = [p for p in finetunes.values() if not Path(p).is_dir()]
    if missing:
        raise SystemExit(f"no fine-tune at {', '.join(missing)}: run scripts/finetune_lines.py first")
    planned = plan_rows(args.base, finetunes, alphas=tuple(args.alphas))
    rows, counts = [], {}
    for row, recipe, ref in planned:  # one model at a time: each result is cached as soon as it exists
        if recipe is not None:
            folder, alpha = make_model(recipe, args.out_dir / row.name, fresh=args.fresh)
            ref = str(folder)
            if row.group == "merge" and row.beta is not None:
                row.alpha = alpha
        targets = [t for t in row.tasks() if t in TARGET.values()]
        general = [t for t in row.tasks() if t not in TARGET.values()]
        for tasks, settings in ((targets, TARGET_SETTINGS), (general, GENERAL_SETTINGS)):
            counts.update(question_counts(score_rows([(row, ref)], tasks, settings=settings)))
        rows.append(row)
        log.info("%s: %s", row.name, row.scores)
    table = table_markdown(rows, counts)
    print(table)
    TABLE_JSON.parent.mkdir(parents=True, exist_ok=True)
    TABLE_JSON.write_text(json.dumps({"counts": counts, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    if not args.no_plot:
        plot_reproduction(rows, counts, PLOT)
        print(f"plot: {PLOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
