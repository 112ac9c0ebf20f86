"""``weightsmith evolve SEARCH.yaml OUT``: an evolutionary merge search with a tqdm bar (parsing and printing only)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from checkpoints.errors import WeightsmithError


def _evolve(args: argparse.Namespace) -> int:
    from .commands import with_bar
    from .evolve import run_search
    from .evolve_space import SearchSpec

    path = Path(args.search)
    if not path.is_file():
        raise WeightsmithError(f"{args.search}: no such search file")
    spec = SearchSpec.from_yaml(path)
    out = None if args.no_output else Path(args.out_dir)
    state = Path(f"{args.out_dir}.search") if args.no_output else None
    previous = signal.getsignal(signal.SIGINT)
    try:
        result = with_bar("searching", lambda job: run_search(
            spec, out, job=_cancel_on_interrupt(job), storage=args.storage, study_name=args.study,
            device=args.device, threads=args.threads or None, overwrite=args.allow_overwrite, max_trials=args.trials,
            state_dir=state))
    finally:
        signal.signal(signal.SIGINT, previous)
    complete = [t for t in result.trials if t.state == "complete"]
    best_so_far = float("-inf")
    print("trial  score     best so far")
    for t in complete:
        best_so_far = max(best_so_far, t.score)  # type: ignore[type-var]
        print(f"{t.number:5d}  {t.score:8.4f}  {best_so_far:8.4f}")
    b = result.best
    print(f"stopped: {result.stopped}; {result.ran_here} trial(s) ran here, {len(complete)} complete in study "
          f"{result.study}")
    print(f"best: trial {b.number}, score {b.score:.4f} (" + ", ".join(f"{k} {v:.4f}" for k, v in b.parts.items())
          + ")")
    print(b.recipe.to_yaml().rstrip())
    if result.out_dir is not None:
        print(f"wrote {result.out_dir} (scored again: {result.verified_score:.4f}); trial log "
              f"{result.state_dir}/trials.jsonl")
    return 0


def _cancel_on_interrupt(job):
    """Ctrl-C cancels ``job``: the running trial stops at its next check and is marked failed in the study
    (an interrupt raised anywhere could leave it "running"); a second Ctrl-C interrupts at once."""
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        job.cancel()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    return job


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evolve", help="search merge parameters with CMA-ES, scored on evaluation tasks; write the best merge",
        description="Evolutionary merge search: SEARCH.yaml names the models, the method, the parameters to "
                    "search with their ranges (per-model weights, densities, LiNeS alpha/beta, depth gradients), "
                    "the tasks with their weights, and a budget. Trials are merged, scored and logged "
                    "(OUT.search/trials.jsonl); rerun the same command to resume after a kill. Several machines "
                    "share one search with --storage (an optuna database URL or journal file).")
    p.add_argument("search", help="search file (YAML; see the README's 'Evolutionary merge search')")
    p.add_argument("out_dir", help="where the best merge is written (its search state goes to OUT.search beside it)")
    p.add_argument("--storage", default=None,
                   help="optuna storage shared by every worker: sqlite:///path.db, postgresql://..., or a journal "
                        "file path (default OUT.search/journal.log)")
    p.add_argument("--study", default=None, help="study name (default: evolve-<hash of the search space and tasks>)")
    p.add_argument("--trials", type=int, default=None, help="override the file's budget.trials (whole study)")
    p.add_argument("--no-output", action="store_true",
                   help="a worker that only runs trials (another one writes the best merge)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 keeps torch's default)")
    p.add_argument("--allow-overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=_evolve)
