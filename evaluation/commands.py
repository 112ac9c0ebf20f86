"""``weightsmith eval MODEL [MODEL ...] --task TASK [--task ...]`` (argument parsing and the table only)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from checkpoints.jobs import tqdm_job

from .tasks import bundled_tasks


def format_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def text_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned table (numbers right-aligned)."""
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    from .cache import EvalCache
    from .run import EvalSettings, evaluate_models

    settings = EvalSettings(batch_size=args.batch_size, seq_len=args.seq_len, max_tokens=args.max_tokens,
                            limit=args.limit, max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
                            backend=args.backend)
    cache = None if args.no_cache else EvalCache.default()
    with tqdm_job("evaluating", disable=args.json or None) as job:
        result = evaluate_models(args.models, args.task, settings=settings, job=job, device=args.device,
                                 cache=cache)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    headers, rows = result.pivot()
    print(text_table(headers, [[t, m, *[format_value(v) for v in vals]] for t, m, *vals in rows]))
    cached = [f"{s.model} on {s.task}" for s in result.scores if s.cached]
    counts = {s.task: s.n for s in result.scores}
    print("items: " + ", ".join(f"{t} {n}" for t, n in counts.items()))
    if cached:
        print(f"from the cache ({len(cached)} of {len(result.scores)}): " + ", ".join(cached))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    names = ", ".join(bundled_tasks()) or "none"
    p = sub.add_parser(
        "eval", help="score models on tasks (perplexity, multiple choice, exact match, style)",
        description="Score one or more models on evaluation tasks and print a table, a column per model. "
                    f"Bundled tasks: {names}. A task is also any file in their formats: a .txt text "
                    "(perplexity), or JSONL of {query, choices, gold} (multiple choice by log-likelihood), "
                    "{prompt, answers} (greedy exact match) or {prompt} (style scores). Results are cached "
                    "by model content, task file and settings.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="demo, a model folder, a Hub id, demo-adapter:NAME or an adapter folder (applied to its base)")
    p.add_argument("--task", action="append", required=True, metavar="TASK",
                   help=f"a bundled task ({names}) or a task file; repeat for several")
    p.add_argument("--limit", type=int, help="only the first N questions of each question file")
    p.add_argument("--max-tokens", type=int, help="perplexity: only the first N tokens of the text")
    p.add_argument("--seq-len", type=int, default=256, help="perplexity window in tokens (default 256)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="generation tasks: answer length (default 48)")
    p.add_argument("--no-chat", action="store_true", help="generation tasks: plain prompts, no chat template")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=["weightsmith", "lm-eval"], default="weightsmith",
                   help="lm-eval: score multiple-choice tasks with lm-evaluation-harness, if installed "
                        "(pip install lm-eval; not a dependency)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached results")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_eval)
