"""Why a q8_0 export of the demo model does not always generate the source's text: measured, not assumed.

1. **What the source is.** The demo's float32 weights are the shipped SmolLM2 GGUF dequantised by
   transformers at conversion. Every tensor of the shipped file is decoded here with our own block
   decoder (:func:`checkpoints.gguf_check.decode`), brought to the source's layout, and compared with
   the float32 source (0 = the source holds exactly the shipped values).
2. **transformers' own dequantiser** (``integrations.gguf.dequant``, its newer loading path; for llama
   ``from_pretrained(..., gguf_file=...)`` still takes the legacy path through ``gguf.quants``) on the
   same bytes, against ours.
3. **What re-quantising keeps.** The q8_0 export decoded, per shipped type: the share of values that
   come back bit-exact, the largest error, and the largest error as a share of the Q8_0 bound.
4. **Agreement** of the export, loaded by transformers, with the source on ``bench/gguf_export.py``'s
   20 prompts: identical 12-token greedy continuations; top-1 agreement with the source's next token
   at every step of the source's continuations (teacher-forced); max and mean |Δlogit| there; and for
   each prompt whose text differs, the source's top-1 − top-2 logit gap at the first differing step
   against how far the export moved that gap.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gguf_q8_0.py --out /tmp/gguf-bench --types q8_0 f16
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gguf_export import PROMPTS, continuations, load_gguf  # noqa: E402


def _tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def source_vs_shipped(ckpt, shipped: Path) -> dict:
    """Per shipped GGML type: tensors, max |our decode − source|, max |transformers' decode − ours|."""
    import torch
    from transformers.integrations.gguf.dequant import GGML_BLOCK, dequantize

    from checkpoints.gguf_check import decode, expected_tensors, oriented

    found = _tensors(shipped)
    out: dict = defaultdict(lambda: {"tensors": 0, "max_abs_vs_source": 0.0, "max_abs_transformers_vs_ours": 0.0})
    for name, (src, change) in expected_tensors(ckpt).items():
        t = found[name]
        kind = t.tensor_type.name
        shape = tuple(int(s) for s in reversed(t.shape))
        ours = decode(t.data, kind, shape)
        row = out[kind]
        row["tensors"] += 1
        row["max_abs_vs_source"] = max(row["max_abs_vs_source"], float(np.abs(ours - oriented(ckpt, src, change)).max()))
        if int(t.tensor_type) in GGML_BLOCK:
            raw = torch.from_numpy(np.ascontiguousarray(t.data).reshape(-1).view(np.uint8).copy())
            theirs = dequantize(raw, int(t.tensor_type)).numpy().reshape(shape)
            row["max_abs_transformers_vs_ours"] = max(row["max_abs_transformers_vs_ours"],
                                                      float(np.abs(theirs - ours).max()))
    return dict(out)


def requantised(ckpt, shipped: Path, export: Path) -> dict:
    """Per shipped type: share of values the export keeps bit-exact, max error, max error / its type's bound."""
    from checkpoints.gguf_check import decode, error_bound, expected_tensors, oriented

    was = {n: t.tensor_type.name for n, t in _tensors(shipped).items()}
    found = _tensors(export)
    acc: dict = defaultdict(lambda: {"values": 0, "exact": 0, "max_abs": 0.0, "max_of_bound": 0.0, "as": set()})
    for name, (src, change) in expected_tensors(ckpt).items():
        t = found[name]
        x = oriented(ckpt, src, change)
        got = decode(t.data, t.tensor_type.name, x.shape)
        err = np.abs(got - x)
        bound = error_bound(x, t.tensor_type.name)
        row = acc[was[name]]
        row["values"] += x.size
        row["exact"] += int((err == 0).sum())
        row["max_abs"] = max(row["max_abs"], float(err.max()))
        if bound.any():
            row["max_of_bound"] = max(row["max_of_bound"], float((err / np.maximum(bound, 1e-30)).max()))
        row["as"].add(t.tensor_type.name)
    return {k: {"exported_as": sorted(v.pop("as")), "exact_share": v["exact"] / v["values"], **v}
            for k, v in acc.items()}


def agreement(src, model, tok, prompts: list[str], n: int = 12) -> dict:
    """Greedy text, teacher-forced top-1 agreement, logit deltas, and the gap at each first difference."""
    import torch

    ref = continuations(src, tok, prompts, n)
    got = continuations(model, tok, prompts, n)
    same_top1 = positions = 0
    max_delta, delta_sum, flips = 0.0, 0.0, []
    for prompt, a, b in zip(prompts, ref, got):
        ids = tok(prompt, return_tensors="pt").input_ids
        full = torch.cat([ids, torch.tensor([a])], dim=1)
        with torch.no_grad():
            ls = src(full).logits[0, ids.shape[1] - 1:-1]
            lq = model(full).logits[0, ids.shape[1] - 1:-1]
        same_top1 += int((ls.argmax(-1) == lq.argmax(-1)).sum())
        positions += ls.shape[0]
        d = (lq - ls).abs()
        max_delta = max(max_delta, float(d.max()))
        delta_sum += float(d.mean()) * ls.shape[0]
        k = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), None)
        if k is not None:
            top2 = ls[k].topk(2)
            gap = float(top2.values[0] - top2.values[1])
            moved = float((ls[k, a[k]] - ls[k, b[k]]) - (lq[k, a[k]] - lq[k, b[k]]))
            flips.append({"prompt": prompt, "step": k, "source": tok.decode([a[k]]), "export": tok.decode([b[k]]),
                          "source_gap": round(gap, 4), "gap_moved_by": round(moved, 4),
                          "max_abs_delta_there": round(float(d[k].max()), 4)})
    return {"prompts_identical": sum(x == y for x, y in zip(ref, got)), "prompts": len(prompts),
            "top1_agreement": same_top1 / positions, "positions": positions,
            "max_abs_logit_delta": max_delta, "mean_abs_logit_delta": delta_sum / positions, "flips": flips}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/gguf-bench")
    ap.add_argument("--types", nargs="*", default=["q8_0"])
    ap.add_argument("--reuse", action="store_true", help="use demo-<type>.gguf in --out if it exists")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from checkpoints.demo import demo_gguf_file, demo_model_path
    from checkpoints.gguf_export import export_gguf
    from checkpoints.sources import resolve

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = demo_model_path()
    ckpt = resolve("demo")
    shipped = demo_gguf_file()
    report: dict = {"shipped": shipped.name, "source_vs_shipped": source_vs_shipped(ckpt, shipped)}
    print("source vs shipped:", json.dumps(report["source_vs_shipped"]), flush=True)
    src = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    for qtype in args.types:
        path = out / f"demo-{qtype}.gguf"
        if not (args.reuse and path.is_file()):
            export_gguf(ckpt, path, qtype=qtype, overwrite=True)
        row = {"requantised": requantised(ckpt, shipped, path),
               "agreement": agreement(src, load_gguf(path), tok, PROMPTS)}
        report[qtype] = row
        print(f"{qtype}:", json.dumps(row, indent=1), flush=True)
        (out / "q8_0-analysis.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
