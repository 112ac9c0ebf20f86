"""Tokenizer merges against mergekit 0.1.5: the same recipes through both tools, max |Δ| each.

The models are tiny llamas with different vocabularies (tests/tiny_vocab.py);
the recipes (``tokenizer:`` union with forced and model_token entries,
``pad_to_multiple_of`` and ``chat_template: auto``; tied heads with
``tokenizer_source: union``; ties with ``tokenizer_source: base``) are the ones
tests/test_merge_tokenizer.py checks. Vocabulary weights are compared token by
token (mergekit numbers the tokens it adds in hash order, so ids may differ,
never rows); every other tensor by name. Both tools run as subprocesses
(bench/merge_vs_mergekit.py's runners and its mergekit venv).

Usage::

    .venv/bin/python bench/merge_tokenizer_vs_mergekit.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.merge_vs_mergekit import TOLERANCE, run_mergekit, run_weightsmith  # noqa: E402
from tiny_vocab import build_vocab_family, config, max_token_diff, mergekit_cases, vocabulary  # noqa: E402


def compare(work: Path) -> float:
    """Run every case through both tools; print and return the worst max |Δ|."""
    cases = mergekit_cases(build_vocab_family(work / "vocab"), build_vocab_family(work / "vocab-tied", tie=True))
    print("== tokenizer merges: Weightsmith vs mergekit 0.1.5 (tiny llamas, different vocabularies) ==")
    worst = 0.0
    for name, text in cases.items():
        recipe = work / f"{name}.yml"
        recipe.write_text(text)
        ws, mk = work / f"ws-{name}", work / f"mk-{name}"
        a, b = run_weightsmith(recipe, ws), run_mergekit(recipe, mk, threads=1)
        if not (a.ok and b.ok):
            print(f"{name:<34} FAILED: weightsmith ok={a.ok} mergekit ok={b.ok}\n{(b.log if a.ok else a.log)[-1500:]}")
            worst = float("inf")
            continue
        diff, where = max_token_diff(ws, mk)
        same_vocab = sorted(vocabulary(ws)) == sorted(vocabulary(mk))
        same_size = config(ws)["vocab_size"] == config(mk)["vocab_size"]
        ok = diff <= TOLERANCE and same_vocab and same_size
        worst = max(worst, diff)
        print(f"{name:<34} {len(vocabulary(ws))} tokens, {config(ws)['vocab_size']} rows, max |Δ| {diff:.2e} "
              f"{'ok' if ok else 'MISMATCH'}" + ("" if ok else f" at {where}; same vocabulary {same_vocab}, "
                                                              f"same rows {same_size}"), flush=True)
    print(f"worst max |Δ|: {worst:.2e} (tolerance {TOLERANCE:g})")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None, help="keep fixtures and outputs here (default: a temp folder)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ws-tokenizer-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        worst = compare(work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if worst <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
