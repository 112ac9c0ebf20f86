"""How large a δ does v* need? Adam (the authors' optimiser) against L-BFGS with a norm penalty.

For CounterFact records of one half, optimises MEMIT's target δ (the residual after the top edited block,
at the subject's last token) on the demo model, unedited, once per optimiser setting, and prints per setting
the median ‖δ‖, ‖δ‖ / ‖v‖, the target NLL over the loss's prompts measured afterwards by a separate forward
pass, the KL term, the loss evaluations and the seconds, with ratios against Adam. A smaller δ for the same
target means a smaller weight update: the size of each update is what sets the damage of a long sequence
(docs/editing-at-scale.md).

    .venv/bin/python bench/v_star_norm.py --half tune --n 16 --settings memit,memit+opt=lbfgs+vpen=5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
HALF = 500  # dev-1000.json: records 0-499 tune, 500-999 report

from checkpoints.arch import spec_for  # noqa: E402
from checkpoints.sources import resolve  # noqa: E402
from editing.evaluate import load_records  # noqa: E402
from editing.hooks import patch_output  # noqa: E402
from bench.sequential_edits import parse_variant  # noqa: E402
from editing.memit import MemitHyperParams, value_hparams  # noqa: E402
from editing.request import target_ids  # noqa: E402
from editing.rome import RomeHyperParams, compute_value, generate_prefixes, loss_prefixes, prefixed_sequences  # noqa: E402

log = logging.getLogger("v_star_norm")


@torch.no_grad()
def target_nll(model, tok, module: str, request, prefixes: list[str], delta: torch.Tensor) -> float:
    """Mean over the loss's prompts of the target's per-token NLL with δ added at the subject's last token."""
    tgt = target_ids(tok, request.target)
    nlls = []
    for t in prefixed_sequences(tok, prefixes, request, tgt):
        at = torch.zeros(1, len(t.ids), 1)
        at[0, t.subject_last, 0] = 1.0
        with patch_output(model, module, lambda y, at=at: y + at * delta):
            logp = F.log_softmax(model(input_ids=torch.tensor([t.ids])).logits[0].float(), -1)
        nlls.append(-float(sum(logp[t.prompt_len - 1 + i, k] for i, k in enumerate(tgt))) / len(tgt))
    return sum(nlls) / len(nlls)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--half", choices=["tune", "report"], default="tune")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--settings", default="memit,memit+opt=lbfgs+vpen=25,memit+opt=lbfgs+vpen=5",
                    help="MEMIT variants as in bench/sequential_edits.py (options opt, vpen, steps, esl, es, vp, clamp)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cf = DATA / "counterfact" / "dev-1000.json"
    if not cf.is_file():
        log.error("data not found under %s", DATA)
        return 1
    lo = 0 if args.half == "tune" else HALF
    records = load_records(cf)[lo:lo + args.n]
    ckpt = resolve("demo")
    model, tok = ckpt.load_model(), ckpt.load_tokenizer()
    spec = spec_for(model.config.model_type, strict=True)
    rome = RomeHyperParams()
    top = MemitHyperParams().layers_for(model.config.model_type, spec.num_layers(model.config))[-1]
    module = spec.block(top)
    prefixes = generate_prefixes(model, tok, rome.prefix_lengths, seed=rome.seed)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    settings = {}
    for name in names:
        variant = parse_variant(name)
        if variant.memit is None or variant.method != "memit":
            raise SystemExit(f"{name!r}: settings here are MEMIT variants (memit+opt=lbfgs+...)")
        settings[name] = value_hparams(variant.memit, variant.rome)
    rows: dict[str, list[dict]] = {name: [] for name in names}
    for i, rec in enumerate(records):
        req = rec.request()
        for name in names:
            hp = settings[name]
            t0 = time.time()
            delta, v, info = compute_value(model, tok, spec, req, top, prefixes, hp, module=module)
            row = {"record": lo + i, "norm": float(delta.norm()), "rel": float(delta.norm() / v.norm()),
                   "nll": target_nll(model, tok, module, req, loss_prefixes(prefixes, hp.v_prompts), delta),
                   "evals": info["steps"], "seconds": time.time() - t0}
            rows[name].append(row)
            log.info("record %d %-22s ‖δ‖ %6.2f (%.2f of ‖v‖)  NLL %.3f  %2d evaluations  %.1f s", lo + i, name,
                     row["norm"], row["rel"], row["nll"], row["evals"], row["seconds"])
    ref = names[0]
    med = {name: {k: statistics.median(r[k] for r in rows[name]) for k in ("norm", "rel", "nll", "evals", "seconds")}
           for name in names}
    lines = [f"| setting | ‖δ‖ median | ‖δ‖/‖v‖ | NLL median | NLL > 0.5 | evaluations | s | ‖δ‖ × {ref} |",
             "|---|---|---|---|---|---|---|---|"]
    for name in names:
        m = med[name]
        high = sum(r["nll"] > 0.5 for r in rows[name])
        lines.append(f"| {name} | {m['norm']:.1f} | {m['rel']:.2f} | {m['nll']:.3f} | {high} of {len(rows[name])} | "
                     f"{m['evals']:.0f} | {m['seconds']:.1f} | {m['norm'] / med[ref]['norm']:.2f} |")
    print("\n".join(lines))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"half": args.half, "rows": rows, "medians": med}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
