"""Adapter mixing and extraction on the demo model: time and peak memory, Weightsmith vs plain PEFT.

Each case runs in a fresh subprocess so its peak RSS is its own. Prints a table
and the ratios; needs the demo adapters (``scripts/train_demo_adapters.py``).

    .venv/bin/python bench/bench_adapters.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peft_mix(out: Path, merge: bool) -> dict:
    """The plain-PEFT way: load the base, attach both adapters, add_weighted_adapter, save."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from checkpoints.demo import demo_model_path
    from merging.adapters import demo_adapters

    ads = demo_adapters()
    model = AutoModelForCausalLM.from_pretrained(str(demo_model_path()), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(ads["caps"]), adapter_name="caps")
    model.load_adapter(str(ads["pirate"]), adapter_name="pirate")
    model.add_weighted_adapter(["caps", "pirate"], [1.0, 1.0], "mix", combination_type="cat")
    model.set_adapter("mix")
    if merge:
        model.delete_adapter("caps")
        model.delete_adapter("pirate")
        model.merge_and_unload().save_pretrained(str(out))
    else:
        model.save_pretrained(str(out), selected_adapters=["mix"])
    return {}


def _ws_mix(out: Path, merge: bool) -> dict:
    from merging.adapters import AdapterMixRecipe, mix_adapters

    recipe = AdapterMixRecipe.from_yaml(ROOT / "assets" / "recipes" / "mix-caps-pirate.yml")
    recipe.lines = None  # same work as the PEFT baseline
    res = mix_adapters(recipe, out, merge_into_base=merge)
    return {"rank": res.rank}


def _extract(out: Path, source: Path) -> dict:
    from merging.lora_extract import extract_lora

    res = extract_lora(source, "demo", out, rank=16)
    return {"modules": len(res.layers), "max_rel_error": res.max_relative_error,
            "not_captured": len(res.not_captured)}


def _child(case: str, out: str, extra: str) -> None:
    t0 = time.perf_counter()
    info = {
        "peft-mix": lambda: _peft_mix(Path(out), False),
        "weightsmith-mix": lambda: _ws_mix(Path(out), False),
        "peft-merge": lambda: _peft_mix(Path(out), True),
        "weightsmith-merge": lambda: _ws_mix(Path(out), True),
        "extract-rank16": lambda: _extract(Path(out), Path(extra)),
    }[case]()
    info["seconds"] = time.perf_counter() - t0
    info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(info))


def run(case: str, out: Path, extra: str = "") -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", case, str(out), extra], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{case} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        for case in ("peft-mix", "weightsmith-mix", "peft-merge", "weightsmith-merge"):
            results[case] = run(case, tmp / case)
        results["extract-rank16"] = run("extract-rank16", tmp / "extract", str(tmp / "weightsmith-merge"))
    print(f"{'case':<20} {'seconds':>8} {'peak RSS MB':>12}  notes")
    for case, r in results.items():
        notes = {k: v for k, v in r.items() if k not in ("seconds", "peak_rss_mb")}
        print(f"{case:<20} {r['seconds']:>8.1f} {r['peak_rss_mb']:>12.0f}  {notes or ''}")
    for what in ("mix", "merge"):
        ws, peft = results[f"weightsmith-{what}"], results[f"peft-{what}"]
        print(f"{what}: weightsmith/peft time {ws['seconds'] / peft['seconds']:.2f}x, "
              f"peak RSS {ws['peak_rss_mb'] / peft['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "")
    else:
        main()
