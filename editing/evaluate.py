"""CounterFact-style scores of edits: efficacy, paraphrase, neighbourhood, magnitudes, harmonic mean.

A target's probability is the exponential of the per-token mean log-prob
of ``" " + target`` (no special tokens) after the prompt.

* efficacy (ES): mean[P(new) > P(true)] on the edit prompt;
* paraphrase (PS): the same on the paraphrases (averaged per record);
* neighbourhood (NS): mean[P(true) > P(new)] on prompts about other subjects;
* ``*_magnitude``: the mean probability differences (P(new) − P(true), resp. P(true) − P(new));
* score: harmonic mean of ES, PS and NS.

With a :class:`~editing.generation_checks.GenerationConfig`, :func:`run_eval`
also reports the checks by generation (gen_efficacy, gen_paraphrase,
gen_neighborhood, fluency; defined in :mod:`editing.generation_checks`).

Records come in the original CounterFact format (``requested_rewrite``,
``paraphrase_prompts``, ``neighborhood_prompts``) or the flat one
(``prompt``, ``subject``, ``target_new``, ``ground_truth``, ``rephrase_prompt``,
``locality_prompt``, ``locality_ground_truth``).

Example::

    records = load_records(Path("counterfact.json"))
    evaluate_edit(model, tok, records[0])    # {"efficacy": 0.0, "paraphrase": 0.5, ...}
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Job
from checkpoints.perplexity import perplexity, right_padded  # noqa: F401  (one definition; editing's callers import it here)

from .generation_checks import GenerationConfig, generation_scores
from .records import EvalRecord, load_records, parse_record  # noqa: F401  (part of this module's API)
from .request import pad_id, prompt_ids, target_ids

GENERATION_KEYS = ("gen_efficacy", "gen_paraphrase", "gen_neighborhood", "fluency")

@torch.no_grad()
def target_logprobs(model, tokenizer, prompts: list[str], targets: list[str], *, batch_size: int = 32) -> list[float]:
    """Per-token mean log-prob of ``" " + target`` after each prompt (pairs), in the order given.

    Rows are batched by length, so a batch pads little: scoring many records at once
    costs about half of scoring them one by one (bench/sequential_edits.py scores
    up to a thousand records at every checkpoint).
    """
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    pad = pad_id(tokenizer)
    # Pairs whose input rows are the same token sequence share one forward pass: a prompt scored
    # against a one-token new target and a one-token true target (most CounterFact pairs) is the
    # same row, so a record's scoring costs about half as much. The numbers are unchanged.
    unique: dict[tuple[int, ...], int] = {}
    row_of, spans = [], []
    for p, t in zip(prompts, targets):
        pi, ti = prompt_ids(tokenizer, p), target_ids(tokenizer, t)
        row_of.append(unique.setdefault(tuple(pi + ti[:-1]), len(unique)))
        spans.append((len(pi) - 1, ti))
    rows = list(unique)
    readers: list[list[int]] = [[] for _ in rows]
    for i, r in enumerate(row_of):
        readers[r].append(i)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    out: list[float] = [0.0] * len(prompts)
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        ids, mask = right_padded([list(rows[r]) for r in batch], pad)
        h = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        for j, r in enumerate(batch):
            for i in readers[r]:
                start, ti = spans[i]
                logp = F.log_softmax(head(h[j, start:start + len(ti)]).float(), -1)
                out[i] = float(logp.gather(-1, torch.tensor(ti, device=device)[:, None]).mean())
    return out


def evaluate_edit(model, tokenizer, record: EvalRecord | dict[str, Any]) -> dict[str, float]:
    """Scores of the model as it is now on one record (call before and after an edit)."""
    return evaluate_edits(model, tokenizer, [record])[0]


def _pairs(rec: EvalRecord) -> tuple[list[tuple[str, list[str]]], list[str], list[str]]:
    """A record's score groups and its (prompt, target) pairs: new then true for each prompt."""
    new, true = rec.target_new, rec.target_true
    if not true:
        raise WeightsmithError(f"record {rec.subject!r}: no true target to compare with")
    # The neighbourhood prompts' true answer may differ from the edited fact's.
    ntrue = rec.neighborhood_true or true
    groups = [("efficacy", [rec.text]), ("paraphrase", rec.paraphrases), ("neighborhood", rec.neighborhood)]
    prompts, targets = [], []
    for name, ps in groups:
        for p in ps:
            prompts += [p, p]
            targets += [new, ntrue if name == "neighborhood" else true]
    return groups, prompts, targets


def _scores(groups: list[tuple[str, list[str]]], lps: list[float]) -> dict[str, float]:
    scores: dict[str, float] = {}
    i = 0
    for name, ps in groups:
        if not ps:
            continue
        wins, mags = [], []
        for _ in ps:
            lp_new, lp_true = lps[i], lps[i + 1]
            i += 2
            if name == "neighborhood":
                wins.append(float(lp_true > lp_new))
                mags.append(math.exp(lp_true) - math.exp(lp_new))
            else:
                wins.append(float(lp_new > lp_true))
                mags.append(math.exp(lp_new) - math.exp(lp_true))
        scores[name] = sum(wins) / len(wins)
        scores[f"{name}_magnitude"] = sum(mags) / len(mags)
    return scores


def evaluate_edits(model, tokenizer, records: list[EvalRecord | dict[str, Any]]) -> list[dict[str, float]]:
    """:func:`evaluate_edit` for many records, their prompts scored together in length-sorted batches."""
    parsed = [parse_record(r) if isinstance(r, dict) else r for r in records]
    per = [_pairs(r) for r in parsed]
    lps = target_logprobs(model, tokenizer, [p for _, ps, _ in per for p in ps], [t for _, _, ts in per for t in ts])
    out, at = [], 0
    for groups, ps, _ in per:
        out.append(_scores(groups, lps[at:at + len(ps)]))
        at += len(ps)
    return out


def harmonic_mean(values: list[float]) -> float:
    if not values or any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def aggregate(per_record: list[dict[str, float]]) -> dict[str, Any]:
    """Mean of each score over records (records lacking a score are skipped for it) and the harmonic mean."""
    out: dict[str, Any] = {"n": len(per_record)}
    for key in ("efficacy", "paraphrase", "neighborhood", "efficacy_magnitude", "paraphrase_magnitude",
                "neighborhood_magnitude", *GENERATION_KEYS):
        vals = [r[key] for r in per_record if key in r]
        out[key] = round(sum(vals) / len(vals), 4) if vals else None
    for key in GENERATION_KEYS:  # only when generation checks ran
        if out[key] is None:
            del out[key]
    out["score"] = round(harmonic_mean([out[k] for k in ("efficacy", "paraphrase", "neighborhood")
                                        if out[k] is not None]), 4)
    return out


def scores_now(model, tokenizer, record: EvalRecord, generation: GenerationConfig | None = None) -> dict[str, float]:
    """Teacher-forced scores, plus the generation checks when ``generation`` is given."""
    out = evaluate_edit(model, tokenizer, record)
    if generation is not None:
        out.update(generation_scores(model, tokenizer, record, generation))
    return out


def run_eval(session, records: list[EvalRecord], *, layer: int | None = None,
             progress: Callable[[float, str], None] | None = None,
             generation: GenerationConfig | None = None, job: Job | None = None) -> dict[str, Any]:
    """Edit each record on fresh weights (undo between records) and score it; with the unedited baseline.

    Returns ``{"n", "efficacy", "paraphrase", "neighborhood", "score", ..., "seconds_per_edit",
    "baseline": {...}}``; with ``generation``, also gen_efficacy / gen_paraphrase /
    gen_neighborhood / fluency (:mod:`editing.generation_checks`). Reports through ``job``
    (``progress`` is the older ``(fraction, text)`` callback); a cancel stops it between steps.
    """
    job = job if job is not None else Job(listener=progress)
    model, tok = session.model, session.tokenizer
    # The unedited scores come first and take about as long as scoring after the edits: a fifth of the bar.
    scoring = job.part(0.0, 0.2)
    baseline = []
    for i, r in enumerate(records):
        scoring.check("the evaluation")
        scoring.step(i, len(records), f"scoring the unedited model on record {i + 1}/{len(records)}")
        baseline.append(scores_now(model, tok, r, generation))
    edited, seconds = [], []
    for i, rec in enumerate(records):
        part = job.part(0.2 + 0.8 * i / len(records), 0.2 + 0.8 * (i + 1) / len(records))
        part.progress(0.0, f"editing record {i + 1}/{len(records)}")
        t0 = time.time()
        edit = session.apply(rec.request(layer), job=part)
        seconds.append(time.time() - t0)
        try:
            edited.append(scores_now(model, tok, rec, generation))
        finally:
            session.undo(edit.id)
    out = aggregate(edited)
    out["seconds_per_edit"] = round(sum(seconds) / max(1, len(seconds)), 3)
    out["baseline"] = aggregate(baseline)
    return out
