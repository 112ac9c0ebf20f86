"""Does a patch neuron's detector open at the start of unrelated text? (docs/editing-at-scale.md, "Where the
drift comes from".)

For tuning records ``--start`` .. ``--start + --n``, four detectors: the library's two-anchor one ("M"), the
same with the first positions' second moment M0 added to the text statistics ("M+0.1M0", "M+M0"), and the
mean anchor alone ("mean-only"). Each is scored on the edit's own prompts, its paraphrases, its
neighbourhood tokens, held-out WikiText, the first position of every distinct held-out token and the second
position of 1,024 held-out pairs; printed are the medians and worsts, the records that open at a start,
and the two-anchor and mean-only scores of each of those.

    .venv/bin/python bench/patch_text_starts.py --n 400 --start 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from patch_scores import all_inputs  # noqa: E402
from sequential_edits import DATA, heldout_ids, sequence_order  # noqa: E402

from checkpoints.sources import resolve  # noqa: E402
from editing.evaluate import load_records  # noqa: E402
from editing.patch import PatchHyperParams, subject_detector  # noqa: E402
from editing.request import tokenise  # noqa: E402
from editing.rome import compute_keys, prefixed_sequences  # noqa: E402
from editing.session import EditSession  # noqa: E402
from editing.stats import SEQ_LEN, StatsCache, corpus_from_file  # noqa: E402

SCORES = (("own", min), ("para", min), ("nb", max), ("text", max), ("first", max), ("second", max))


def augmented_moment(x: torch.Tensor) -> torch.Tensor:
    """``[[E xxᵀ, E x], [E xᵀ, 1]]`` of the rows of ``x`` (the layout of the statistics' kind M)."""
    aug = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.double)], 1)
    return aug.T @ aug / len(aug)


def mean_anchor_score(M: torch.Tensor, X: torch.Tensor, hp: PatchHyperParams) -> torch.Tensor:
    """The least-variance score over text that is 1 at the mean of ``X`` only (no bare-prompt anchor)."""
    d = M.shape[0] - 1
    Mr = M[:d, :d] + hp.ridge * float(M[:d, :d].diagonal().mean()) * torch.eye(d, dtype=torch.double)
    xb = X.double().mean(0)
    sol = torch.linalg.solve(Mr, xb)
    return sol / (xb @ sol)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--start", type=int, default=0, help="first tuning record")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ckpt = resolve("demo")
    model, tok = ckpt.load_model(), ckpt.load_tokenizer()
    wiki = DATA / "wikitext-2-raw" / "wiki.test.raw"
    raw = wiki.read_text(encoding="utf-8")
    session = EditSession(model, tok, stats=StatsCache(), corpus=corpus_from_file(wiki), stats_tokens=100_000)
    layer = session.default_layer
    name = session.spec.module("mlp", layer)
    M = session.statistics(layer, kind="M")[layer].double()

    def first_inputs(ids: list[int]) -> torch.Tensor:
        return all_inputs(model, tok, name, [[i] for i in ids])

    # M0 from text the statistics read (its first 100k tokens); the banks from held-out text.
    text_ids = tok(raw[:600_000])["input_ids"]
    g = torch.Generator().manual_seed(0)
    drawn = torch.randint(0, min(100_000, len(text_ids)), (4096,), generator=g).tolist()
    M0 = augmented_moment(first_inputs([text_ids[i] for i in drawn]))
    held = heldout_ids(tok, raw, 100_000, 4096)
    bank_ids = sorted(set(held))
    bank = first_inputs(bank_ids)
    pairs = [[held[i], held[i + 1]] for i in range(0, 2048, 2)]
    second = all_inputs(model, tok, name, pairs).reshape(len(pairs), 2, -1)[:, 1]
    text = all_inputs(model, tok, name, [held[i:i + SEQ_LEN] for i in range(0, len(held), SEQ_LEN)])

    records = sequence_order(load_records(DATA / "counterfact" / "dev-1000.json"), "tune")[args.start:args.start + args.n]
    hp, act = PatchHyperParams(), torch.nn.SiLU()
    variants = {"M": M, "M+0.1M0": M + 0.1 * M0, "M+M0": M + M0, "mean-only": M}
    results: dict[str, list[dict]] = {k: [] for k in variants}
    early = 0
    for r in records:
        seqs = prefixed_sequences(tok, session.prefixes(), r.request(None))
        starts_early = seqs[0].subject_last <= 1
        early += starts_early
        X = compute_keys(model, tok, session.spec, layer, seqs, role="mlp")
        para = [all_inputs(model, tok, name, [t.ids])[t.subject_last]
                for t in (tokenise(tok, p, r.subject) for p in r.paraphrases if r.subject in p)]
        nb = all_inputs(model, tok, name, [tok(p)["input_ids"] for p in r.neighborhood])
        own_first = set(tok(r.subject)["input_ids"][:1]) if seqs[0].subject_last == 0 else set()
        others = torch.tensor([i not in own_first for i in bank_ids])
        for label, Mv in variants.items():
            if label == "mean-only":
                w = mean_anchor_score(Mv, X, hp)
                own = [float(v) for v in X.double() @ w]
            else:
                det = subject_detector(Mv.float(), X, act, hp)
                w = (det.gate / hp.sharpness + hp.threshold * det.up).double()  # gate = α(w − τm), up = m
                own = det.scores
            results[label].append({
                "own": min(own), "bare": own[0],
                "para": min(float(x.double() @ w) for x in para) if para else float("nan"),
                "nb": float((nb.double() @ w).max()), "text": float((text.double() @ w).max()),
                "first": float((bank[others].double() @ w).max()), "second": float((second.double() @ w).max()),
                "early": starts_early})

    print(f"tune records {args.start}-{args.start + len(records) - 1}: bare subject at position 0 or 1 in {early}; "
          f"first-position bank {len(bank_ids)} tokens, second positions {len(pairs)}")
    for label, rows in results.items():
        line = [label] + [f"{key} med {statistics.median(v):.3f} worst {worst(v):.3f}"
                          for key, worst in SCORES for v in [[x[key] for x in rows if x[key] == x[key]]]]
        opened = sum(x["first"] > hp.threshold for x in rows)
        print(" | ".join(line), f"| first > τ: {opened} ({sum(x['first'] > hp.threshold and x['early'] for x in rows)} "
              f"early) | nb > τ: {sum(x['nb'] > hp.threshold for x in rows)} | para < τ: "
              f"{sum(x['para'] < hp.threshold for x in rows)}")
    keys = ("bare", "own", "para", "first", "second", "nb")
    for i, (a, b) in enumerate(zip(results["M"], results["mean-only"])):
        if max(a["first"], a["second"]) > hp.threshold:
            print(args.start + i, "two-anchor", {k: round(a[k], 2) for k in keys},
                  "mean-only", {k: round(b[k], 2) for k in keys})
    return 0


if __name__ == "__main__":
    sys.exit(main())
