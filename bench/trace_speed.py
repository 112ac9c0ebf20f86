"""Causal-tracing speed on the demo model: a full hidden-state trace of a 10-token prompt.

Target (issue 5): at most 30 s on 2 CPU cores. Prints seconds and the ratio to the target.

    .venv/bin/python bench/trace_speed.py [--samples 3] [--kind hidden]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints.sources import resolve  # noqa: E402
from editing.trace import causal_trace  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--kind", default="hidden")
    ap.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    ap.add_argument("--subject", default="Eiffel Tower")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = resolve("demo")
    model, tok = ckpt.load_model(), ckpt.load_tokenizer()
    n = len(tok(args.prompt)["input_ids"])
    t0 = time.time()
    r = causal_trace(model, tok, args.prompt, args.subject, kind=args.kind, samples=args.samples)
    dt = time.time() - t0
    print(f"{args.kind} trace, {n} tokens x {r.scores.shape[1]} layers, {args.samples} samples, "
          f"{torch.get_num_threads()} threads: {dt:.1f} s (target <= 30 s: ratio {dt / 30:.2f}); "
          f"answer {r.answer!r} clean {r.high_score:.3f} corrupted {r.low_score:.3f}, "
          f"suggested layer {r.suggest_layer()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
