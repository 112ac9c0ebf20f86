"""Where does the demo model recall facts? MLP-kind causal traces over CounterFact records.

For each of the first ``--n`` records that the model knows (greedy answer = true target), runs an MLP-kind
trace (window ``--window``) and prints, per record, the layer with the largest indirect
effect at the subject's last token (the ROME paper's criterion) and over all subject tokens;
then the mean indirect-effect profile over records, which picks the default edit layer.

    .venv/bin/python bench/trace_layers.py --n 6 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from checkpoints.sources import resolve  # noqa: E402
from editing.evaluate import load_records  # noqa: E402
from editing.request import prompt_ids, target_ids  # noqa: E402
from editing.trace import causal_trace  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--kind", default="mlp")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cf = DATA / "counterfact" / "dev-1000.json"
    if not cf.is_file():
        print(f"data not found under {DATA}", file=sys.stderr)
        return 1
    ckpt = resolve("demo")
    model, tok = ckpt.load_model(), ckpt.load_tokenizer()
    # Only facts the model knows (its greedy next token starts the true answer) have a decisive site.
    records = []
    for rec in load_records(cf):
        ids = torch.tensor([prompt_ids(tok, rec.text)])
        with torch.no_grad():
            top = int(model(input_ids=ids).logits[0, -1].argmax())
        if top == target_ids(tok, rec.target_true)[0]:
            records.append(rec)
        if len(records) == args.n:
            break
    last_profiles, subj_profiles, rows = [], [], []
    for rec in records:
        t0 = time.time()
        r = causal_trace(model, tok, rec.text, rec.subject, kind=args.kind, samples=args.samples, window=args.window)
        a, b = r.subject_range
        span = max(r.high_score - r.low_score, 1e-6)
        last = (r.scores[b - 1] - r.low_score) / span
        subj = ((r.scores[a:b] - r.low_score) / span).mean(0)
        last_profiles.append(last)
        subj_profiles.append(subj)
        rows.append({"subject": rec.subject, "answer": r.answer, "high": round(r.high_score, 4),
                     "low": round(r.low_score, 4), "argmax_last": int(last.argmax()),
                     "argmax_subject_mean": int(subj.argmax()), "suggested": r.suggest_layer(),
                     "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    mean_last = torch.stack(last_profiles).mean(0)
    mean_subj = torch.stack(subj_profiles).mean(0)
    out = {"n": len(records), "kind": args.kind, "window": args.window,
           "mean_effect_last_subject_token": [round(float(x), 3) for x in mean_last],
           "mean_effect_subject_tokens": [round(float(x), 3) for x in mean_subj],
           "argmax_mean_last": int(mean_last.argmax()), "argmax_mean_subject": int(mean_subj.argmax()),
           "records": rows}
    print(json.dumps({k: v for k, v in out.items() if k != "records"}))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
