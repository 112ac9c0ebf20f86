"""Sequential editing on the demo model: N CounterFact edits one after another, nothing undone.

The methods in ``--methods`` run in lockstep, each on its own copy of the
model (a run cut short still compares them at the same number of edits); records of a half of ``../shared/data/counterfact/dev-1000.json``
(``--half report``: 500-999, the README's numbers) are edited one at a time,
or in batches of ``--batch`` for ``memit``/``alphaedit-memit``. After every
``--every`` edits it measures:

* retention: efficacy of every edit so far; paraphrase and neighbourhood over
  all edited records; the unedited model's scores on the same records;
* WikiText perplexity on held-out text: the last ``--ppl-tokens`` tokens of
  ``wiki.test.raw``, which the statistics (its first ``--stats-tokens``
  tokens) never saw -- checked, the run refuses to start if they overlap;
* fluency (ROME's n-gram entropy on fixed prompts) and the checks by
  generation on an evenly spread sample of the edited records (``--gen-sample``);
* update norms ‖ΔW‖ (median, max) and how many edits the session flagged.

A run whose perplexity exceeds ``--stop-when-ppl-ratio`` × the unedited one is
stopped (it has collapsed) and the output says so. Writes one JSON line per
checkpoint to ``--out``.jsonl and the curves to ``--out``.png, and prints a
comparison table with ratios against the unedited model.

Method variants for tuning: ``alphaedit+t=0.01+l2=1+exact=1+vf=prompt`` sets
AlphaEdit's null-space threshold, L2, exact rescaling and RomeHyperParams.value_from;
``memit+opt=lbfgs+vpen=25+steps=40+vp=10+es=argmax+esl=0.5+ridge=0.1+kp=1+guard=1+lam=3000+passes=2+layers=1-8+clamp=0.5`` sets v*'s optimiser, its norm penalty, evaluations and prompts, its early stop (MPES), its loss threshold,
MEMIT's norm ridge, the earlier edits' keys in the solve, the shared-direction guard, λ, the passes, the edited layers and the clamp.

    .venv/bin/python bench/sequential_edits.py --methods r-rome,alphaedit,rome --max-edits 100 --every 25 \\
        --half report --threads 1 --out /work/notes/seq-report
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
HALF = 500  # dev-1000.json: records 0-499 tune, 500-999 report

from checkpoints.fingerprint import module_digest  # noqa: E402
from checkpoints.sources import resolve  # noqa: E402
from editing.alphaedit import AlphaEditHyperParams  # noqa: E402
from editing.evaluate import evaluate_edits, load_records, perplexity  # noqa: E402
from editing.generation_checks import FLUENCY_PROMPTS, GenerationConfig, fluency_on, generation_scores  # noqa: E402
from editing.memit import MemitHyperParams  # noqa: E402
from editing.methods import MULTI_LAYER, check_method  # noqa: E402
from editing.patch import PatchHyperParams, is_patch_parameter  # noqa: E402
from editing.rome import RomeHyperParams  # noqa: E402
from editing.session import EditSession  # noqa: E402
from editing.stats import SEQ_LEN, StatsCache, text_batches, corpus_from_file  # noqa: E402

SCORES = ("efficacy", "paraphrase", "neighborhood")
GEN = ("gen_efficacy", "gen_paraphrase", "gen_neighborhood")


@dataclass
class Variant:
    label: str
    method: str
    rome: RomeHyperParams
    alpha: AlphaEditHyperParams
    memit: MemitHyperParams | None = None
    patch: PatchHyperParams | None = None


def _flag(value: str) -> bool:
    return value not in ("0", "false", "False")


def layer_span(value: str) -> list[int]:
    """"2-5" -> [2, 3, 4, 5]; "4" -> [4]."""
    lo, _, hi = value.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


# Variant option -> (the settings it sets: "rome", "alpha", "memit"; field; parser).
OPTIONS: dict[str, tuple[tuple[str, ...], str, Callable[[str], Any]]] = {
    "t": (("alpha",), "nullspace_threshold", float),
    "l2": (("alpha",), "l2", float),
    "exact": (("alpha",), "exact", _flag),
    "vf": (("rome",), "value_from", str),
    "es": (("rome", "memit"), "early_stop", str),
    "esl": (("rome",), "early_stop_loss", float),
    "opt": (("rome", "memit"), "v_optimizer", str),
    "vpen": (("rome", "memit"), "v_norm_penalty", float),
    "steps": (("rome", "memit"), "v_steps", int),
    "vp": (("rome",), "v_prompts", lambda x: None if x == "all" else int(x)),
    "ridge": (("memit",), "norm_ridge", float),
    "kp": (("memit",), "keep_edit_keys", _flag),
    "guard": (("memit",), "shared_key_guard", _flag),
    "gain": (("memit",), "gain_guard", int),
    "lam": (("memit",), "mom2_update_weight", float),
    "passes": (("memit",), "max_passes", int),
    "layers": (("memit",), "layers", layer_span),
    "clamp": (("memit",), "clamp_norm_factor", float),
    "tau": (("patch",), "threshold", float),
    "alpha": (("patch",), "sharpness", float),
}


def parse_variant(text: str) -> Variant:
    """``method[+key=value...]`` with the keys of :data:`OPTIONS`."""
    name, *opts = text.strip().split("+")
    method = check_method(name)
    settings = {"rome": RomeHyperParams(), "alpha": AlphaEditHyperParams(), "memit": MemitHyperParams(),
                "patch": PatchHyperParams()}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in OPTIONS:
            raise SystemExit(f"unknown option {key!r} in {text!r} ({', '.join(OPTIONS)})")
        targets, field_name, parse = OPTIONS[key]
        for target in targets:
            settings[target] = replace(settings[target], **{field_name: parse(value)})
    return Variant(text.strip(), method, settings["rome"], settings["alpha"], settings["memit"], settings["patch"])


def heldout_ids(tok, text: str, stats_tokens: int, n: int) -> list[int]:
    """The last ``n`` tokens of ``text``, tokenised as the statistics tokenise it; refuses any overlap."""
    ids = [t for chunk in text_batches(tok, text, 10**9, SEQ_LEN) for t in chunk.tolist()]
    if len(ids) - n < stats_tokens:
        raise SystemExit(f"held-out text overlaps the statistics: {len(ids)} tokens, {stats_tokens} for the "
                         f"statistics, {n} held out")
    return ids[-n:]


class UneditedCache:
    """The unedited model's per-record scores, by dev-1000 record number, in one JSON file.

    Scoring the unedited model on 1,000 records costs as much as a checkpoint (about 50 min
    under load), and every run and method needs the same numbers, so they are computed once.
    """

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        data = json.loads(path.read_text()) if path.exists() else {}
        self.data = data if data.get("fingerprint") == fingerprint else {"fingerprint": fingerprint}

    def rows(self, kind: str, numbers: list[int], compute) -> list[dict]:
        """Rows of ``kind`` for ``numbers``, computing (all at once) only the missing ones."""
        have = self.data.setdefault(kind, {})
        missing = [n for n in numbers if str(n) not in have]
        if missing:
            for n, row in zip(missing, compute(missing)):
                have[str(n)] = row
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data))
            tmp.replace(self.path)
        return [have[str(n)] for n in numbers]


def sequence_order(all_records: list, half: str) -> list:
    """The order a sequence edits dev-1000's records in. A half holds 500 records; a longer sequence
    goes on with the other half's (report: 500-999 then 0-499), reported separately in "first_half"."""
    lo = 0 if half == "tune" else HALF
    return all_records[lo:lo + HALF] + all_records[HALF - lo:2 * HALF - lo]


def record_span(lo: int, offset: int, n: int) -> str:
    """The dev-1000 record numbers a sequence edits, in order (it wraps into the other half past 500)."""
    first = lo + offset
    if offset + n <= HALF:
        return f"{first}-{first + n - 1}"
    other = HALF - lo
    return f"{first}-{lo + HALF - 1}, then {other}-{other + offset + n - HALF - 1}"


def mean_of(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return round(sum(vals) / len(vals), 4) if vals else None


def spread(k: int, n: int) -> list[int]:
    """Up to ``k`` indices evenly spread over ``range(n)``, first and last included."""
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)}) if k and n else []


def measure(model, tok, records, base_scores, held, base_gen, args) -> dict:
    """Scores of the model as it is now on ``records`` (all edited so far), with the unedited ones.
    ``base_scores(n)`` gives the unedited model's scores of the first n records of the sequence and
    ``base_gen(indices)`` its generation checks of those records."""
    rows = evaluate_edits(model, tok, records)
    out = {k: mean_of(rows, k) for k in SCORES}
    base_rows = base_scores(len(records))
    out["unedited"] = {k: mean_of(base_rows, k) for k in SCORES}
    if len(records) > HALF:
        # Past 500 edits the sequence goes on into the other half's records; the first
        # half's edits, scored after all of them, are the clean held-out retention figure.
        out["first_half"] = {k: mean_of(rows[:HALF], k) for k in SCORES}
        out["first_half"]["unedited"] = {k: mean_of(base_rows[:HALF], k) for k in SCORES}
    out["ppl"] = round(perplexity(model, held, seq_len=SEQ_LEN), 3)
    out["fluency"] = round(fluency_on(model, tok, FLUENCY_PROMPTS), 4)
    # Spread over the records edited so far, not over the whole planned sequence: a 1,000-edit run
    # would otherwise check one record by generation at its 100-edit checkpoint.
    idx = spread(args.gen_sample, len(records))
    if idx:
        g = [generation_scores(model, tok, records[i], GenerationConfig(fluency_tokens=0)) for i in idx]
        out.update({k: mean_of(g, k) for k in GEN})
        out["unedited"].update({k: mean_of(base_gen(idx), k) for k in GEN})
        out["gen_n"] = len(idx)
    return out


def rss_mb() -> int:
    """This process's resident memory (Linux), logged at every checkpoint: a long run must not grow."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20
    except (OSError, ValueError, IndexError):
        return -1


def release_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim; a no-op elsewhere).

    Every edit allocates and frees tens of MB of activations between small tensors it keeps; glibc
    keeps the freed pages, and a 1,000-edit run grew past 15 GB (RSS +8 MB an edit on tuning records,
    flat with a trim after each edit), so the bench trims after every edit."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def capital_of_france(model, tok) -> str:
    from editing.generation_checks import greedy_continuations

    return tok.decode(greedy_continuations(model, tok, ["The capital of France is"], 12)[0], skip_special_tokens=True)


class Run:
    """One method's sequence on its own copy of the model, advanced checkpoint by checkpoint."""

    def __init__(self, variant: Variant, model, tok, corpus, stats, args):
        self.variant, self.model, self.tok, self.args = variant, model, tok, args
        self.session = EditSession(model, tok, stats=stats, corpus=corpus, stats_tokens=args.stats_tokens,
                                   hparams=variant.rome, method=variant.method, alpha_hparams=variant.alpha,
                                   memit_hparams=variant.memit, patch_hparams=variant.patch, base_name="demo")
        self.batch = args.batch if variant.method in MULTI_LAYER else 1
        self.norms: list[float] = []
        self.seconds: list[float] = []
        self.flagged = 0
        self.missed = 0  # facts whose own prompt did not produce the new target right after their edit
        self.drifted = 0  # edits after which all the edits so far had moved neutral text past the limit
        self.first_drifted = 0  # the first such edit's number (0: none yet)
        self.done = 0
        self.stopped = ""
        self.t_start = time.time()

    # A 1,000-edit sequence takes hours on 2 cores, longer than one sitting: after every checkpoint the
    # run's edits (their factors, not the weights) are saved, and --resume replays them bit-exactly.
    def save_state(self, path: Path, identity: dict) -> None:
        edits = [{"method": e.method, "n": len(e.requests), "layers": list(e.layers),
                  "factors": {m: [B, A] for m, (B, A) in e.factors.items()},
                  "keys": {int(layer): k for layer, k in e.keys.items()}, "checks": e.info.get("checks")}
                 for e in self.session.edits]
        state = {"identity": identity, "done": self.done, "norms": self.norms, "seconds": self.seconds,
                 "flagged": self.flagged, "missed": self.missed, "elapsed": time.time() - self.t_start,
                 "stopped": self.stopped, "edits": edits, "drifted": self.drifted,
                 "first_drifted": self.first_drifted}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def restore(self, path: Path, identity: dict, records) -> None:
        state = torch.load(path, weights_only=True)
        if state["identity"] != identity:
            raise SystemExit(f"{path} belongs to another run: {state['identity']} (this run: {identity})")
        pos = 0
        for e in state["edits"]:
            reqs = [r.request(self.args.layer) for r in records[pos:pos + e["n"]]]
            self.session.replay(e["method"], reqs, e["layers"], {m: (B, A) for m, (B, A) in e["factors"].items()},
                                keys=e["keys"], checks=e["checks"])
            pos += e["n"]
        self.done, self.norms, self.seconds = state["done"], state["norms"], state["seconds"]
        self.flagged, self.missed, self.stopped = state["flagged"], state["missed"], state["stopped"]
        self.drifted, self.first_drifted = state.get("drifted", 0), state.get("first_drifted", 0)
        self.t_start = time.time() - state["elapsed"]
        print(f"[{self.variant.label}] resumed after {self.done} edits ({pos} replayed)", flush=True)

    def advance(self, records, upto: int, ctx: dict, save=None) -> dict | None:
        """Edit records[done:upto] one at a time (or in batches), then measure; None once stopped.
        ``save()`` is called every ``--save-every`` edits (and by the caller after the measurement)."""
        if self.stopped or self.done >= min(upto, len(records)):
            return None  # stopped, finished, or a batch already went past this checkpoint
        label, method, args = self.variant.label, self.variant.method, self.args
        while self.done < min(upto, len(records)):
            reqs = [r.request(args.layer) for r in records[self.done:self.done + self.batch]]
            t0 = time.time()
            if self.batch == 1:
                edit = self.session.apply(reqs[0], method=method)
            else:
                edit = self.session.apply_batch(reqs, method=method)
            self.seconds.append((time.time() - t0) / len(reqs))
            checks = edit.info.get("checks", {})
            self.norms.append(float(checks.get("update_norm", float("nan"))))
            self.flagged += bool(checks.get("flag"))
            self.missed += int(checks.get("missed", 0))
            self.done += len(reqs)
            if checks.get("drifted"):
                self.drifted += 1
                self.first_drifted = self.first_drifted or self.done
            release_freed_memory()
            if checks.get("flag"):
                print(f"  [{label}] edit {self.done}: flagged: {checks.get('warning')}", file=sys.stderr, flush=True)
            if save is not None and args.save_every and self.done % args.save_every == 0:
                save()
        return self.checkpoint(records, ctx)

    def checkpoint(self, records, ctx: dict) -> dict:
        """Measure the model with the first ``done`` records edited."""
        label, args = self.variant.label, self.args
        unedited = ctx["unedited"]
        m = measure(self.model, self.tok, records[:self.done], ctx["base_scores"], ctx["held"], ctx["base_gen"], args)
        point = {"method": label, "edits": self.done, **m,
                 "ppl_unedited": unedited["ppl"], "ppl_ratio": round(m["ppl"] / unedited["ppl"], 4),
                 "fluency_unedited": unedited["fluency"],
                 "norm_median": round(statistics.median(self.norms), 3), "norm_max": round(max(self.norms), 3),
                 # KL(unedited ‖ now) on neutral text: the last edit's check (a replayed edit keeps its own)
                 "drift_kl": self.session.edits[-1].info["checks"].get("drift_kl"),
                 "drifted": self.drifted, "first_drifted": self.first_drifted,
                 "flagged": self.flagged, "missed": self.missed, "seconds_per_edit": round(statistics.mean(self.seconds), 2),
                 "elapsed_s": round(time.time() - self.t_start, 1), "rss_mb": rss_mb(),
                 "capital_of_france": capital_of_france(self.model, self.tok)}
        if args.stop_when_ppl_ratio and point["ppl_ratio"] > args.stop_when_ppl_ratio:
            self.stopped = (f"stopped after {self.done} edits: perplexity {point['ppl']:.1f} is "
                            f"{point['ppl_ratio']:.1f}x the unedited {unedited['ppl']:.1f} (> {args.stop_when_ppl_ratio})")
            point["stopped"] = self.stopped
        print(f"[{label}] {self.done} edits: retention {m['efficacy']} paraphrase {m['paraphrase']} "
              f"neighbourhood {m['neighborhood']} (unedited {m['unedited']['neighborhood']}) ppl {m['ppl']} "
              f"({point['ppl_ratio']:.3f}x) gen_eff {m.get('gen_efficacy')} norms med {point['norm_median']} "
              f"max {point['norm_max']} flagged {self.flagged} drift KL {point['drift_kl']} (drifted {self.drifted}) "
              f"{point['seconds_per_edit']} s/edit"
              + (f"\n[{label}] first {HALF} edits after {self.done}: {m['first_half']}" if "first_half" in m else "")
              + (f"\n[{label}] {self.stopped}" if self.stopped else ""), flush=True)
        return point


def read_runs(paths: list[Path]) -> tuple[list[dict], dict]:
    """The checkpoints of one or more runs' .jsonl files, and the last run header read.

    A memit / alphaedit-memit run is labelled with its batch size ("batches of 100", "one at a time"), so that
    the two ways of running the same method stay apart in a figure of several runs.
    """
    points: list[dict] = []
    head: dict = {}
    for path in paths:
        batch = 1
        for line in filter(str.strip, path.read_text().splitlines()):
            row = json.loads(line)
            if "method" not in row:
                head = row
                batch = int(row.get("args", {}).get("batch", 1))
                continue
            if parse_variant(row["method"]).method in MULTI_LAYER:
                how = f"batches of {batch}" if batch > 1 else "one at a time"
                row = {**row, "method": f"{row['method']}, {how}"}
            points.append(row)
    if not head:
        raise SystemExit(f"no run header in {', '.join(map(str, paths))}")
    return points, head


PPL_AXIS_TOP = 3.5  # the default --stop-when-ppl-ratio is 3: a run that passes it has collapsed


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    by: dict[str, list[dict]] = {}
    for p in points:
        by.setdefault(p["method"], []).append(p)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, ps) in enumerate(by.items()):
        c = colours[i % len(colours)]
        x = [p["edits"] for p in ps]
        axes[0].plot(x, [p["efficacy"] for p in ps], "-o", color=c)
        axes[0].plot(x, [p["paraphrase"] for p in ps], "--", color=c)
        # The edited set grows, so the unedited model's score moves too: plot the difference.
        axes[1].plot(x, [p["neighborhood"] - p["unedited"]["neighborhood"] for p in ps], "-o", color=c, label=label)
        # A collapsed run (ROME: ×331) would squash every other curve onto 1.0 even on a log axis, so
        # the axis stops at PPL_AXIS_TOP and points above it sit on the edge with their value written.
        shown = [min(p["ppl_ratio"], PPL_AXIS_TOP) for p in ps]
        axes[2].plot(x, shown, "-o", color=c, label=label)
        for xi, p in zip(x, ps):
            if p["ppl_ratio"] > PPL_AXIS_TOP:
                axes[2].annotate(f"×{p['ppl_ratio']:.0f}", (xi, PPL_AXIS_TOP), textcoords="offset points",
                                 xytext=(4, -12), fontsize=7, color=c)
    axes[0].set_title("retention (solid) and paraphrase (dashed)")
    for goal in (0.9, 0.7):  # the goals after 1,000 edits: retention and paraphrase
        axes[0].axhline(goal, color="grey", ls=":", lw=1)
    axes[1].set_title("neighbourhood minus the unedited model's")
    axes[1].axhline(-0.05, color="grey", ls=":", lw=1)
    axes[2].set_title("held-out WikiText perplexity / unedited")
    axes[2].axhline(1.1, color="grey", ls=":", lw=1)
    axes[2].set_ylim(top=PPL_AXIS_TOP * 1.02)
    for ax in axes:
        ax.set_xlabel("sequential edits")
        ax.grid(alpha=0.3)
    # One legend for the three panels, below them, so that no curve or annotation hides behind it.
    handles, labels = axes[2].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.suptitle("SmolLM2-135M, CounterFact report half, edits applied one after another without undo")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(points: list[dict], unedited: dict, *, every_checkpoint: bool = False) -> str:
    """A markdown table of each method's last checkpoint, or of every checkpoint ordered by the number of
    edits (methods side by side at each count: the comparison table)."""
    last = {}
    for p in points:
        last[p["method"]] = p
    rows = sorted(points, key=lambda p: p["edits"]) if every_checkpoint else list(last.values())
    head = ("| method | edits | retention | paraphrase | neighbourhood (unedited) | gen eff. | ppl (x unedited) "
            "| fluency (x) | ‖ΔW‖ median / max | flagged | s/edit |")
    lines = [head, "|" + "---|" * 11]
    for p in rows:
        u = p["unedited"]
        lines.append(
            f"| {p['method']} | {p['edits']}{' (stopped)' if p.get('stopped') else ''} | {p['efficacy']:.3f} | "
            f"{p['paraphrase']:.3f} | {p['neighborhood']:.3f} ({u['neighborhood']:.3f}) | "
            f"{p['gen_efficacy'] if p.get('gen_efficacy') is not None else '-'} | {p['ppl']:.1f} ({p['ppl_ratio']:.3f}) | "
            + (f"{p['fluency']:.2f} ({p['fluency'] / unedited['fluency']:.2f})" if "fluency" in p else "-")
            + f" | {p['norm_median']:.1f} / {p['norm_max']:.1f} | "
            f"{p['flagged']} | {p['seconds_per_edit']} |")
    lines.append(f"unedited: ppl {unedited['ppl']:.1f}, fluency {unedited['fluency']:.2f} "
                 f"(held-out {unedited['ppl_tokens']} tokens)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="r-rome,alphaedit,rome",
                    help="comma-separated methods (rome, r-rome, alphaedit, memit, alphaedit-memit) or variants "
                         "(alphaedit+t=0.01+l2=1)")
    ap.add_argument("--half", choices=["tune", "report"], default="report")
    ap.add_argument("--offset", type=int, default=0, help="first record within the half")
    ap.add_argument("--max-edits", type=int, default=100)
    ap.add_argument("--every", type=int, default=100, help="measure after every N edits")
    ap.add_argument("--at", default="", help="measure after these numbers of edits instead (e.g. 100,200,500,1000)")
    ap.add_argument("--batch", type=int, default=100, help="facts per batch for memit / alphaedit-memit")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--stats-tokens", type=int, default=100_000)
    ap.add_argument("--ppl-tokens", type=int, default=8192, help="held-out WikiText tokens for perplexity")
    ap.add_argument("--gen-sample", type=int, default=25, help="edited records checked by generation per checkpoint")
    ap.add_argument("--stop-when-ppl-ratio", type=float, default=3.0,
                    help="stop a method whose perplexity exceeds this multiple of the unedited one (0: never)")
    ap.add_argument("--out", default="/work/notes/sequential", help="output prefix: .jsonl and .png")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--unedited-cache", default=str(Path.home() / ".cache" / "weightsmith" / "bench-unedited.json"),
                    help="JSON file of the unedited model's per-record scores, reused across runs")
    ap.add_argument("--replot", default=None,
                    help="only redraw the PNG and print every checkpoint's row from these .jsonl files "
                         "(comma-separated: one figure and one comparison table for several runs)")
    ap.add_argument("--save-every", type=int, default=25,
                    help="also save the run's edits every N edits between checkpoints (0: only at checkpoints)")
    ap.add_argument("--resume", action="store_true",
                    help="go on from the edits saved next to --out by an earlier run of the same command")
    args = ap.parse_args()
    if args.replot:
        pts, head = read_runs([Path(x) for x in args.replot.split(",") if x.strip()])
        plot(pts, Path(args.out).with_suffix(".png"))
        print(table(pts, head["unedited"], every_checkpoint=True))
        return 0
    torch.set_num_threads(args.threads)
    variants = [parse_variant(m) for m in args.methods.split(",") if m.strip()]

    cf, wiki = DATA / "counterfact" / "dev-1000.json", DATA / "wikitext-2-raw" / "wiki.test.raw"
    lo = 0 if args.half == "tune" else HALF
    all_records = load_records(cf)
    records = sequence_order(all_records, args.half)[args.offset:args.offset + args.max_edits]
    ckpt = resolve("demo")
    model, tok = ckpt.load_model(), ckpt.load_tokenizer()
    corpus = corpus_from_file(wiki)
    held = heldout_ids(tok, corpus.text or "", args.stats_tokens, args.ppl_tokens)
    stats = StatsCache()
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}

    t0 = time.time()
    unedited = {"ppl": round(perplexity(model, held, seq_len=SEQ_LEN), 3),
                "fluency": round(fluency_on(model, tok, FLUENCY_PROMPTS), 4), "ppl_tokens": len(held)}
    numbers = sequence_order(list(range(2 * HALF)), args.half)[args.offset:args.offset + args.max_edits]
    cache = UneditedCache(Path(args.unedited_cache), module_digest(model))
    # The unedited model's scores and generation checks, by record, from the cache or from a copy of
    # the model kept unedited (the runs' copies are edited by the time a checkpoint asks for a new
    # record), loaded only when a row is missing. Computed at each checkpoint for the records edited so
    # far, not up front for the whole planned sequence: a method that collapses early (ROME) would
    # otherwise wait for 1,000 records' baseline, as long as a checkpoint of all of them.
    unedited_copy = functools.cache(ckpt.load_model)

    def base_scores(count: int) -> list[dict]:
        return cache.rows("scores", numbers[:count],
                          lambda ns: evaluate_edits(unedited_copy(), tok, [all_records[n] for n in ns]))

    def base_gen(indices: list[int]) -> list[dict]:
        return cache.rows("generation", [numbers[i] for i in indices], lambda ns: [
            generation_scores(unedited_copy(), tok, all_records[n], GenerationConfig(fluency_tokens=0)) for n in ns])
    unedited["seconds"] = round(time.time() - t0, 1)
    print(f"unedited: ppl {unedited['ppl']} on {len(held)} held-out tokens, fluency {unedited['fluency']} "
          f"({unedited['seconds']} s)", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    points: list[dict] = []
    if args.resume and jsonl.exists():
        points = [p for p in map(json.loads, filter(str.strip, jsonl.read_text().splitlines())) if "method" in p]
    identity = {k: getattr(args, k) for k in ("half", "offset", "batch", "layer", "stats_tokens", "ppl_tokens")}
    with jsonl.open("a") as f:
        f.write(json.dumps({"unedited": unedited, "half": args.half, "records": record_span(lo, args.offset, len(records)),
                            "args": vars(args)}) + "\n")

        def sink(point: dict) -> None:
            points.append(point)
            f.write(json.dumps(point) + "\n")
            f.flush()
            plot(points, out.with_suffix(".png"))

        # Methods advance in lockstep, each on its own copy of the model, so that a run cut short
        # (time, --stop-when-ppl-ratio) still compares every method at the same number of edits.
        runs = [Run(v, model if i == 0 else ckpt.load_model(), tok, corpus, stats, args)
                for i, v in enumerate(variants)]
        state_of = {r.variant.label: out.with_name(f"{out.name}.{r.variant.label}.state.pt") for r in runs}

        def save(r: Run) -> None:
            r.save_state(state_of[r.variant.label], {**identity, "method": r.variant.label})

        for r in runs:
            if args.resume and state_of[r.variant.label].exists():
                r.restore(state_of[r.variant.label], {**identity, "method": r.variant.label}, records)
        ctx = {"unedited": unedited, "base_scores": base_scores, "held": held, "base_gen": base_gen}
        marks = sorted({int(x) for x in args.at.split(",") if x.strip()})
        # A run resumed between checkpoints goes on to the next one on the grid (--every / --at).
        mark = min(r.done for r in runs)
        mark = mark if marks else mark - mark % args.every
        # A state saved on a checkpoint that was never measured (the run was stopped in its measurement)
        # is measured before it goes on, so the curve has no hole there.
        for r in runs:
            on_grid = r.done in marks if marks else r.done % args.every == 0
            measured = any(p.get("method") == r.variant.label and p.get("edits") == r.done for p in points)
            if r.done and on_grid and not measured and not r.stopped:
                sink(r.checkpoint(records, ctx))
                save(r)  # keeps a stop decided there
        while any(not r.stopped and r.done < len(records) for r in runs):
            later = [m for m in marks if m > mark]
            mark = later[0] if later else (max(marks + [len(records)]) if marks else mark + args.every)
            for r in runs:
                point = r.advance(records, mark, ctx, functools.partial(save, r))
                if point is not None:
                    sink(point)
                    save(r)
        for r in runs:
            r.session.undo_all()
        # undo_all restores the pristine bits (checked on the first copy); patch neurons stay attached,
        # all zero, so they add exactly nothing.
        state = model.state_dict()
        assert all(torch.equal(pristine[n], state[n]) for n in pristine)
        assert all(is_patch_parameter(n) and not t.any() for n, t in state.items() if n not in pristine)
    print(table(points, unedited))
    print(f"wrote {jsonl} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
