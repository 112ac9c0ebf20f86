"""Weightsmith's merge engine against mergekit 0.1.5, side by side: time, peak memory, equal outputs.

mergekit pins its own versions, so it lives in a separate venv
(``$WEIGHTSMITH_MERGEKIT_VENV``, default ``/work/mergekit-venv``), created on
first use with ``python3 -m venv`` + ``pip install torch==2.13.0 mergekit==0.1.5``.
Both tools run as subprocesses under ``/usr/bin/time -v`` (wall time and peak RSS).

Cases:

* ``speed`` (default): the 135M demo model as base plus 3 synthetic fine-tunes
  (seeded noise, float32, in a temp folder), merged with ``task_arithmetic`` and
  ``ties``: wall-time ratio, peak-RSS ratio, max |Δ| between the two outputs;
* ``--equivalence``: every deterministic method on tiny random llamas
  (linear, task_arithmetic, ties, breadcrumbs, breadcrumbs_ties, slerp, nuslerp,
  model_stock, passthrough with slices, gradients and filters; sce, karcher, multislerp,
  nearswap, arcee_fusion, ram, ramplus_tl), max |Δ| each;
* ``--big``: a synthetic 1.03B-parameter llama (random bf16 weights) plus 2 others,
  Weightsmith only, to show peak memory follows the largest tensor, not the model.

``ties`` is also timed with ``--fast-ties`` (ties in |τ| at the density cut broken
by index instead of by mergekit's sort order), with its max |Δ| to mergekit.

Usage::

    .venv/bin/python bench/merge_vs_mergekit.py [--equivalence] [--big] [--no-mergekit]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
WEIGHTSMITH = [PY, "-m", "cli"]
MERGEKIT_VENV = Path(os.environ.get("WEIGHTSMITH_MERGEKIT_VENV", "/work/mergekit-venv"))
TOLERANCE = 1e-5


@dataclass
class Run:
    seconds: float
    peak_rss_bytes: int
    ok: bool
    log: str


def ensure_mergekit() -> Path:
    """The ``mergekit-yaml`` executable, installing mergekit 0.1.5 into its own venv if missing."""
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"creating {MERGEKIT_VENV} with mergekit 0.1.5 (one time)...", flush=True)
    subprocess.run(["python3", "-m", "venv", str(MERGEKIT_VENV)], check=True)
    subprocess.run([str(MERGEKIT_VENV / "bin" / "pip"), "install", "-q", "torch==2.13.0", "mergekit==0.1.5"],
                   check=True)
    return exe


def timed(cmd: list[str], *, cwd: Path = ROOT, env: dict | None = None) -> Run:
    """Run ``cmd`` under /usr/bin/time -v; wall seconds and max RSS of the process."""
    full = ["/usr/bin/time", "-v", *cmd]
    proc = subprocess.run(full, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    err = proc.stderr
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):(\d+(?:\.\d+)?)", err)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    seconds = 0.0
    if wall:
        h = int(wall.group(1) or 0)
        seconds = h * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    return Run(seconds, int(rss.group(1)) * 1024 if rss else 0, proc.returncode == 0, err[-3000:])


def run_weightsmith(recipe: Path, out: Path, *extra: str) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    return timed([*WEIGHTSMITH, "merge", str(recipe), str(out), *extra], env={"PYTHONPATH": str(ROOT)})


def run_mergekit(recipe: Path, out: Path, threads: int | None = None) -> Run:
    """mergekit-yaml on ``recipe``; ``threads`` pins its torch threads (OMP_NUM_THREADS), None keeps its default."""
    shutil.rmtree(out, ignore_errors=True)
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    return timed([str(ensure_mergekit()), str(recipe), str(out), "--quiet"], env=env)


def tensors_of(folder: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = f
    return out


def max_abs_diff(a: Path, b: Path) -> tuple[float, str, list[str]]:
    """Largest |a − b| over the tensors both folders hold, the tensor where it is, and names only one has."""
    ta, tb = tensors_of(a), tensors_of(b)
    worst, where = 0.0, ""
    for name in sorted(set(ta) & set(tb)):
        with safe_open(str(ta[name]), framework="pt") as fa, safe_open(str(tb[name]), framework="pt") as fb:
            x, y = fa.get_tensor(name).float(), fb.get_tensor(name).float()
        if x.shape != y.shape:
            return float("inf"), f"{name} shape {list(x.shape)} vs {list(y.shape)}", []
        d = float((x - y).abs().max()) if x.numel() else 0.0
        if d > worst:
            worst, where = d, name
    return worst, where, sorted(set(ta) ^ set(tb))


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

def _load() -> str:
    """The 1/5/15-minute load averages (other work on the machine skews wall times)."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def make_finetunes(base: Path, root: Path, n: int, scale: float = 0.003) -> list[Path]:
    """``n`` synthetic fine-tunes of ``base``: every tensor plus seeded Gaussian noise (float32)."""
    from checkpoints.tensors import CheckpointReader, SUPPORT_FILES

    reader = CheckpointReader.from_folder(base)
    outs = []
    for i in range(1, n + 1):
        folder = root / f"ft{i}"
        outs.append(folder)
        if (folder / "model.safetensors").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(1000 + i)
        state = {}
        for name in reader.keys():
            t = reader.get(name)
            state[name] = t + torch.randn(t.shape, generator=g) * scale
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        del state
        for s in SUPPORT_FILES:
            if (base / s).exists():
                shutil.copy2(base / s, folder / s)
    return outs


def ta_recipe(base: Path, fts: list[Path], method: str) -> str:
    weights = [0.5, 0.3, 0.2]
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for ft, w in zip(fts, weights):
        params = f"weight: {w}" + (", density: 0.5" if method == "ties" else "")
        lines += [f"  - model: {ft}", f"    parameters: {{{params}}}"]
    lines += ["dtype: float32"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------

def speed_case(work: Path, use_mergekit: bool, mergekit_threads: int | None = None) -> None:
    from checkpoints.demo import demo_model_path

    base = demo_model_path()
    fts = make_finetunes(base, work / "models", 3)
    # Warm the page cache for both tools alike.
    for f in [base / "model.safetensors", *(ft / "model.safetensors" for ft in fts)]:
        with open(f, "rb") as h:
            while h.read(64 << 20):
                pass
    print("\n== demo model (135M, float32): base + 3 fine-tunes ==")
    mk_threads = (f"OMP_NUM_THREADS={mergekit_threads}" if mergekit_threads
                  else f"its defaults (torch uses {torch.get_num_threads()} threads here)")
    print(f"weightsmith: CLI defaults (--threads 1, exact ties); mergekit: {mk_threads}; {_load()}")
    print(f"{'method':<16}{'tool':<12}{'wall s':>8}{'peak RSS GB':>13}")
    for method in ("task_arithmetic", "ties"):
        recipe = work / f"{method}.yml"
        recipe.write_text(ta_recipe(base, fts, method))
        ws = run_weightsmith(recipe, work / f"ws-{method}")
        if not ws.ok:
            print(ws.log)
            raise SystemExit(f"weightsmith failed on {method}")
        print(f"{method:<16}{'weightsmith':<12}{ws.seconds:>8.2f}{ws.peak_rss_bytes / 1e9:>13.2f}", flush=True)
        if not use_mergekit:
            continue
        mk = run_mergekit(recipe, work / f"mk-{method}", mergekit_threads)
        if not mk.ok:
            print(mk.log)
            raise SystemExit(f"mergekit failed on {method}")
        print(f"{method:<16}{'mergekit':<12}{mk.seconds:>8.2f}{mk.peak_rss_bytes / 1e9:>13.2f}")
        diff, where, only = max_abs_diff(work / f"ws-{method}", work / f"mk-{method}")
        print(f"{method:<16}speed-up {mk.seconds / ws.seconds:.2f}x (target >= 3x), "
              f"peak RSS {ws.peak_rss_bytes / mk.peak_rss_bytes:.0%} of mergekit's (target <= 50%), "
              f"max |diff| {diff:.2e} at {where or '-'} (target <= {TOLERANCE:g})"
              + (f", tensors in one output only: {only}" if only else ""), flush=True)
        if method == "ties":
            fast = run_weightsmith(recipe, work / "ws-ties-fast", "--fast-ties")
            fdiff, fwhere, _ = max_abs_diff(work / "ws-ties-fast", work / f"mk-{method}")
            print(f"{'ties':<16}{'ws --fast-ties':<12}{fast.seconds:>8.2f}{fast.peak_rss_bytes / 1e9:>13.2f}   "
                  f"speed-up {mk.seconds / fast.seconds:.2f}x, max |diff| {fdiff:.2e} at {fwhere or '-'} "
                  "(ties in |delta| at the density cut broken by index, not by mergekit's sort)", flush=True)
            shutil.rmtree(work / "ws-ties-fast", ignore_errors=True)
        shutil.rmtree(work / f"mk-{method}", ignore_errors=True)
        shutil.rmtree(work / f"ws-{method}", ignore_errors=True)
    print(_load())


def _tiny_family(root: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_llama, perturbed, save_model  # the test suite's tiny-model builders

    base = build_tiny_llama(0, layers=4)
    out = {"base": save_model(base, root / "base")}
    for i in (1, 2, 3):
        out[f"ft{i}"] = save_model(perturbed(base, seed=i, scale=0.05), root / f"ft{i}")
    return out


def equivalence_cases(f: dict[str, Path]) -> dict[str, str]:
    b, a1, a2, a3 = f["base"], f["ft1"], f["ft2"], f["ft3"]

    def models(weights, extra=""):
        return "".join(f"  - model: {m}\n    parameters: {{weight: {w}{extra}}}\n" for m, w in zip((a1, a2, a3), weights))

    return {
        "linear": f"merge_method: linear\nmodels:\n{models([0.2, 0.3, 0.5])}",
        "linear_unnormalized": f"merge_method: linear\nparameters: {{normalize: false}}\nmodels:\n{models([0.2, 0.3, 0.9])}",
        "task_arithmetic": f"merge_method: task_arithmetic\nbase_model: {b}\nparameters: {{lambda: 0.8}}\nmodels:\n{models([0.5, 0.3, 0.7])}",
        "task_arithmetic_gradient_filter": (
            f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n"
            f"  - model: {a1}\n    parameters:\n      weight:\n        - filter: mlp\n          value: [0, 0.5, 1]\n"
            f"        - value: 0.3\n"
            f"  - model: {a2}\n    parameters: {{weight: [1, 0]}}\n"
            f"parameters:\n  normalize: true\n"
        ),
        "ties": f"merge_method: ties\nbase_model: {b}\nmodels:\n{models([0.5, 0.3, 0.7], ', density: 0.4')}",
        "ties_unnormalized_rescale": (f"merge_method: ties\nbase_model: {b}\nparameters: {{normalize: false, rescale: true}}\n"
                                      f"models:\n{models([1.0, 0.6, 0.4], ', density: 0.7')}"),
        "breadcrumbs": f"merge_method: breadcrumbs\nbase_model: {b}\nmodels:\n{models([0.5, 0.3, 0.7], ', density: 0.6, gamma: 0.05')}",
        "breadcrumbs_ties": f"merge_method: breadcrumbs_ties\nbase_model: {b}\nmodels:\n{models([0.5, 0.3, 0.7], ', density: 0.6, gamma: 0.05')}",
        "slerp": f"merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {a1}\nparameters:\n  t: [0, 0.3, 0.9]\n",
        "slerp_far": f"merge_method: slerp\nbase_model: {a3}\nmodels:\n  - model: {f['far']}\nparameters:\n  t: 0.35\n",
        "nuslerp": f"merge_method: nuslerp\nmodels:\n  - model: {a1}\n    parameters: {{weight: 0.3}}\n  - model: {f['far']}\n    parameters: {{weight: 0.7}}\n",
        "nuslerp_base_rowwise": (f"merge_method: nuslerp\nbase_model: {b}\nparameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\n"
                                 f"models:\n  - model: {a1}\n    parameters: {{weight: 0.6}}\n  - model: {a2}\n    parameters: {{weight: 0.4}}\n"),
        "model_stock": f"merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {a1}\n  - model: {a2}\n  - model: {a3}\n",
        "passthrough_slices": (
            "merge_method: passthrough\nslices:\n"
            f"  - sources:\n      - model: {a1}\n        layer_range: [0, 3]\n"
            f"  - sources:\n      - model: {a2}\n        layer_range: [1, 4]\n"
        ),
        "passthrough_scale": (f"merge_method: passthrough\nmodels:\n  - model: {a1}\n    parameters:\n      scale:\n"
                              "        - filter: o_proj\n          value: 0\n        - value: 1\n"),
        # mergekit 0.1.5's further methods (issue 14)
        "sce": f"merge_method: sce\nbase_model: {b}\nmodels:\n  - model: {a1}\n  - model: {a2}\n  - model: {a3}\n",
        "sce_select_topk": (f"merge_method: sce\nbase_model: {b}\nparameters: {{select_topk: 0.4}}\n"
                            f"models:\n  - model: {a1}\n  - model: {a2}\n  - model: {a3}\n"),
        "karcher": f"merge_method: karcher\nmodels:\n  - model: {a1}\n  - model: {a2}\n  - model: {f['far']}\n",
        "karcher_base": (f"merge_method: karcher\nbase_model: {b}\nparameters: {{max_iter: 30, tol: 1.0e-7}}\n"
                         f"models:\n  - model: {a1}\n  - model: {f['far']}\n"),
        "multislerp": f"merge_method: multislerp\nmodels:\n{models([0.2, 0.3, 0.5])}",
        "multislerp_base": (f"merge_method: multislerp\nbase_model: {b}\nparameters: {{normalize_weights: false}}\n"
                            f"models:\n{models([0.5, 0.3, 0.7])}"),
        "nearswap": f"merge_method: nearswap\nbase_model: {b}\nparameters: {{t: [0.01, 0.05]}}\nmodels:\n  - model: {a1}\n",
        "arcee_fusion": f"merge_method: arcee_fusion\nbase_model: {b}\nmodels:\n  - model: {a1}\n",
        "ram": f"merge_method: ram\nbase_model: {b}\nmodels:\n  - model: {a1}\n  - model: {a2}\n  - model: {a3}\n",
        "ram_epsilon": (f"merge_method: ram\nbase_model: {b}\nparameters: {{epsilon: 0.04}}\n"
                        f"models:\n  - model: {a1}\n  - model: {a2}\n  - model: {a3}\n"),
        "ramplus_tl": (f"merge_method: ramplus_tl\nbase_model: {b}\nparameters: {{epsilon: 0.04, r: 0.5, alpha: 0.6}}\n"
                       f"models:\n  - model: {a1}\n  - model: {a2}\n  - model: {a3}\n"),
        "ramplus_tl_defaults": f"merge_method: ramplus_tl\nbase_model: {b}\nmodels:\n  - model: {a1}\n  - model: {a2}\n",
    }


def equivalence(work: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_llama, save_model

    fam = _tiny_family(work / "tiny")
    fam["far"] = save_model(build_tiny_llama(7, layers=4), work / "tiny" / "far")  # unrelated weights: a real angle
    print("\n== equivalence with mergekit 0.1.5 on tiny llamas (4 layers) ==")
    worst_all = 0.0
    for name, text in equivalence_cases(fam).items():
        recipe = work / f"eq-{name}.yml"
        recipe.write_text(text)
        ws = run_weightsmith(recipe, work / f"ws-{name}")
        mk = run_mergekit(recipe, work / f"mk-{name}")
        if not ws.ok or not mk.ok:
            print(f"{name:<34} FAILED: weightsmith ok={ws.ok} mergekit ok={mk.ok}")
            print((ws.log if not ws.ok else mk.log)[-1500:])
            continue
        diff, where, only = max_abs_diff(work / f"ws-{name}", work / f"mk-{name}")
        worst_all = max(worst_all, diff)
        verdict = "ok" if diff <= TOLERANCE and not only else "MISMATCH"
        print(f"{name:<34} max |diff| {diff:.2e} {verdict}" + (f" at {where}" if diff > TOLERANCE else "")
              + (f" (in one output only: {only})" if only else ""), flush=True)
    print(f"worst max |diff| over all cases: {worst_all:.2e} (tolerance {TOLERANCE:g})")


def big_case(work: Path) -> None:
    """~1B-parameter llama, bf16 random weights: Weightsmith's peak RSS against the model size."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    root = work / "big"
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (32000, 2048), "model.norm.weight": (2048,),
                                          "lm_head.weight": (32000, 2048)}
    h, i, kv = 2048, 5632, 2048 * 8 // 32
    for layer in range(20):
        p = f"model.layers.{layer}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    folders = []
    for k in range(3):
        folder = root / f"m{k}"
        folders.append(folder)
        if (folder / "model.safetensors.index.json").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        # Two shards, written one at a time so making the fixture stays within memory too.
        names = list(shapes)
        half = len(names) // 2
        weight_map = {}
        for s, part in enumerate((names[:half], names[half:])):
            g = torch.Generator().manual_seed(k * 10 + s)
            state = {n: (torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16) for n in part}
            fname = f"model-{s + 1:05d}-of-00002.safetensors"
            save_file(state, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
            del state
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # task_arithmetic: the point is memory. (TIES on random bf16 weights is dominated by the
    # exact-tie sort that reproduces mergekit, since bf16 magnitudes tie everywhere.)
    recipe = root / "ta.yml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {folders[0]}\nmodels:\n"
                      + "".join(f"  - model: {f}\n    parameters: {{weight: 0.5}}\n" for f in folders[1:])
                      + "dtype: bfloat16\n")
    ws = run_weightsmith(recipe, root / "out")
    largest = max(torch.Size(s).numel() for s in shapes.values()) * 4
    model_bytes = n_params * 2
    print(f"\n== synthetic llama, {n_params / 1e9:.2f}B parameters, bf16 ({model_bytes / 1e9:.2f} GB per model), task_arithmetic of base + 2 ==")
    if not ws.ok:
        print(ws.log)
        return
    print(f"weightsmith: {ws.seconds:.1f} s, peak RSS {ws.peak_rss_bytes / 1e9:.2f} GB = "
          f"{ws.peak_rss_bytes / (3 * model_bytes):.0%} of the 3 inputs' size; the largest tensor is "
          f"{largest / 1e6:.0f} MB in float32")
    shutil.rmtree(root / "out", ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-mergekit", action="store_true", help="time Weightsmith only")
    ap.add_argument("--mergekit-threads", type=int, default=None,
                    help="pin mergekit's torch threads (default: its own default, all cores); on a busy "
                         "machine a multi-threaded run is slowed far more than a one-thread one")
    ap.add_argument("--equivalence", action="store_true", help="also compare every deterministic method on tiny models")
    ap.add_argument("--only-equivalence", action="store_true", help="only the tiny-model comparison")
    ap.add_argument("--big", action="store_true", help="also the synthetic 1B bf16 memory case (slow)")
    ap.add_argument("--only-big", action="store_true", help="only the synthetic 1B memory case")
    ap.add_argument("--workdir", type=Path, default=None, help="keep fixtures here (default: a temp folder)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ws-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not (args.only_equivalence or args.only_big):
            speed_case(work, not args.no_mergekit, args.mergekit_threads)
        if args.equivalence or args.only_equivalence:
            equivalence(work)
        if args.big or args.only_big:
            big_case(work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
