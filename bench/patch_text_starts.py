"""Does a patch neuron's detector open at the start of unrelated text? (docs/editing-at-scale.md, "Where the
drift comes from".)

For tuning records START..START+N: the library's two-anchor detector ("M"), the same with the first
positions' second moment M0 added to the text statistics ("M+0.1M0", "M+M0"), and the mean anchor alone
("mean-only"), scored on the edit's own prompts, paraphrases, neighbourhood tokens, held-out WikiText, the
first position of 1,197 distinct held-out tokens and the second position of 1,024 held-out pairs. An
exploration script (session 15): prints the scores' medians and worsts and the records that open at a start.

    .venv/bin/python bench/patch_text_starts.py 400 100
"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sequential_edits import DATA, heldout_ids, sequence_order
from patch_scores import all_inputs
from checkpoints.sources import resolve
from editing.evaluate import load_records
from editing.patch import PatchHyperParams, subject_detector
from editing.request import tokenise
from editing.rome import compute_keys, prefixed_sequences
from editing.session import EditSession
from editing.stats import StatsCache, corpus_from_file, SEQ_LEN
torch.set_num_threads(2)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 100
START = int(sys.argv[2]) if len(sys.argv) > 2 else 0
ckpt = resolve("demo"); model, tok = ckpt.load_model(), ckpt.load_tokenizer()
wiki = DATA / "wikitext-2-raw" / "wiki.test.raw"
s = EditSession(model, tok, stats=StatsCache(), corpus=corpus_from_file(wiki), stats_tokens=100_000)
layer = s.default_layer; name = s.spec.module("mlp", layer)
M = s.statistics(layer, kind="M")[layer].double()
d = M.shape[0] - 1
text_ids = tok(wiki.read_text(encoding="utf-8")[:600_000])["input_ids"]
g = torch.Generator().manual_seed(0)
def first_inputs(ids):
    return all_inputs(model, tok, name, [[i] for i in ids])
stat_first = first_inputs([text_ids[i] for i in torch.randint(0, min(100_000, len(text_ids)), (4096,), generator=g).tolist()])
held = heldout_ids(tok, wiki.read_text(encoding="utf-8"), 100_000, 4096)
bank_ids = sorted(set(held))
bank = first_inputs(bank_ids)
pairs = [[held[i], held[i + 1]] for i in range(0, 2048, 2)]
second = all_inputs(model, tok, name, pairs).reshape(len(pairs), 2, -1)[:, 1]
text = all_inputs(model, tok, name, [held[i:i + SEQ_LEN] for i in range(0, len(held), SEQ_LEN)])
aug = torch.cat([stat_first.double(), torch.ones(len(stat_first), 1, dtype=torch.double)], 1)
M0 = aug.T @ aug / len(aug)
records = sequence_order(load_records(DATA / "counterfact" / "dev-1000.json"), "tune")[START:START + N]
hp = PatchHyperParams(); act = torch.nn.SiLU()
variants = {"M": M, "M+0.1M0": M + 0.1 * M0, "M+M0": M + M0, "mean-only": M}
res = {k: [] for k in variants}
at0 = 0
for r in records:
    req = r.request(None)
    seqs = prefixed_sequences(tok, s.prefixes(), req)
    at0 += seqs[0].subject_last <= 1
    X = compute_keys(model, tok, s.spec, layer, seqs, role="mlp")
    para = []
    for p in r.paraphrases:
        if r.subject in p:
            t = tokenise(tok, p, r.subject)
            para.append(all_inputs(model, tok, name, [t.ids])[t.subject_last])
    nb = all_inputs(model, tok, name, [tok(p)["input_ids"] for p in r.neighborhood])
    own_first = set(tok(r.subject)["input_ids"][:1]) if seqs[0].subject_last == 0 else set()
    keep = torch.tensor([i not in own_first for i in bank_ids])
    for k, Mv in variants.items():
        det = subject_detector(Mv.float(), X, act, hp)
        w = (det.gate / hp.sharpness + hp.threshold * det.up).double()
        if k == "mean-only":
            Mr = Mv[:d, :d] + hp.ridge * float(Mv[:d, :d].diagonal().mean()) * torch.eye(d, dtype=torch.double)
            xb = X.double().mean(0)
            sol = torch.linalg.solve(Mr, xb)
            w = sol / (xb @ sol)
            det.scores = [float(v) for v in X.double() @ w]
        res[k].append({"own": min(det.scores), "bare": det.scores[0], "para": min(float(x.double() @ w) for x in para) if para else float("nan"),
                       "nb": float((nb.double() @ w).max()), "text": float((text.double() @ w).max()),
                       "first": float((bank[keep].double() @ w).max()), "second": float((second.double() @ w).max()), "at0": seqs[0].subject_last <= 1})
print(f"tune records {N}: bare subject at position 0 in {at0}; first-position bank {len(bank_ids)} tokens")
for k, rows in res.items():
    line = [k]
    for key, worst in (("own", min), ("para", min), ("nb", max), ("text", max), ("first", max), ("second", max)):
        vals = [x[key] for x in rows if x[key] == x[key]]
        line.append(f"{key} med {statistics.median(vals):.3f} worst {worst(vals):.3f}")
    print("   firing at start:", [(START + i, round(x["first"], 2), round(x["second"], 2), round(x["bare"], 2)) for i, x in enumerate(rows) if max(x["first"], x["second"]) > 0.5])
    over = sum(x["first"] > 0.5 for x in rows); over0 = sum(x["first"] > 0.5 and x["at0"] for x in rows)
    nbo = sum(x["nb"] > 0.5 for x in rows); po = sum(x["para"] < 0.5 for x in rows)
    print(" | ".join(line), f"| first>0.5: {over} ({over0} at pos 0) | nb>0.5: {nbo} | para<0.5: {po}")
fire = [i for i, x in enumerate(res["M"]) if max(x["first"], x["second"]) > 0.5]
for i in fire:
    a, b = res["M"][i], res["mean-only"][i]
    print(START + i, "two-anchor", {k: round(a[k], 2) for k in ("bare", "own", "para", "first", "second", "nb")},
          "mean-only", {k: round(b[k], 2) for k in ("bare", "own", "para", "first", "second", "nb")})
