"""Evolutionary merge search on the demo model with the two demo adapters, against 5 hand-picked recipes.

The two adapters enter as ``base+lora`` models (``demo+assets/adapters/caps``...). Every task is
split in two by item parity: the search tunes on the even items, and every recipe (the search's
best and the hand-picked ones) is reported on the odd items it never saw. The score is
caps rate + pirate rate (style prompts) + capitals accuracy (multiple choice): a merge that keeps
both styles without losing what the base knows.

Prints the search curve (score and best so far per trial), the comparison table (tune and
held-out scores of each recipe), the machine's load before and after, and writes a plot.

    nice -n 10 .venv/bin/python bench/evolve_search.py --minutes 20
    .venv/bin/python bench/evolve_search.py --caps path/to/caps --pirate path/to/pirate --minutes 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from checkpoints.jobs import tqdm_job  # noqa: E402
from evaluation.tasks import load_task  # noqa: E402
from merging.engine import run_merge  # noqa: E402
from evaluation.run import evaluate_models, model_from_ref  # noqa: E402
from merging.evolve import run_search  # noqa: E402
from merging.evolve_plots import search_figure  # noqa: E402
from merging.evolve_space import SearchSpec  # noqa: E402
from merging.recipe import MergeRecipe  # noqa: E402

SPLIT_TASKS = ("style-prompts", "capitals-mc")


def split_tasks(folder: Path) -> dict[str, dict[str, Path]]:
    """Each task's items by parity: {"tune": {task: path}, "report": {...}} (JSONL files in ``folder``)."""
    out: dict[str, dict[str, Path]] = {"tune": {}, "report": {}}
    for name in SPLIT_TASKS:
        lines = [ln for ln in load_task(name).source.read_text(encoding="utf-8").splitlines() if ln.strip()]
        for split, rows in (("tune", lines[0::2]), ("report", lines[1::2])):
            path = folder / f"{name}-{split}.jsonl"
            path.write_text("\n".join(rows) + "\n", encoding="utf-8")
            out[split][name] = path
    return out


def search_yaml(caps: str, pirate: str, tasks: dict[str, Path], minutes: float, limit_tokens: int) -> str:
    return f"""
merge_method: task_arithmetic
base_model: demo
models: [demo+{caps}, demo+{pirate}]
search:
  weight: [0.0, 2.0]
  lines: {{alpha: [0.0, 1.0], beta: [0.0, 1.0]}}
tasks:
  - {{task: {tasks['style-prompts']}, metric: caps}}
  - {{task: {tasks['style-prompts']}, metric: pirate}}
  - {{task: {tasks['capitals-mc']}, metric: acc}}
eval: {{max_new_tokens: {limit_tokens}, batch_size: 8}}
budget: {{minutes: {minutes}}}
seed: 0
"""


def hand_recipes(caps: str, pirate: str) -> dict[str, str]:
    """Five recipes a user would try first."""
    a, b = f"demo+{caps}", f"demo+{pirate}"
    ta = "merge_method: task_arithmetic\nbase_model: demo\n"
    return {
        "task arithmetic 1/1": ta + f"models: [{{model: {a}, parameters: {{weight: 1}}}}, {{model: {b}, parameters: {{weight: 1}}}}]\n",
        "task arithmetic 0.5/0.5": ta + f"models: [{{model: {a}, parameters: {{weight: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.5}}}}]\n",
        "task arithmetic 1/1 + LiNeS 0.5/0.5": ta + f"models: [{{model: {a}, parameters: {{weight: 1}}}}, {{model: {b}, parameters: {{weight: 1}}}}]\nlines: {{alpha: 0.5, beta: 0.5}}\n",
        "ties 1/1 density 0.5": "merge_method: ties\nbase_model: demo\n" + f"models: [{{model: {a}, parameters: {{weight: 1, density: 0.5}}}}, {{model: {b}, parameters: {{weight: 1, density: 0.5}}}}]\n",
        "slerp t=0.5": f"merge_method: slerp\nbase_model: {a}\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{t: 0.5}}\n",
    }


def score_recipe(recipe: MergeRecipe, specs: dict[str, SearchSpec], scratch: Path, name: str) -> dict[str, tuple]:
    """Merge ``recipe`` once and score it on every split in one evaluation (the model is loaded once)."""
    folder = scratch / name.replace(" ", "_").replace("/", "-")
    run_merge(recipe, folder, collect_norms=False, overwrite=True)
    try:
        model = model_from_ref(str(folder), cache=None, name=name)
        tasks = [t for spec in specs.values() for t in spec.task_files()]
        result = evaluate_models([model], tasks, settings=next(iter(specs.values())).settings, cache=None)
        return {split: spec.fitness(result, name) for split, spec in specs.items()}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caps", default=str(ROOT / "assets/adapters/caps"), help="the caps adapter folder")
    ap.add_argument("--pirate", default=str(ROOT / "assets/adapters/pirate"), help="the pirate adapter folder")
    ap.add_argument("--minutes", type=float, default=20.0, help="the search's time budget")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine a second thread spins more than it helps)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp folder, removed)")
    ap.add_argument("--plot", type=Path, default=ROOT / "assets/plots/evolve_search.png")
    ap.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="evolve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load before: {os.getloadavg()}; threads {args.threads}; adapters {args.caps}, {args.pirate}")
    tasks = split_tasks(work)
    specs = {split: SearchSpec.from_yaml(search_yaml(args.caps, args.pirate, tasks[split], args.minutes,
                                                     args.max_new_tokens)) for split in ("tune", "report")}
    started = time.time()
    hand: dict[str, dict[str, tuple]] = {}
    for name, text in hand_recipes(args.caps, args.pirate).items():
        t0 = time.time()
        hand[name] = score_recipe(MergeRecipe.from_yaml(text), specs, work, name)
        print(f"hand-picked {name}: tune {hand[name]['tune'][0]:.4f}, held-out {hand[name]['report'][0]:.4f} "
              f"({time.time() - t0:.0f} s)")
    state = work / "search"
    shutil.rmtree(state, ignore_errors=True)
    t0, cpu0 = time.time(), time.process_time()
    with tqdm_job("searching") as job:  # search only: the best is merged and scored on the held-out half below
        result = run_search(specs["tune"], None, job=job, state_dir=state)
    search_seconds, search_cpu = time.time() - t0, time.process_time() - cpu0
    best_report = score_recipe(result.best.recipe, {"report": specs["report"]}, work, "search best")["report"]
    complete = [t for t in result.trials if t.state == "complete"]
    print(f"\nsearch: {len(complete)} trials in {search_seconds / 60:.1f} min wall, {search_cpu / 60:.1f} min of CPU "
          f"({result.stopped}; load now {os.getloadavg()[0]:.1f}); curve:")
    print("trial  tune score  best so far")
    best = float("-inf")
    for t in complete:
        best = max(best, t.score)
        print(f"{t.number:5d}  {t.score:10.4f}  {best:11.4f}")
    print("\nrecipe                                  tune    held-out   (held-out parts)")
    rows = [(n, s["tune"], s["report"]) for n, s in hand.items()]
    rows.append((f"search best (trial {result.best.number})", (result.best.score, result.best.parts), best_report))
    for name, tune, report in rows:
        parts = ", ".join(f"{k.split(':')[1]} {v:.3f}" for k, v in report[1].items())
        print(f"{name:38s} {tune[0]:7.4f}  {report[0]:8.4f}   ({parts})")
    best_hand = max(hand, key=lambda n: hand[n]["report"][0])
    margin = best_report[0] - hand[best_hand]["report"][0]
    verdict = "beats" if margin > 0 else "does not beat"
    print(f"\nheld-out: the search's best {verdict} the best hand-picked recipe ({best_hand}, "
          f"{hand[best_hand]['report'][0]:.4f}) by {margin:+.4f}")
    print("best recipe:\n" + result.best.recipe.to_yaml())
    print(f"load after: {os.getloadavg()}; whole bench {(time.time() - started) / 60:.1f} min")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig = search_figure(result.trials, references={f"{n} (tune)": s["tune"][0] for n, s in hand.items()})
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({
            "hand": {n: {k: list(v) for k, v in s.items()} for n, s in hand.items()},
            "search": {"best": result.best.number, "tune": result.best.score, "report": list(best_report),
                       "trials": [vars(t) for t in result.trials], "minutes": search_seconds / 60,
                       "cpu_minutes": search_cpu / 60},
        }, indent=1))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
