"""``weightsmith merge RECIPE.yaml OUT_DIR``: run a mergekit-style recipe with a tqdm bar."""

from __future__ import annotations

import argparse

import os
from pathlib import Path

from checkpoints.errors import WeightsmithError
from checkpoints.sizes import parse_size

# Let torch back large tensors with transparent huge pages. A merge allocates
# and touches hundreds of MB per tensor; with 4 KB pages the page faults cost
# more than the arithmetic (5-10x on this kind of VM). torch reads the variable
# once, at its first allocation, so it is set when the CLI loads its command
# modules, before torch is imported. Set THP_MEM_ALLOC_ENABLE=0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

def _merge(args: argparse.Namespace) -> int:
    from checkpoints.tensor_loading import keep_freed_buffers

    from .multistage import run_recipe

    keep_freed_buffers()  # one-shot process: reuse large freed temporaries instead of faulting in new ones
    recipe = open_recipe(args.recipe)
    run = with_bar("merging", lambda job: run_recipe(
        recipe, args.out_dir, job=job, device=args.device, intermediate_dir=args.intermediate_dir,
        max_shard_bytes=parse_size(args.max_shard_size, what="--max-shard-size"),
        overwrite=args.allow_overwrite, seed=args.seed, collect_norms=False,
        threads=args.threads or None, exact_ties=not args.fast_ties, fsync=args.fsync,
        allow_nonfinite=args.allow_nonfinite))
    result = run.result
    for stage in run.stages[:-1]:
        print(f"stage {stage.name}: {'reused' if stage.reused else 'merged'} ({stage.folder}, {stage.seconds:.1f} s)")
    extra = f", LiNeS alpha {result.lines_alpha:.4g}" if result.lines_alpha is not None else ""
    print(f"wrote {result.out_dir} ({result.tensors_changed}/{result.tensors_total} tensors changed, "
          f"{result.output_bytes / 1e9:.2f} GB, {result.seconds:.1f} s{extra}; {result.finite_check})")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    import json

    from .analysis import analyze_recipe
    from .recipe import MergeRecipe

    recipe = MergeRecipe.from_yaml(open_recipe(args.recipe))
    result = with_bar("analysing", lambda job: analyze_recipe(recipe, density=args.density, job=job,
                                                             device=args.device))
    print(result.table())
    if args.json:
        _write_atomic(args.json, lambda tmp: tmp.write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8"))
        print(f"wrote {args.json}")
    if args.plot:
        from .analysis_plots import analysis_figure

        _write_atomic(args.plot, lambda tmp: analysis_figure(result).savefig(tmp, format="png", dpi=110))
        print(f"wrote {args.plot}")
    return 0


def with_bar(desc: str, work):
    """``work(job)`` with the job shown as a tqdm bar; Ctrl-C cancels the job (nothing is written)."""
    from checkpoints.jobs import tqdm_job

    with tqdm_job(desc) as job:
        try:
            return work(job)
        except KeyboardInterrupt:
            job.cancel()
            raise


def _write_atomic(path: str, write) -> None:
    """``write(tmp)`` beside ``path``, then rename: a failed write leaves no partial file."""
    from pathlib import Path

    out = Path(path)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        write(tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def open_recipe(path: str):
    p = Path(path)
    if not p.is_file():
        raise WeightsmithError(f"{path}: no such recipe file")
    return p


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge checkpoints from a mergekit-style YAML recipe (plus LiNeS)")
    p.add_argument("recipe", help="recipe YAML (mergekit format, optional lines: {alpha, beta}; several named "
                                  "documents make a multi-stage recipe, as mergekit-multi runs it)")
    p.add_argument("out_dir", help="output folder (must not exist unless --allow-overwrite)")
    p.add_argument("--intermediate-dir", type=Path, default=None,
                   help="multi-stage recipes: where intermediate stages are cached and reused while unchanged "
                        "(default: the intermediate folder of the Weightsmith cache)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 2GB or 500M (default 5GB)")
    p.add_argument("--allow-overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--seed", type=int, default=None, help="seed for random methods (overrides the recipe's seed)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: merging is memory-bound, and a second thread on a busy "
                        "machine costs more than it gives; 0 keeps torch's default)")
    p.add_argument("--fast-ties", action="store_true",
                   help="TIES/breadcrumbs: break exact ties in |delta| at the density cut by index instead of "
                        "reproducing mergekit's sort order (the default, identical output)")
    p.add_argument("--fsync", action="store_true",
                   help="wait until the weights are on disk before publishing OUT_DIR (survives a power loss; "
                        "slower). Without it a failed or cancelled merge still never leaves a partial folder")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="merge inputs that hold NaN/Inf and write non-finite outputs (reported) instead of stopping "
                        "with an error naming the model and tensor")
    p.set_defaults(func=_merge)

    a = sub.add_parser("analyze", help="task vectors of a recipe's models per block, before merging: norms, "
                                       "cosines, TIES sign conflicts, |tau| kept at a density")
    a.add_argument("recipe", help="recipe YAML with a base_model (mergekit format)")
    a.add_argument("--density", type=float, default=None,
                   help="TIES trim density in (0, 1] for every model (default: the recipe's own; 0.2 for methods "
                        "without one)")
    a.add_argument("--json", metavar="OUT", help="also write every number as JSON")
    a.add_argument("--plot", metavar="OUT.png", help="also save the four plots as a PNG")
    a.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    a.set_defaults(func=_analyze)
