"""Weightsmith's merge engine against mergekit 0.1.5, side by side: time, peak memory, equal outputs.

mergekit pins its own versions, so it lives in a separate venv
(``$WEIGHTSMITH_MERGEKIT_VENV``, default ``/work/mergekit-venv``), created on
first use with ``python3 -m venv`` + ``pip install torch==2.13.0 mergekit==0.1.5``.
Both tools run as subprocesses under ``/usr/bin/time -v`` (wall time and peak RSS).

Cases:

* ``speed`` (default): the 135M demo model as base plus 3 synthetic fine-tunes
  (seeded noise, float32, in a temp folder), merged with ``task_arithmetic``, ``ties``
  and mergekit 0.1.5's newer methods (``sce``, ``karcher``, ``multislerp``, ``nearswap``,
  ``arcee_fusion``, ``ram``, ``ramplus_tl``; one fine-tune for the two-model ones): each
  side ``--repeat`` times (alternating), median wall-time ratio, peak-RSS ratio, max |Δ|
  between the two outputs, with the load average (other work on the machine skews times);
* ``--equivalence``: all 20 mergekit 0.1.5 methods on tiny random llama, qwen2 and gpt2
  models (several cases each: weights, gradients, filters, slices; the random-drop
  methods ``dare_*``/``della*`` at density 1, where neither tool draws), LiNeS at its
  identity, max |Δ| each; then Weightsmith's own methods (LiNeS auto, ``tsv_m``, ``iso_c``,
  ``iso_cts``), which mergekit lacks; mergekit runs all recipes in one process;
* ``--big``: a synthetic 1.03B-parameter llama (random bf16 weights) plus 2 others,
  Weightsmith only, to show peak memory follows the largest tensor, not the model.

``ties`` is also timed with ``--fast-ties`` (ties in |τ| at the density cut broken
by index instead of by mergekit's sort order), with its max |Δ| to mergekit.

Usage::

    .venv/bin/python bench/merge_vs_mergekit.py [--methods ties,sce] [--repeat 2] [--equivalence] [--big] [--no-mergekit]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
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


# The speed case's methods and their targets (issue 14 item 7): speed-up at least this, peak RSS at most
# half of mergekit's for the methods mergekit 0.1.5 added.
SPEED_TARGETS = {"task_arithmetic": 5.0, "ties": 8.0, "sce": 3.0, "karcher": 3.0, "multislerp": 3.0,
                 "nearswap": 3.0, "arcee_fusion": 3.0, "ram": 3.0, "ramplus_tl": 3.0}
RSS_TARGET = 0.5


def speed_recipe(base: Path, fts: list[Path], method: str) -> str:
    """The speed case's recipe for ``method``: the base and the 3 fine-tunes (one for two-model methods)."""
    weights = [0.5, 0.3, 0.2]
    per_model: dict[str, str] = {"task_arithmetic": "weight: {w}", "ties": "weight: {w}, density: 0.5",
                                 "multislerp": "weight: {w}"}
    models = fts[:1] if method in ("nearswap", "arcee_fusion") else fts
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for ft, w in zip(models, weights):
        lines.append(f"  - model: {ft}")
        if method in per_model:
            lines.append("    parameters: {" + per_model[method].format(w=w) + "}")
    if method == "nearswap":
        lines.append("parameters: {t: 0.002}")  # about the fine-tunes' noise: some entries swap, most move
    lines += ["dtype: float32"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------

def _median(runs: list[Run]) -> Run:
    """Median wall time and median peak RSS of ``runs`` (the mean of the middle two for an even count)."""
    return Run(statistics.median(r.seconds for r in runs), int(statistics.median(r.peak_rss_bytes for r in runs)),
               all(r.ok for r in runs), runs[-1].log)


def speed_case(work: Path, use_mergekit: bool, mergekit_threads: int | None = None,
               methods: list[str] | None = None, repeat: int = 2) -> None:
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
    print(f"weightsmith: CLI defaults (--threads 1, exact ties); mergekit: {mk_threads}; "
          f"each side {repeat}x, alternating, median shown; {_load()}")
    print(f"{'method':<16}{'tool':<12}{'wall s':>8}{'peak RSS GB':>13}   runs (s)")
    for method in methods or list(SPEED_TARGETS):
        recipe = work / f"{method}.yml"
        recipe.write_text(speed_recipe(base, fts, method))
        ws_runs, mk_runs = [], []
        for _ in range(repeat):
            ws_runs.append(run_weightsmith(recipe, work / f"ws-{method}"))
            if not ws_runs[-1].ok:
                print(ws_runs[-1].log)
                raise SystemExit(f"weightsmith failed on {method}")
            if use_mergekit:
                mk_runs.append(run_mergekit(recipe, work / f"mk-{method}", mergekit_threads))
                if not mk_runs[-1].ok:
                    print(mk_runs[-1].log)
                    raise SystemExit(f"mergekit failed on {method}")
        ws = _median(ws_runs)
        print(f"{method:<16}{'weightsmith':<12}{ws.seconds:>8.2f}{ws.peak_rss_bytes / 1e9:>13.2f}   "
              + ", ".join(f"{r.seconds:.2f}" for r in ws_runs), flush=True)
        if not use_mergekit:
            shutil.rmtree(work / f"ws-{method}", ignore_errors=True)
            continue
        mk = _median(mk_runs)
        print(f"{method:<16}{'mergekit':<12}{mk.seconds:>8.2f}{mk.peak_rss_bytes / 1e9:>13.2f}   "
              + ", ".join(f"{r.seconds:.2f}" for r in mk_runs))
        diff, where, only = max_abs_diff(work / f"ws-{method}", work / f"mk-{method}")
        target = SPEED_TARGETS.get(method, 3.0)
        print(f"{method:<16}speed-up {mk.seconds / ws.seconds:.2f}x (target >= {target:g}x), "
              f"peak RSS {ws.peak_rss_bytes / mk.peak_rss_bytes:.0%} of mergekit's (target <= {RSS_TARGET:.0%}), "
              f"max |diff| {diff:.2e} at {where or '-'} (target <= {TOLERANCE:g})"
              + (f", tensors in one output only: {only}" if only else "") + f"; {_load()}", flush=True)
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


FAMILIES = ("llama", "qwen2", "gpt2")


def _build_tiny(family: str, seed: int):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_gpt2, build_tiny_llama  # the test suite's tiny-model builders

    if family == "llama":
        return build_tiny_llama(seed, layers=4)
    if family == "gpt2":
        return build_tiny_gpt2(seed, layers=4)
    from transformers import Qwen2Config, Qwen2ForCausalLM  # q/k/v biases: what llama lacks

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=4, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return Qwen2ForCausalLM(config).eval()


def _tiny_family(family: str, root: Path) -> dict[str, Path]:
    """A tiny ``family`` model, three seeded fine-tunes of it and an unrelated model (a real angle)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import perturbed, save_model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar, once per fixture
    base = _build_tiny(family, 0)
    out = {"base": save_model(base, root / "base")}
    for i in (1, 2, 3):
        out[f"ft{i}"] = save_model(perturbed(base, seed=i, scale=0.05), root / f"ft{i}")
    out["far"] = save_model(_build_tiny(family, 7), root / "far")
    return out


# Each case: (mergekit method it checks, recipe). Methods whose drop is random (dare_*, della*) are
# compared at density 1, where neither tool draws anything (their sign election, normalisation and
# rescaling still run); their random drop itself is seeded differently by the two tools.
def equivalence_cases(f: dict[str, Path]) -> dict[str, tuple[str, str]]:
    b, a1, a2, a3 = f["base"], f["ft1"], f["ft2"], f["ft3"]

    def models(weights, extra=""):
        return "".join(f"  - model: {m}\n    parameters: {{weight: {w}{extra}}}\n" for m, w in zip((a1, a2, a3), weights))

    three = f"models:\n  - model: {a1}\n  - model: {a2}\n  - model: {a3}\n"
    return {
        "linear": ("linear", f"merge_method: linear\nmodels:\n{models([0.2, 0.3, 0.5])}"),
        "linear_unnormalized": ("linear", f"merge_method: linear\nparameters: {{normalize: false}}\nmodels:\n{models([0.2, 0.3, 0.9])}"),
        "task_arithmetic": ("task_arithmetic", f"merge_method: task_arithmetic\nbase_model: {b}\nparameters: {{lambda: 0.8}}\nmodels:\n{models([0.5, 0.3, 0.7])}"),
        "task_arithmetic_gradient_filter": ("task_arithmetic", (
            f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n"
            f"  - model: {a1}\n    parameters:\n      weight:\n        - filter: mlp\n          value: [0, 0.5, 1]\n"
            f"        - value: 0.3\n"
            f"  - model: {a2}\n    parameters: {{weight: [1, 0]}}\n"
            f"parameters:\n  normalize: true\n"
        )),
        "ties": ("ties", f"merge_method: ties\nbase_model: {b}\nmodels:\n{models([0.5, 0.3, 0.7], ', density: 0.4')}"),
        "ties_unnormalized_rescale": ("ties", f"merge_method: ties\nbase_model: {b}\nparameters: {{normalize: false, rescale: true}}\n"
                                              f"models:\n{models([1.0, 0.6, 0.4], ', density: 0.7')}"),
        "dare_ties_density1": ("dare_ties", f"merge_method: dare_ties\nbase_model: {b}\nmodels:\n{models([0.5, 0.3, 0.7], ', density: 1.0')}"),
        "dare_linear_density1": ("dare_linear", f"merge_method: dare_linear\nbase_model: {b}\nmodels:\n{models([0.5, 0.3, 0.7], ', density: 1.0')}"),
        "della_density1": ("della", f"merge_method: della\nbase_model: {b}\nmodels:\n{models([0.5, 0.3, 0.7], ', density: 1.0, epsilon: 0.1')}"),
        "della_linear_density1": ("della_linear", f"merge_method: della_linear\nbase_model: {b}\nmodels:\n{models([0.5, 0.3, 0.7], ', density: 1.0, epsilon: 0.1')}"),
        "breadcrumbs": ("breadcrumbs", f"merge_method: breadcrumbs\nbase_model: {b}\nmodels:\n{models([0.5, 0.3, 0.7], ', density: 0.6, gamma: 0.05')}"),
        "breadcrumbs_ties": ("breadcrumbs_ties", f"merge_method: breadcrumbs_ties\nbase_model: {b}\nmodels:\n{models([0.5, 0.3, 0.7], ', density: 0.6, gamma: 0.05')}"),
        "slerp": ("slerp", f"merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {a1}\nparameters:\n  t: [0, 0.3, 0.9]\n"),
        "slerp_far": ("slerp", f"merge_method: slerp\nbase_model: {a3}\nmodels:\n  - model: {f['far']}\nparameters:\n  t: 0.35\n"),
        "nuslerp": ("nuslerp", f"merge_method: nuslerp\nmodels:\n  - model: {a1}\n    parameters: {{weight: 0.3}}\n  - model: {f['far']}\n    parameters: {{weight: 0.7}}\n"),
        "nuslerp_base_rowwise": ("nuslerp", (f"merge_method: nuslerp\nbase_model: {b}\nparameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\n"
                                             f"models:\n  - model: {a1}\n    parameters: {{weight: 0.6}}\n  - model: {a2}\n    parameters: {{weight: 0.4}}\n")),
        "model_stock": ("model_stock", f"merge_method: model_stock\nbase_model: {b}\n{three}"),
        "passthrough_slices": ("passthrough", (
            "merge_method: passthrough\nslices:\n"
            f"  - sources:\n      - model: {a1}\n        layer_range: [0, 3]\n"
            f"  - sources:\n      - model: {a2}\n        layer_range: [1, 4]\n"
        )),
        "passthrough_scale": ("passthrough", (f"merge_method: passthrough\nmodels:\n  - model: {a1}\n    parameters:\n      scale:\n"
                                              "        - filter: o_proj\n          value: 0\n        - filter: c_proj\n          value: 0\n"
                                              "        - value: 1\n")),
        "sce": ("sce", f"merge_method: sce\nbase_model: {b}\n{three}"),
        "sce_select_topk": ("sce", f"merge_method: sce\nbase_model: {b}\nparameters: {{select_topk: 0.4}}\n{three}"),
        "karcher": ("karcher", f"merge_method: karcher\nmodels:\n  - model: {a1}\n  - model: {a2}\n  - model: {f['far']}\n"),
        "karcher_base": ("karcher", (f"merge_method: karcher\nbase_model: {b}\nparameters: {{max_iter: 30, tol: 1.0e-7}}\n"
                                     f"models:\n  - model: {a1}\n  - model: {f['far']}\n")),
        "multislerp": ("multislerp", f"merge_method: multislerp\nmodels:\n{models([0.2, 0.3, 0.5])}"),
        "multislerp_base": ("multislerp", (f"merge_method: multislerp\nbase_model: {b}\nparameters: {{normalize_weights: false}}\n"
                                           f"models:\n{models([0.5, 0.3, 0.7])}")),
        "nearswap": ("nearswap", f"merge_method: nearswap\nbase_model: {b}\nparameters: {{t: [0.01, 0.05]}}\nmodels:\n  - model: {a1}\n"),
        "arcee_fusion": ("arcee_fusion", f"merge_method: arcee_fusion\nbase_model: {b}\nmodels:\n  - model: {a1}\n"),
        "ram": ("ram", f"merge_method: ram\nbase_model: {b}\n{three}"),
        "ram_epsilon": ("ram", f"merge_method: ram\nbase_model: {b}\nparameters: {{epsilon: 0.04}}\n{three}"),
        "ramplus_tl": ("ramplus_tl", f"merge_method: ramplus_tl\nbase_model: {b}\nparameters: {{epsilon: 0.04, r: 0.5, alpha: 0.6}}\n{three}"),
        "ramplus_tl_defaults": ("ramplus_tl", f"merge_method: ramplus_tl\nbase_model: {b}\nmodels:\n  - model: {a1}\n  - model: {a2}\n"),
        # LiNeS at alpha 1, beta 0 scales nothing; mergekit ignores `lines:`, so both run this recipe.
        "lines_identity": ("LiNeS", f"merge_method: task_arithmetic\nbase_model: {b}\nlines: {{alpha: 1.0, beta: 0.0}}\nmodels:\n{models([0.5, 0.3, 0.7])}"),
    }


# Weightsmith's methods that mergekit 0.1.5 lacks: run (outputs checked finite), nothing to compare with.
def own_cases(f: dict[str, Path]) -> dict[str, tuple[str, str]]:
    b, a1, a2, a3 = f["base"], f["ft1"], f["ft2"], f["ft3"]
    three = f"models:\n  - model: {a1}\n  - model: {a2}\n  - model: {a3}\n"
    return {
        "lines_auto": ("LiNeS", f"merge_method: ties\nbase_model: {b}\nlines: {{alpha: auto, beta: 0.5}}\n"
                                f"models:\n" + "".join(f"  - model: {m}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                                                       for m in (a1, a2, a3))),
        "tsv_m": ("tsv_m", f"merge_method: tsv_m\nbase_model: {b}\n{three}"),
        "iso_c": ("iso_c", f"merge_method: iso_c\nbase_model: {b}\n{three}"),
        "iso_cts": ("iso_cts", f"merge_method: iso_cts\nbase_model: {b}\n{three}"),
    }


# Runs mergekit 0.1.5's own entry point (what mergekit-yaml calls) on many recipes in one process, so
# its start-up (torch, transformers, pydantic) is paid once. Reads [[recipe, out], ...] as JSON on stdin;
# prints one JSON line per recipe.
_MERGEKIT_DRIVER = """
import json, sys, traceback, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
options = MergeOptions(quiet=True)
options.apply_global_options()
for recipe, out in json.load(sys.stdin):
    try:
        text = open(recipe, encoding="utf-8").read()
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), out, options=options, config_source=text)
        print(json.dumps({"recipe": recipe, "ok": True}), flush=True)
    except Exception:
        print(json.dumps({"recipe": recipe, "ok": False, "log": traceback.format_exc()[-1500:]}), flush=True)
"""


def _mergekit_batch(jobs: list[tuple[Path, Path]]) -> dict[str, str | None]:
    """mergekit on every (recipe, out) in one process: recipe -> None when it ran, else its error."""
    ensure_mergekit()
    for _, out in jobs:
        shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([str(MERGEKIT_VENV / "bin" / "python"), "-c", _MERGEKIT_DRIVER],
                          input=json.dumps([[str(r), str(o)] for r, o in jobs]), capture_output=True, text=True)
    done: dict[str, str | None] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            done[row["recipe"]] = None if row["ok"] else row["log"]
    for recipe, _ in jobs:
        done.setdefault(str(recipe), f"mergekit stopped: {proc.stderr[-1500:]}")
    return done


def _weightsmith_inproc(recipe: Path, out: Path) -> str | None:
    """Weightsmith's merge in this process (what ``weightsmith merge`` runs, with its defaults); None or the error."""
    from checkpoints.errors import WeightsmithError
    from merging.engine import run_merge
    from merging.recipe import MergeRecipe

    shutil.rmtree(out, ignore_errors=True)
    try:
        run_merge(MergeRecipe.from_yaml(recipe), out, collect_norms=False, threads=1)
    except WeightsmithError as e:
        return str(e)
    return None


def equivalence(work: Path) -> None:
    """Every mergekit 0.1.5 method (and LiNeS) on tiny llama, qwen2 and gpt2 models, max |Δ| each;
    then Weightsmith's own methods."""
    from merging.methods import REGISTRY

    fams = {fam: _tiny_family(fam, work / "tiny" / fam) for fam in FAMILIES}
    cases = {fam: equivalence_cases(fams[fam]) for fam in FAMILIES}
    jobs = []
    for fam in FAMILIES:
        for name, (_, text) in cases[fam].items():
            recipe = work / f"eq-{fam}-{name}.yml"
            recipe.write_text(text)
            jobs.append((recipe, work / f"mk-{fam}-{name}"))
    print(f"\n== equivalence with mergekit 0.1.5 on tiny {', '.join(FAMILIES)} models (4 layers; {_load()}) ==",
          flush=True)
    mk = _mergekit_batch(jobs)
    print(f"{'case':<34}{'method':<18}" + "".join(f"{fam:>12}" for fam in FAMILIES) + "   verdict")
    worst_by_method: dict[str, float] = {}
    failed: list[str] = []
    mergekit_errors: list[str] = []
    for name, (method, _) in cases[FAMILIES[0]].items():
        cells, worst, bad, mk_only = [], 0.0, [], []
        for fam in FAMILIES:
            recipe = work / f"eq-{fam}-{name}.yml"
            ws_out, mk_out = work / f"ws-{fam}-{name}", work / f"mk-{fam}-{name}"
            ws_err, mk_err = _weightsmith_inproc(recipe, ws_out), mk[str(recipe)]
            if ws_err or mk_err:  # a case mergekit itself cannot run is said so, not counted as a mismatch
                cells.append("ws failed" if ws_err else "mk failed")
                (bad if ws_err else mk_only).append(
                    f"{fam}: " + (f"weightsmith: {ws_err}" if ws_err else f"mergekit: {mk_err.strip().splitlines()[-1]}"))
                continue
            diff, where, only = max_abs_diff(ws_out, mk_out)
            cells.append(f"{diff:.2e}" + ("*" if only else ""))
            worst = max(worst, diff)
            if diff > TOLERANCE or only:
                bad.append(f"{fam}: max |diff| at {where}" + (f"; in one output only: {only}" if only else ""))
            shutil.rmtree(ws_out, ignore_errors=True)
            shutil.rmtree(mk_out, ignore_errors=True)
        worst_by_method[method] = max(worst_by_method.get(method, 0.0), worst)
        failed += [f"{name} {b}" for b in bad]
        mergekit_errors += [f"{name} {b}" for b in mk_only]
        verdict = "MISMATCH" if bad else "ok" + (" where mergekit runs" if mk_only else "")
        print(f"{name:<34}{method:<18}" + "".join(f"{c:>12}" for c in cells) + f"   {verdict}", flush=True)
    for line in failed + mergekit_errors:
        print("  " + line)
    print("\n-- Weightsmith's own (no mergekit counterpart): ran on each family, outputs finite --")
    for name, (method, _) in own_cases(fams[FAMILIES[0]]).items():
        cells = []
        for fam in FAMILIES:
            recipe = work / f"own-{fam}-{name}.yml"
            recipe.write_text(own_cases(fams[fam])[name][1])
            err = _weightsmith_inproc(recipe, work / f"ws-own-{fam}-{name}")
            cells.append("ran" if err is None else "failed")
            if err:
                print(f"  {name} on {fam}: {err}")
            shutil.rmtree(work / f"ws-own-{fam}-{name}", ignore_errors=True)
        print(f"{name:<34}{method:<18}" + "".join(f"{c:>12}" for c in cells))
    mergekit_methods = sorted(m for m in REGISTRY if m not in {"tsv_m", "iso_c", "iso_cts"})
    print(f"\n-- by method: worst max |diff| over its cases and the {len(FAMILIES)} families (tolerance {TOLERANCE:g}) --")
    for m in [*mergekit_methods, "LiNeS"]:
        w = worst_by_method.get(m)
        note = " (density 1: random drop off)" if m.startswith(("dare", "della")) else ""
        print(f"{m:<20}" + ("not compared" if w is None else f"{w:.2e}{note}"))
    for m in ("tsv_m", "iso_c", "iso_cts"):
        print(f"{m:<20}no mergekit counterpart")
    worst_all = max(worst_by_method.values(), default=0.0)
    print(f"{len(mergekit_methods)} mergekit methods; worst max |diff| over all cases: {worst_all:.2e} "
          f"(tolerance {TOLERANCE:g}); {len(failed)} case(s) failed or mismatched; "
          f"{len(mergekit_errors)} case(s) mergekit 0.1.5 itself could not run")


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
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated speed-case methods (default all: {','.join(SPEED_TARGETS)})")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side per method; the median is reported")
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
            speed_case(work, not args.no_mergekit, args.mergekit_threads,
                       args.methods.split(",") if args.methods else None, args.repeat)
        if args.equivalence or args.only_equivalence:
            equivalence(work)
        if args.big or args.only_big:
            big_case(work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
