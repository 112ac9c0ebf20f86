"""Why a long sequence of edits breaks the model: the anatomy of a saved ``bench/sequential_edits.py`` run.

A sequence's saved state (``--save-every``) holds every edit's factors and keys, so the
cumulative update ΔW = Σᵢ BᵢAᵢ of each edited layer can be rebuilt and taken apart
without recomputing a single edit. For the first N edits this prints:

* the held-out WikiText perplexity (× unedited) after the first n edits, for each n in ``--at``;
* how the cumulative update grows: its top singular values, and ‖ΣΔ‖ / √Σ‖Δ‖² (1 when the
  edits' updates are mutually orthogonal, as independent facts' should be), also in the metric
  ordinary text sees, tr(ΣΔ C ΣΔᵀ) / Σ tr(Δᵢ C Δᵢᵀ) (C the layer's key statistics);
* each layer's share: the perplexity with only that layer's updates, and with all but it;
* AlphaEdit's null space at each layer: how many directions, and the share of ordinary text's
  key energy tr(PC)/tr(C) they carry (the method assumes almost none); and how distinct the edit keys
  are from ordinary text's, kᵀC⁻¹k against its text average (the key dimension);
* the shared direction: the top right singular vector v of each layer's ΣΔ, its cosine with
  C⁻¹k̄ (k̄ the mean of the edits' keys at that layer, C the layer's key statistics), and the
  scores (perplexity, retention, paraphrase, neighbourhood on every ``--sample``-th edited
  record) of the model as edited and with the component of ΣΔ along C⁻¹k̄ removed;
* the same scores with every update scaled down (``--scales``): how much of each update the facts
  need, and how far from linear the damage is;
* with ``--consolidate``, the same scores after re-solving each layer's cumulative update jointly: the
  update of least text-metric norm tr(Δ C Δᵀ) that gives every edit's key a chosen output, either the
  output it had right after its own edit ("own": later edits' interference undone) or the one it has at
  the end ("final": how far the sequence's sum is from the joint minimum for what it does).

    .venv/bin/python bench/sequential_anatomy.py /work/notes/s6/report-memit-1000.memit.state.pt \\
        --half report --edits 900 --at 100,300,500,700,900 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sequential_edits import DATA, heldout_ids, sequence_order  # noqa: E402

from checkpoints.arch import spec_for  # noqa: E402
from checkpoints.sources import resolve  # noqa: E402
from editing.alphaedit import AlphaEditHyperParams  # noqa: E402
from editing.evaluate import evaluate_edits, load_records, perplexity  # noqa: E402
from editing.nullspace import nullspace_projector  # noqa: E402
from editing.stats import SEQ_LEN, StatsCache, corpus_from_file  # noqa: E402


def cumulative(edits: list[dict], module: str) -> torch.Tensor:
    """Σᵢ BᵢAᵢ ``[out, in]`` in float64 over the edits that changed ``module``."""
    Bs = torch.cat([e["factors"][module][0].double() for e in edits if module in e["factors"]], dim=1)
    As = torch.cat([e["factors"][module][1].double() for e in edits if module in e["factors"]], dim=0)
    return Bs @ As


def consolidated(edits: list[dict], module: str, layer: int, C: torch.Tensor, *, keep: str,
                 ridge: float) -> torch.Tensor:
    """The update Δ of least tr(Δ C Δᵀ) with Δ K = T for the edits' keys K at ``layer``:
    Δ = T (KᵀC⁻¹K)⁻¹ KᵀC⁻¹, with ``ridge`` (relative to the mean diagonal) added to KᵀC⁻¹K for
    near-parallel keys. T is each key's output change right after its own edit (``keep="own"``) or
    under the whole sequence's update (``keep="final"``)."""
    mine = [e for e in edits if layer in e["keys"]]
    keys = [e["keys"][layer].double().T for e in mine]  # each [in, n]
    K = torch.cat(keys, dim=1)
    if keep == "final":
        T = cumulative(edits, module) @ K
    else:
        run = torch.zeros(mine[0]["factors"][module][0].shape[0], K.shape[0], dtype=torch.float64)
        outputs = []
        for e, k in zip(mine, keys):
            B, A = e["factors"][module]
            run = run + B.double() @ A.double()
            outputs.append(run @ k)
        T = torch.cat(outputs, dim=1)
    CiK = torch.linalg.solve(C.double(), K)
    G = K.T @ CiK
    G = G + ridge * float(G.diagonal().mean()) * torch.eye(G.shape[0], dtype=G.dtype)
    return T @ torch.linalg.solve(G, CiK.T)


def coherence(edits: list[dict], module: str, total: torch.Tensor, C: torch.Tensor | None = None) -> float:
    """‖ΣΔ‖ / √Σ‖Δᵢ‖²: 1 for mutually orthogonal updates, up to √n when they all point one way. With C,
    in the norm ‖Δ‖²_C = tr(Δ C Δᵀ), the mean squared change of the outputs of keys distributed as C."""
    G = C.double() if C is not None else torch.eye(total.shape[1], dtype=torch.float64)
    # ‖BA‖²_C = Σ (BᵀB) ⊙ (A C Aᵀ), from the factors without forming each [out, in] product
    sq = sum(float(((B.double().T @ B.double()) * (A.double() @ G @ A.double().T)).sum())
             for B, A in (e["factors"][module] for e in edits if module in e["factors"]))
    return (float(((total @ G) * total).sum()) / sq) ** 0.5


class Weights:
    """Sets the edited modules to pristine + given ``[out, in]`` deltas (in the model's layout)."""

    def __init__(self, model, spec, modules: list[str]):
        self.params = {m: model.get_submodule(m).weight for m in modules}
        self.pristine = {m: p.detach().clone() for m, p in self.params.items()}
        self.spec = spec

    def set(self, deltas: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for m, p in self.params.items():
                p.copy_(self.pristine[m])
                if m in deltas:
                    p.add_(self.spec.from_out_in(deltas[m]).to(p.dtype))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("state", help="a *.state.pt saved by bench/sequential_edits.py")
    ap.add_argument("--half", choices=("tune", "report"), required=True, help="the half the run edited")
    ap.add_argument("--edits", type=int, default=0, help="the first N edits (0: all saved)")
    ap.add_argument("--at", default="", help="perplexity after these numbers of edits too (e.g. 100,300,500)")
    ap.add_argument("--sample", type=int, default=3, help="score every N-th edited record")
    ap.add_argument("--stats-tokens", type=int, default=100_000)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scales", default="0.75,0.6,0.5",
                    help="also score the model with every update scaled by these factors (how much of each update "
                         "the facts need, and how the perplexity falls with it)")
    ap.add_argument("--consolidate", default="",
                    help="also score the joint re-solve of each layer's cumulative update (see above) with these "
                         "ridges, e.g. 1e-4,1e-2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scales = [float(x) for x in args.scales.split(",") if x.strip()]

    state = torch.load(args.state, weights_only=True)
    edits = state["edits"][:args.edits or None]
    n = sum(e["n"] for e in edits)
    ckpt = resolve("demo")
    model, tok = ckpt.load_model(), ckpt.load_tokenizer()
    spec = spec_for(model.config.model_type, strict=True)
    corpus = corpus_from_file(DATA / "wikitext-2-raw" / "wiki.test.raw")
    held = heldout_ids(tok, corpus.text or "", args.stats_tokens, args.ppl_tokens)
    records = sequence_order(load_records(DATA / "counterfact" / "dev-1000.json"), args.half)[:n]
    layer_of = {spec.module("mlp_out", layer): layer for layer in sorted({int(x) for e in edits for x in e["keys"]})}
    modules = list(layer_of)
    weights = Weights(model, spec, modules)
    base = perplexity(model, held, seq_len=SEQ_LEN)
    print(f"{args.state}: {n} edits over {', '.join(modules)}; unedited perplexity {base:.2f}")
    # The statistics describe the unedited model, as the edits' own solves used them.
    Cs = StatsCache().get(model, tok, spec, sorted(layer_of.values()), corpus, args.stats_tokens)

    full: dict[str, torch.Tensor] = {}
    for k in sorted({int(x) for x in args.at.split(",") if x.strip() and int(x) < len(edits)} | {len(edits)}):
        part = edits[:k]
        totals = full = {m: cumulative(part, m) for m in modules}  # the last k is all the edits
        weights.set(totals)
        ratio = perplexity(model, held, seq_len=SEQ_LEN) / base
        growth = "; ".join(f"L{layer_of[m]} sv {', '.join(f'{s:.1f}' for s in torch.linalg.svdvals(t)[:3].tolist())}"
                           f" coherence {coherence(part, m, t):.2f} (text {coherence(part, m, t, Cs[layer_of[m]]):.2f})"
                           for m, t in totals.items())
        print(f"after {k} edits: perplexity x{ratio:.3f}; {growth}", flush=True)

    for m in modules:
        weights.set({m: full[m]})
        only = perplexity(model, held, seq_len=SEQ_LEN) / base
        weights.set({x: full[x] for x in modules if x != m})
        without = perplexity(model, held, seq_len=SEQ_LEN) / base
        print(f"L{layer_of[m]}: only its updates x{only:.3f}, all but its updates x{without:.3f}", flush=True)

    # AlphaEdit's premise, checked on these statistics: its null space should carry almost none of
    # ordinary text's key energy, tr(PC)/tr(C) ≈ 0.
    for layer in sorted(layer_of.values()):
        C = Cs[layer].double()
        shares = []
        for threshold in (AlphaEditHyperParams().nullspace_threshold, 5e-3):
            P, dim = nullspace_projector(C, threshold)
            shares.append(f"threshold {threshold:g}: {dim} of {C.shape[0]} directions, "
                          f"{float((P.double() * C).sum() / C.trace()):.1%} of the key energy")
        # How distinct the edited subjects' keys are from ordinary text: E[kᵀC⁻¹k] over text keys is the
        # key dimension, and an update that gives a key an output of size r moves ordinary text's
        # outputs by r²/(kᵀC⁻¹k) in the mean square, so this ratio bounds how cheap an edit can be.
        K = torch.cat([e["keys"][layer].double() for e in edits if layer in e["keys"]]).T
        distinct = float((K * torch.linalg.solve(C, K)).sum(0).median())
        print(f"L{layer} AlphaEdit null space, {'; '.join(shares)}; edit keys' kᵀC⁻¹k median {distinct:.0f} "
              f"({distinct / C.shape[0]:.1f}x an average text key's)", flush=True)
    removed = {}
    for m, total in full.items():
        layer = layer_of[m]
        kbar = torch.cat([e["keys"][layer].double() for e in edits if layer in e["keys"]]).mean(0)
        w = torch.linalg.solve(Cs[layer].double(), kbar)
        w = w / w.norm()
        v = torch.linalg.svd(total, full_matrices=False)[2][0]
        removed[m] = total - (total @ w)[:, None] * w[None, :]
        print(f"L{layer}: top right singular vector · C⁻¹k̄/‖C⁻¹k̄‖ = {abs(float(v @ w)):.3f}; "
              f"‖ΣΔ along C⁻¹k̄‖ / ‖ΣΔ‖ = {float((total @ w).norm() / total.norm()):.3f}", flush=True)
    sample = records[::args.sample]
    scaled = [(f"every update x{x:g}", {m: x * t for m, t in full.items()}) for x in scales]
    joint = [(f"re-solved jointly, {keep} outputs, ridge {ridge:g}",
              {m: consolidated(edits, m, layer_of[m], Cs[layer_of[m]], keep=keep, ridge=ridge) for m in modules})
             for keep in ("own", "final") for ridge in (float(x) for x in args.consolidate.split(",") if x.strip())]
    for label, deltas in [("as edited", full), ("without the component along C⁻¹k̄", removed), *scaled, *joint]:
        t0 = time.time()
        weights.set(deltas)
        ratio = perplexity(model, held, seq_len=SEQ_LEN) / base
        rows = evaluate_edits(model, tok, sample)
        mean = {key: sum(r[key] for r in rows) / len(rows) for key in ("efficacy", "paraphrase", "neighborhood")}
        text = sum(float(((d @ Cs[layer_of[m]].double()) * d).sum()) for m, d in deltas.items())
        print(f"{label}: perplexity x{ratio:.3f}; on {len(sample)} edited records retention {mean['efficacy']:.3f} "
              f"paraphrase {mean['paraphrase']:.3f} neighbourhood {mean['neighborhood']:.3f}; "
              f"Σ tr(ΔCΔᵀ) {text:.1f} ({time.time() - t0:.0f} s)", flush=True)
    weights.set({})
    unedited = evaluate_edits(model, tok, sample)
    print(f"unedited on the same records: neighbourhood "
          f"{sum(r['neighborhood'] for r in unedited) / len(unedited):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
