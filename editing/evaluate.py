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

from .generation_checks import GenerationConfig, generation_scores
from .records import EvalRecord, load_records, parse_record  # noqa: F401  (part of this module's API)
from .request import pad_id, prompt_ids, target_ids

GENERATION_KEYS = ("gen_efficacy", "gen_paraphrase", "gen_neighborhood", "fluency")

@torch.no_grad()
def target_logprobs(model, tokenizer, prompts: list[str], targets: list[str], *, batch_size: int = 16) -> list[float]:
    """Per-token mean log-prob of ``" " + target`` after each prompt (pairs)."""
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    out: list[float] = []
    pad = pad_id(tokenizer)
    for s in range(0, len(prompts), batch_size):
        rows, spans = [], []
        for p, t in zip(prompts[s:s + batch_size], targets[s:s + batch_size]):
            pi, ti = prompt_ids(tokenizer, p), target_ids(tokenizer, t)
            rows.append(pi + ti[:-1])
            spans.append((len(pi) - 1, ti))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        h = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        for i, (start, ti) in enumerate(spans):
            logp = F.log_softmax(head(h[i, start:start + len(ti)]).float(), -1)
            out.append(float(logp.gather(-1, torch.tensor(ti, device=device)[:, None]).mean()))
    return out


def evaluate_edit(model, tokenizer, record: EvalRecord | dict[str, Any]) -> dict[str, float]:
    """Scores of the model as it is now on one record (call before and after an edit)."""
    rec = parse_record(record) if isinstance(record, dict) else record
    new, true = rec.target_new, rec.target_true
    if not true:
        raise WeightsmithError(f"record {rec.subject!r}: no true target to compare with")
    ntrue = rec.neighborhood_true or true
    groups = [("efficacy", [rec.text]), ("paraphrase", rec.paraphrases), ("neighborhood", rec.neighborhood)]
    prompts, targets = [], []
    for _, ps in groups:
        for p in ps:
            prompts += [p, p]
        targets += [t for _ in ps for t in (new, true)]
    # The neighbourhood prompts' true answer may differ from the edited fact's.
    k = 2 * (1 + len(rec.paraphrases))
    for j in range(len(rec.neighborhood)):
        targets[k + 2 * j + 1] = ntrue
    lps = target_logprobs(model, tokenizer, prompts, targets)
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


@torch.no_grad()
def perplexity(model, token_ids: list[int], *, seq_len: int = 256, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over ``token_ids`` cut into consecutive windows of ``seq_len``.

    Windows do not overlap; each window's first token is context only, so
    ``len(token_ids) - windows`` tokens are predicted.
    """
    if len(token_ids) < 2:
        raise WeightsmithError("perplexity needs at least two tokens")
    device = next(model.parameters()).device
    windows = [token_ids[i:i + seq_len] for i in range(0, len(token_ids), seq_len)]
    windows = [w for w in windows if len(w) > 1]
    nll, count = 0.0, 0
    for s in range(0, len(windows), batch_size):
        group = windows[s:s + batch_size]
        width = max(len(w) for w in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, w in enumerate(group):
            ids[i, :len(w)] = torch.tensor(w)
            mask[i, :len(w)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).to(device)
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return math.exp(nll / count)
