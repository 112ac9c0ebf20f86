"""Editing subcommands: ``trace``, ``edit`` (one fact, or ``--batch FILE``), ``eval-edits`` (argument parsing only)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from checkpoints.jobs import tqdm_job

from .methods import DEFAULT_METHOD, METHODS


def _resolve(ref: str):
    from checkpoints.arch import spec_for
    from checkpoints.sources import resolve

    ckpt = resolve(ref)
    spec_for(ckpt.model_type, strict=True)  # unsupported architectures fail before loading
    return ckpt


def _load(ref: str):
    ckpt = _resolve(ref)
    return ckpt, ckpt.load_model(), ckpt.load_tokenizer()


def _trace(args: argparse.Namespace) -> int:
    from .trace import causal_trace, save_trace

    _, model, tok = _load(args.model)
    with tqdm_job("tracing") as job:
        result = causal_trace(model, tok, args.prompt, args.subject, kind=args.kind, samples=args.samples,
                              noise=args.noise, window=args.window, job=job)
    png, js = save_trace(result, Path(args.out))
    print(f"answer {result.answer!r}: clean {result.high_score:.4f}, corrupted {result.low_score:.4f}; "
          f"suggested edit layer: {result.suggest_layer()} ({result.seconds:.1f} s)")
    print(f"wrote {png} and {js}")
    return 0


def _session(args):
    from .methods import FALLBACK_METHOD
    from .prepare import open_session

    ckpt = _resolve(args.model)
    # An adapter holds low-rank changes of existing matrices, not new neurons: without a named method,
    # --as-adapter edits with the fallback (MEMIT); with --method patch it is refused in _edit.
    method = args.method or (FALLBACK_METHOD if getattr(args, "as_adapter", False) else None)
    return open_session(ckpt, corpus=args.stats_corpus, stats_tokens=args.stats_tokens, method=method)


def _edit(args: argparse.Namespace) -> int:
    from checkpoints.errors import WeightsmithError

    out = Path(args.out)
    single = {"--prompt": args.prompt, "--subject": args.subject, "--target": args.target}
    if args.batch:
        given = [k for k, v in {**single, "--target-true": args.target_true, "--layer": args.layer}.items()
                 if v is not None]
        if given:
            raise WeightsmithError(f"--batch takes the facts from its file: drop {', '.join(given)}")
    elif any(v is None for v in single.values()):
        raise WeightsmithError(f"edit needs {', '.join(k for k, v in single.items() if v is None)} "
                               "(or --batch FILE with many facts)")
    if out.exists():
        raise WeightsmithError(f"{out} already exists (choose another folder)")
    if args.as_adapter and args.out_dtype != "stored":
        raise WeightsmithError("--out-dtype is for a saved model; an adapter keeps its rank-one factors in float32")
    if args.as_adapter and args.method == "patch":
        raise WeightsmithError("--as-adapter cannot hold patch edits (they add neurons): drop --as-adapter, or "
                               "choose --method memit, r-rome or rome")
    if args.batch:
        return _edit_batch(args, out)
    return _edit_one(args, out)


def _write(args: argparse.Namespace, session, out: Path, scores: dict | None = None) -> None:
    if args.as_adapter:
        session.export_adapter(out, scores=scores)
    else:
        import torch

        dtype = None if args.out_dtype == "stored" else getattr(torch, args.out_dtype)
        session.export_model(out, scores=scores, dtype=dtype)
        if session.precision_report is not None:
            print(f"checked: {session.precision_report.line()}")


def _edit_one(args: argparse.Namespace, out: Path) -> int:
    from .evaluate import EvalRecord, evaluate_edit
    from .request import EditRequest

    session = _session(args)
    model, tok = session.model, session.tokenizer
    req = EditRequest(args.prompt, args.subject, args.target, args.layer, args.target_true)
    session.check(req)
    scores = None
    rec = None
    if args.target_true:
        rec = EvalRecord(args.prompt, args.subject, args.target, args.target_true)
        before = evaluate_edit(model, tok, rec)
    with tqdm_job("editing") as job:
        edit = session.apply(req, job=job)
    if rec is not None:
        after = evaluate_edit(model, tok, rec)
        scores = {"efficacy_before": before["efficacy"], "efficacy_after": after["efficacy"],
                  "efficacy_magnitude_after": round(after["efficacy_magnitude"], 4)}
    _write(args, session, out, scores)
    info = edit.info
    checks = info["checks"]
    steps = info["steps"][0] if isinstance(info["steps"], list) else info["steps"]
    print(f"edited ({edit.method}) layer {','.join(map(str, edit.layers))} in {info['seconds']:.1f} s ({steps} steps; "
          f"‖ΔW‖ {checks['update_norm']:.4g}, {checks['relative_norm']:.3g} of ‖W‖, "
          f"KL on neutral text {checks.get('unrelated_kl', float('nan')):.3g} "
          f"({checks.get('drift_kl', float('nan')):.3g} from the unedited model); the prompt now "
          f"{'continues with' if not checks.get('missed') else 'does not continue with'} the target, "
          f"P = {checks.get('target_prob', float('nan')):.2f}); "
          f"wrote {'adapter' if args.as_adapter else 'model'} to {out}")
    if edit.warning:
        print(f"warning: {edit.warning}", file=sys.stderr)
    return 0


def _edit_batch(args: argparse.Namespace, out: Path) -> int:
    """Many facts from a CSV or JSON file in one update (MEMIT, or AlphaEdit's with an AlphaEdit method)."""
    from .batch_file import load_edit_requests

    requests = load_edit_requests(Path(args.batch))  # a bad file fails before the model loads
    session = _session(args)
    with tqdm_job("editing") as job:
        edit = session.apply_batch(requests, job=job)
    _write(args, session, out)
    print(f"edited {len(requests)} facts ({edit.method}) over layers {','.join(map(str, edit.layers))} in "
          f"{edit.info['seconds']:.1f} s; wrote {'adapter' if args.as_adapter else 'model'} to {out}")
    if edit.warning:
        print(f"warning: {edit.warning}", file=sys.stderr)
    return 0


def _eval_edits(args: argparse.Namespace) -> int:
    from .batch_file import load_edit_records
    from .evaluate import GENERATION_KEYS, run_eval
    from .generation_checks import GenerationConfig

    records = load_edit_records(Path(args.file), limit=args.limit)
    session = _session(args)
    gen = None if args.no_generation else GenerationConfig(answer_tokens=args.gen_tokens)
    with tqdm_job("evaluating") as job:
        result = run_eval(session, records, layer=args.layer, generation=gen, job=job)
    if args.json:
        print(json.dumps(result))
    else:
        b = result["baseline"]
        for k in ("efficacy", "paraphrase", "neighborhood", "score", *GENERATION_KEYS):
            if k in result:
                print(f"{k:<16} {result[k]}  (unedited {b[k]})")
        print(f"n {result['n']}, {result['seconds_per_edit']} s per edit")
    return 0


def _stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stats-corpus", default=None,
                   help="text file for the key statistics; hf:NAME/CONFIG for a datasets corpus; "
                        "default: text the model samples itself (offline)")
    p.add_argument("--stats-tokens", type=int, default=None,
                   help="tokens of corpus for the statistics (default 100000 for text, 10000 sampled)")
    p.add_argument("--layer", type=int, default=None,
                   help="edited layer (default: per-architecture table); for memit methods the four spread over are two below it to one above")
    p.add_argument("--method", choices=list(METHODS), default=None,
                   help=f"editing method (default {DEFAULT_METHOD}, or memit for a model whose MLP cannot take new "
                        "neurons); memit and alphaedit-memit spread over several layers")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="causal tracing: where does the model recall a fact? (heatmap + JSON)")
    p.add_argument("model", help="demo, a folder, a .safetensors/.gguf file, or a Hub id")
    p.add_argument("--prompt", required=True, help='e.g. "The Eiffel Tower is located in the city of"')
    p.add_argument("--subject", required=True, help="the subject in the prompt, e.g. \"Eiffel Tower\"")
    p.add_argument("--kind", choices=["hidden", "mlp", "attn"], default="hidden", help="what to restore")
    p.add_argument("--samples", type=int, default=3, help="noise samples averaged (default 3)")
    p.add_argument("--noise", type=float, default=3.0, help="noise scale in embedding standard deviations")
    p.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn")
    p.add_argument("--out", required=True, help="heatmap .png (the numbers go to the same name .json)")
    p.set_defaults(func=_trace)

    p = sub.add_parser("edit", help="rewrite one fact (or a file of them, --batch) and save the model or a LoRA adapter")
    p.add_argument("model", help="demo, a folder, a .safetensors/.gguf file, or a Hub id")
    p.add_argument("--prompt", help='prompt with {} for the subject, e.g. "{} is located in the city of"')
    p.add_argument("--subject")
    p.add_argument("--target", help="the new answer, e.g. Rome")
    p.add_argument("--target-true", default=None, help="the old answer (optional: scores go in the card)")
    p.add_argument("--batch", metavar="FILE", default=None,
                   help="many facts in one update from a CSV (header: prompt,subject,target_new,ground_truth) "
                        "or JSON file (CounterFact or flat records); memit, or alphaedit-memit/alphaedit "
                        "with an AlphaEdit --method")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--as-adapter", action="store_true", help="write a PEFT LoRA adapter instead of the full model")
    p.add_argument("--out-dtype", choices=("stored", "float32", "bfloat16", "float16"), default="stored",
                   help="dtype of the saved model's weights (default: the checkpoint's own; a narrower one than "
                        "float32 is checked first: the edits must still give their targets)")
    _stats_args(p)
    p.set_defaults(func=_edit)

    p = sub.add_parser("eval-edits", help="CounterFact scores: edit each record on fresh weights, with a baseline")
    p.add_argument("model", help="demo, a folder, a .safetensors/.gguf file, or a Hub id")
    p.add_argument("file", help="JSON records (original CounterFact or flat format), or a CSV file")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-generation", action="store_true",
                   help="skip the checks by generation (greedy: gen_efficacy, gen_paraphrase, gen_neighborhood, fluency)")
    p.add_argument("--gen-tokens", type=int, default=20,
                   help="new tokens in which a generated answer must appear (default 20)")
    _stats_args(p)
    p.set_defaults(func=_eval_edits)
