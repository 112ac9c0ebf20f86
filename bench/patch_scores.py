"""How well a patch neuron's gate separates its subject from everything else (editing/patch.py).

For each CounterFact record of a half, the detector the patch method builds (statistics kind M over
``--stats-tokens`` of WikiText) scores: the edit's own prompts (bare and prefixed), its paraphrases at the
subject's last token, every token of its neighbourhood prompts (other subjects), and every token of held-out
WikiText that the statistics never saw. The gate opens where the score passes the threshold (0.5), so the
margin between the paraphrases' lowest score and the highest neighbourhood / text score is what keeps a
patch specific while it generalises. Also prints the spread of the layer's near-constant input direction.

    .venv/bin/python bench/patch_scores.py --half tune --n 100 --threads 1

With ``--state FILE`` (a ``bench/sequential_edits.py`` state of a patch run) it instead lists the saved
neurons that open on the checks' neutral prompts: each neuron's largest |activation|·‖down‖ over their
positions (layer-4 inputs are the unedited model's: patches only add to the MLP's output), with the token.
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

from sequential_edits import DATA, heldout_ids, sequence_order  # noqa: E402

from checkpoints.perplexity import right_padded  # noqa: E402
from checkpoints.sources import resolve  # noqa: E402
from editing.evaluate import load_records  # noqa: E402
from editing.hooks import capture_input, run_until  # noqa: E402
from editing.patch import PatchHyperParams, bias_spread, subject_detector  # noqa: E402
from editing.request import pad_id, tokenise  # noqa: E402
from editing.rome import compute_keys, prefixed_sequences  # noqa: E402
from editing.session import EditSession  # noqa: E402
from editing.stats import SEQ_LEN, StatsCache, corpus_from_file  # noqa: E402


@torch.no_grad()
def all_inputs(model, tok, name: str, rows: list[list[int]]) -> torch.Tensor:
    """The module's inputs at every real (unpadded) position of ``rows``: ``[positions, d]``."""
    ids, mask = right_padded(rows, pad_id(tok))
    with capture_input(model, name) as seen:
        run_until(model, name, input_ids=ids, attention_mask=mask)
    return seen.value[mask.bool()].float()  # type: ignore[index]


def precision_shift(gate: torch.Tensor, inputs: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest change of the gate's pre-activation ``x·gate`` over ``inputs`` when both are rounded to
    ``dtype`` (the products summed exactly, in float64, as the best a 16-bit kernel can do)."""
    exact = inputs.double() @ gate.double()
    rounded = inputs.to(dtype).double() @ gate.to(dtype).double()
    return float((rounded - exact).abs().max())


def neutral_firing(model, tok, state_file: Path, half: str, top: int = 15) -> None:
    """Print the saved patch neurons that open most on :data:`editing.checks.NEUTRAL_PROMPTS`."""
    from editing.checks import NEUTRAL_PROMPTS

    state = torch.load(state_file, weights_only=True)
    records = sequence_order(load_records(DATA / "counterfact" / "dev-1000.json"), half)
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in NEUTRAL_PROMPTS]
    found, inputs = [], {}
    for n, edit in enumerate(state["edits"]):
        factors = {m.rsplit(".", 1)[1]: f for m, f in edit["factors"].items()}
        if "gate_proj" not in factors:
            continue
        host = next(m for m in edit["factors"]).rsplit(".fact_neurons.", 1)[0]
        if host not in inputs:  # [positions, d], the prompts' real tokens in order
            inputs[host] = all_inputs(model, tok, host, rows)
        X = inputs[host]
        tokens = [t for r in rows for t in r]
        gate, up, down = factors["gate_proj"][1][0], factors["up_proj"][1][0], factors["down_proj"][0][:, 0]
        push = (torch.nn.functional.silu(X @ gate) * (X @ up)).abs() * down.norm()
        j = int(push.argmax())
        found.append((float(push[j]), n, records[n].subject, tok.decode([tokens[j]]), j))
    found.sort(reverse=True)
    print(f"{len(found)} patch neurons; largest contribution on the neutral prompts:")
    print("| edit | subject | contribution | token |")
    print("|---|---|---|---|")
    for value, n, subject, token, _ in found[:top]:
        print(f"| {n + 1} | {subject} | {value:.4g} | {token!r} |")
    print(f"neurons above 0.01: {sum(v > 0.01 for v, *_ in found)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--half", choices=("tune", "report"), default="tune")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--layer", type=int, default=None, help="default: the session's default layer")
    ap.add_argument("--stats-tokens", type=int, default=100_000)
    ap.add_argument("--text-positions", type=int, default=4096, help="held-out WikiText tokens")
    ap.add_argument("--threshold", type=float, default=PatchHyperParams().threshold)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--state", type=Path, default=None,
                    help="a sequential_edits.py patch state: list its neurons that open on neutral text")
    ap.add_argument("--precision", default="bfloat16,float16",
                    help="storage dtypes to check the gate in: weights and inputs rounded to each, summed in float64")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ckpt = resolve("demo")
    model, tok = ckpt.load_model(), ckpt.load_tokenizer()
    if args.state is not None:
        neutral_firing(model, tok, args.state, args.half)
        return 0
    wiki = DATA / "wikitext-2-raw" / "wiki.test.raw"
    session = EditSession(model, tok, stats=StatsCache(), corpus=corpus_from_file(wiki), stats_tokens=args.stats_tokens)
    layer = session.default_layer if args.layer is None else args.layer
    hp = PatchHyperParams(threshold=args.threshold)
    M = session.statistics(layer, kind="M")[layer]
    name = session.spec.module("mlp", layer)
    act = torch.nn.SiLU()  # only the scores are printed; the activation does not enter them
    held = heldout_ids(tok, wiki.read_text(encoding="utf-8"), args.stats_tokens, args.text_positions)
    text = all_inputs(model, tok, name, [held[i:i + SEQ_LEN] for i in range(0, len(held), SEQ_LEN)])
    records = sequence_order(load_records(DATA / "counterfact" / "dev-1000.json"), args.half)[: args.n]
    prefixes = session.prefixes()
    dtypes = [getattr(torch, d) for d in args.precision.split(",") if d]
    rows = []
    for r in records:
        req = r.request(None)
        X = compute_keys(model, tok, session.spec, layer, prefixed_sequences(tok, prefixes, req), role="mlp")
        det = subject_detector(M, X, act, hp)
        w = (det.gate / hp.sharpness + hp.threshold * det.up).double()  # gate = α(w − τm), up = m
        para = []
        for p in r.paraphrases:
            if r.subject in p:
                t = tokenise(tok, p, r.subject)
                para.append(float(all_inputs(model, tok, name, [t.ids])[t.subject_last].double() @ w))
        nb = all_inputs(model, tok, name, [tok(p)["input_ids"] for p in r.neighborhood]).double() @ w
        row = {"own_min": min(det.scores), "para_min": min(para) if para else float("nan"),
               "neighbour_max": float(nb.max()), "text_max": float((text.double() @ w).max()),
               "gate_norm": float(det.gate.norm()), "gate_max": float(det.gate.abs().max())}
        # A model saved or run in a 16-bit dtype rounds the gate row and the MLP input: the pre-activation
        # α(s − τc) moves by the rounding, and a shift near α(1 − τ) would open or close the gate wrongly.
        for dt in dtypes:
            row[f"shift_{str(dt).removeprefix('torch.')}"] = precision_shift(det.gate, torch.cat([X.float(), text]), dt)
        rows.append(row)
    print(f"{args.half} records x{len(rows)}, layer {layer}, statistics {args.stats_tokens} tokens, "
          f"{len(text)} held-out text positions; near-constant direction spread {bias_spread(M, hp):.4f}")
    print("| score | median | worst |")
    print("|---|---|---|")
    extra = [("gate_norm", max), ("gate_max", max)] + [(f"shift_{str(dt).removeprefix('torch.')}", max) for dt in dtypes]
    for key, worst in (("own_min", min), ("para_min", min), ("neighbour_max", max), ("text_max", max), *extra):
        vals = [row[key] for row in rows if row[key] == row[key]]
        print(f"| {key} | {statistics.median(vals):.3f} | {worst(vals):.3f} |")
    sep = sum(row["para_min"] > max(row["neighbour_max"], row["text_max"]) for row in rows)
    above = sum(max(row["neighbour_max"], row["text_max"]) > args.threshold for row in rows)
    print(f"paraphrases above every neighbour and text token: {sep} of {len(rows)}; records whose neighbours or "
          f"text pass the threshold {args.threshold}: {above}")
    margin = hp.sharpness * min(hp.threshold, 1 - hp.threshold)
    print(f"the pre-activation's margin on either side of the threshold is about α·min(τ, 1 − τ) = {margin:g} for an "
          "input at score 0 or 1; the shift_* rows are how far 16-bit rounding moves it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
