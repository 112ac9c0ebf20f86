"""The README's task-vector analysis plot: the demo model and three synthetic fine-tunes of it.

The fine-tunes are the demo's weights plus seeded Gaussian task vectors, each tensor's scaled to
1 % of that tensor's standard deviation, built so the plot has something to show:

* ``ft-a``: τ_a = g_a;
* ``ft-b``: τ_b = 0.6·g_a + 0.8·g_b, so cos(τ_a, τ_b) ≈ 0.6 and they clash less than independent ones;
* ``ft-c``: τ_c = g_c scaled by 0.25 + 1.5·ℓ/(L−1) in block ℓ (by the architecture map), so its norm grows with depth.

Usage::

    .venv/bin/python scripts/analysis_example.py WORK_DIR [--density 0.2] [--out assets/plots/task_vector_analysis.png]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints.jobs import tqdm_job  # noqa: E402
from checkpoints.sources import resolve  # noqa: E402
from merging.analysis import analyze_recipe  # noqa: E402
from merging.analysis_plots import analysis_figure  # noqa: E402
from merging.recipe import MergeRecipe  # noqa: E402


def fine_tunes(work: Path) -> dict[str, Path]:
    """Write ft-a, ft-b and ft-c beside the demo's config and tokenizer (once)."""
    demo = resolve("demo")
    reader, spec, layers = demo.reader(), demo.spec, demo.num_layers
    out = {name: work / name for name in ("ft-a", "ft-b", "ft-c")}
    if all((p / "model.safetensors").is_file() for p in out.values()):
        return out
    tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in out}
    g = torch.Generator().manual_seed(0)
    for name in reader.keys():
        w = reader.get(name)
        scale = 0.01 * float(w.std()) if w.numel() > 1 else 1e-4
        ga, gb, gc = (torch.randn(w.shape, generator=g) for _ in range(3))
        block = spec.block_of(name)
        depth = 0.25 + 1.5 * block / (layers - 1) if block is not None else 0.25
        tensors["ft-a"][name] = w + scale * ga
        tensors["ft-b"][name] = w + scale * (0.6 * ga + 0.8 * gb)
        tensors["ft-c"][name] = w + scale * depth * gc
    for model, folder in out.items():
        shutil.copytree(demo.support_dir, folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
        save_file(tensors[model], str(folder / "model.safetensors"), metadata={"format": "pt"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="folder for the three fine-tunes (about 1.6 GB)")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=Path("assets/plots/task_vector_analysis.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = fine_tunes(args.work)
    recipe = MergeRecipe.from_dict({
        "merge_method": "ties", "base_model": "demo",
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": args.density}} for p in models.values()],
    })
    with tqdm_job("analysing") as job:
        result = analyze_recipe(recipe, job=job)
    print(result.table())
    analysis_figure(result).savefig(args.out, dpi=90)
    print(f"wrote {args.out} ({result.seconds:.0f} s)")


if __name__ == "__main__":
    main()
