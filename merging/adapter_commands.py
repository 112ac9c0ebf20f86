"""``weightsmith mix-adapters`` and ``weightsmith extract-lora``: argument parsing only."""

from __future__ import annotations

import argparse
from pathlib import Path

from checkpoints.errors import WeightsmithError
from checkpoints.jobs import tqdm_job


def _mix(args: argparse.Namespace) -> int:
    from .adapters import AdapterMixRecipe, mix_adapters

    path = Path(args.recipe)
    if not path.is_file():
        raise WeightsmithError(f"{args.recipe}: no such recipe file")
    recipe = AdapterMixRecipe.from_yaml(path)
    with tqdm_job("mixing") as job:
        result = mix_adapters(recipe, Path(args.out_dir), job=job, device=args.device,
                              merge_into_base=True if args.merge_into_base else None,
                              overwrite=args.allow_overwrite)
    exact = "exact in ΔW space" if result.exact_in_delta_w else "not exact in ΔW space (A and B mixed separately)"
    lines = f", LiNeS alpha {result.lines_alpha:.4g}" if result.lines_alpha is not None else ""
    print(f"wrote {result.kind} {result.out_dir} ({result.method}: {exact}; rank {result.rank}, "
          f"{result.modules} modules{lines}, {result.seconds:.1f} s)")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from .lora_extract import extract_lora

    with tqdm_job("extracting") as job:
        res = extract_lora(args.finetuned, args.base, Path(args.out_dir), rank=args.rank, energy=args.energy,
                           device=args.device, job=job, overwrite=args.allow_overwrite)
    print(f"{'module':<48} {'rank':>5} {'energy':>8} {'rel.error':>10}")
    for e in res.layers:
        print(f"{e.module:<48} {e.rank:>5} {e.energy:>8.4f} {e.relative_error:>10.3e}")
    print(f"wrote adapter {res.out_dir} ({len(res.layers)} modules, max rank {res.rank}, "
          f"mean relative error {res.mean_relative_error:.3e}, max {res.max_relative_error:.3e}, {res.seconds:.1f} s)")
    if res.not_captured:
        worst = sorted(res.not_captured.items(), key=lambda kv: -kv[1])[:3]
        print(f"note: {len(res.not_captured)} tensor(s) outside the block projections differ and are not in the "
              f"adapter, e.g. " + ", ".join(f"{n} ({v:.2e} relative)" for n, v in worst))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mix-adapters", help="mix PEFT LoRA adapters from a YAML recipe (cat, svd, ties, ... + LiNeS)")
    p.add_argument("recipe", help="recipe YAML: base_model, adapters [{adapter, weight}], method, parameters, lines")
    p.add_argument("out_dir", help="output folder: a PEFT adapter, or a full model with --merge-into-base")
    p.add_argument("--merge-into-base", action="store_true", help="write a full model (base + mixed ΔW)")
    p.add_argument("--device", default="cpu", help="where the mix runs (default cpu)")
    p.add_argument("--allow-overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=_mix)

    p = sub.add_parser("extract-lora", help="extract a LoRA adapter from a fine-tune by truncated SVD of its deltas")
    p.add_argument("finetuned", help="the fine-tuned model (folder, file, Hub id)")
    p.add_argument("base", help="its base model (demo, folder, file, Hub id)")
    p.add_argument("out_dir", help="output adapter folder")
    p.add_argument("--rank", type=int, help="keep at most this rank per module")
    p.add_argument("--energy", type=float, help="keep the smallest rank holding this share (0-1] of Σσ² per module")
    p.add_argument("--device", default="cpu", help="where the SVDs run (default cpu)")
    p.add_argument("--allow-overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=_extract)
