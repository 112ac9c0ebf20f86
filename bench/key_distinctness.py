"""How distinct the edited subjects' keys are from ordinary text's, layer by layer.

An update that gives a key k an output change of size r moves ordinary text's outputs at that layer
by r²/(kᵀC⁻¹k) in the mean square (C the second moment of text keys), so kᵀC⁻¹k bounds how cheap an
edit can be there. Over text keys drawn like C's own, E[kᵀC⁻¹k] is the key dimension d. This prints,
for each layer, the median kᵀC⁻¹k / d of CounterFact subjects' keys (k*, the mean over the edit's
prefixed prompts, as MEMIT and r-ROME use it) and of held-out WikiText keys (the statistics never saw
them: their ratio shows how far a finite sample of C inflates the measure), and the subjects' median
over the held-out text's: the layer's distinctness, corrected for that bias. A window of layers where
it is much larger than at the default's (2-5 on the demo model) would be where long sequences of edits
cost ordinary text least (docs/editing-at-scale.md).

    .venv/bin/python bench/key_distinctness.py --half tune --n 100 --layers 0-15 --stats-tokens 20000
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sequential_edits import DATA, heldout_ids, layer_span, sequence_order  # noqa: E402

from checkpoints.sources import resolve  # noqa: E402
from editing.evaluate import load_records  # noqa: E402
from editing.hooks import capture_input, run_until  # noqa: E402
from editing.rome import compute_keys, prefixed_sequences  # noqa: E402
from editing.session import EditSession  # noqa: E402
from editing.stats import SEQ_LEN, StatsCache, corpus_from_file  # noqa: E402


@torch.no_grad()
def text_keys(model, spec, layer: int, ids: list[int], positions: int) -> torch.Tensor:
    """Down-projection inputs of ``layer`` at every position of ``ids`` (in SEQ_LEN windows): ``[in, m]``."""
    chunks = [ids[i:i + SEQ_LEN] for i in range(0, len(ids), SEQ_LEN)][: max(1, positions // SEQ_LEN)]
    name = spec.module("mlp_out", layer)
    out = []
    for chunk in chunks:
        with capture_input(model, name) as seen:
            run_until(model, name, input_ids=torch.tensor([chunk]))
        out.append(seen.value[0].float())
    return torch.cat(out).T


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--half", choices=("tune", "report"), default="tune")
    ap.add_argument("--n", type=int, default=100, help="records of the half, in sequence order")
    ap.add_argument("--layers", type=layer_span, default=layer_span("0-15"), help="e.g. 0-15")
    ap.add_argument("--stats-tokens", type=int, default=20_000)
    ap.add_argument("--text-positions", type=int, default=2048, help="held-out WikiText keys per layer")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    ckpt = resolve("demo")
    model, tok = ckpt.load_model(), ckpt.load_tokenizer()
    wiki = DATA / "wikitext-2-raw" / "wiki.test.raw"
    session = EditSession(model, tok, stats=StatsCache(), corpus=corpus_from_file(wiki),
                          stats_tokens=args.stats_tokens)
    held = heldout_ids(tok, wiki.read_text(encoding="utf-8"), args.stats_tokens, args.text_positions)
    records = sequence_order(load_records(DATA / "counterfact" / "dev-1000.json"), args.half)[: args.n]
    requests = [r.request(None) for r in records]
    prefixes = session.prefixes()
    seqs = [prefixed_sequences(tok, prefixes, q) for q in requests]
    Cs = session.statistics(args.layers)
    print(f"{args.half} records x{len(requests)}, statistics {args.stats_tokens} tokens, "
          f"{len(held)} held-out text positions; kᵀC⁻¹k / d (median)")
    print("| layer | subjects' k* | held-out text | subjects / text |")
    print("|---|---|---|---|")
    for layer in args.layers:
        C = Cs[layer].double()
        d = C.shape[0]
        K = torch.stack([compute_keys(model, tok, session.spec, layer, s).mean(0) for s in seqs]).T.double()
        T = text_keys(model, session.spec, layer, held, args.text_positions).double()
        subj = float((K * torch.linalg.solve(C, K)).sum(0).median()) / d
        text = float((T * torch.linalg.solve(C, T)).sum(0).median()) / d
        print(f"| {layer} | {subj:.2f} | {text:.2f} | {subj / text:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
