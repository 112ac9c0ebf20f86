"""evaluation: log-likelihood multiple choice as lm-eval scores it, perplexity, greedy answers, the cache.

Expected numbers are computed here by hand: from the tiny model's own logits on one unpadded
sequence per choice (the library scores padded batches), or from the bigram model's formulas.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigram_model import bigram_model  # noqa: E402
from conftest import build_tiny_llama  # noqa: E402

from checkpoints.jobs import Cancelled, Job  # noqa: E402
from evaluation import EvalModel, EvalSettings, evaluate_models  # noqa: E402
from evaluation.cache import EvalCache  # noqa: E402
from evaluation.run import model_in_memory  # noqa: E402
from evaluation.scoring import choice_metrics, greedy_answers, loglikelihoods  # noqa: E402
from evaluation.tasks import ChoiceItem, load_task  # noqa: E402

QUERY = "The capital of France is"
CHOICES = ["Paris", "Rome", "Berlin", "Eiffel Tower"]


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return build_tiny_llama(3)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@torch.no_grad()
def by_hand(model, tok, query: str, choice: str) -> float:
    """Sum of log P(continuation token) from one forward pass over the unpadded text."""
    ctx = tok(query, add_special_tokens=False)["input_ids"]
    whole = tok(query + " " + choice, add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([whole])).logits[0]
    logp = F.log_softmax(logits.float(), -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_choice_accuracy_matches_the_models_own_logits(tiny, tiny_tokenizer, tmp_path):
    queries = [QUERY, "The Eiffel Tower is located in", "The capital of Germany is"]
    hand = [[by_hand(tiny, tiny_tokenizer, q, c) for c in CHOICES] for q in queries]
    # Non-vacuous: the choices' scores differ, so the argmax is a real decision.
    assert all(max(h) - min(h) > 1e-3 for h in hand)
    best = [max(range(4), key=h.__getitem__) for h in hand]
    worst = [min(range(4), key=h.__getitem__) for h in hand]
    gold = [best[0], best[1], worst[2]]  # two right, one wrong: acc is 2/3 only if the argmax is the hand one
    task = write_jsonl(tmp_path / "mc.jsonl", [{"query": q, "choices": CHOICES, "gold": g}
                                               for q, g in zip(queries, gold)])
    lls = loglikelihoods(tiny, tiny_tokenizer, [(q, " " + c) for q in queries for c in CHOICES], batch_size=5)
    assert [ll for ll, _ in lls] == pytest.approx([x for h in hand for x in h], abs=1e-4)
    result = evaluate_models([model_in_memory("tiny", tiny, tiny_tokenizer)], [task], cache=None)
    score = result.scores[0]
    assert (score.kind, score.n) == ("choice", 3)
    assert score.metrics["acc"] == pytest.approx(2 / 3)


ROWS = {"Ġis": {"ĠRome": 3.0, "ĠEiffel": 2.0}, "ĠEiffel": {"ĠTower": 4.0},
        "Ġof": {"ĠRome": math.log(3)}, "ĠRome": {"Ġof": math.log(2)}}


@pytest.fixture(scope="module")
def bigram(tiny_tokenizer):
    return bigram_model(tiny_tokenizer, ROWS)


def test_acc_norm_divides_by_characters_as_lm_eval(bigram, tiny_tokenizer):
    # After "is": logits 3 (Rome), 2 (Eiffel), 0 for the 62 others; after "Eiffel": 4 (Tower), 0 for 63.
    z_is = 62 + math.exp(3) + math.exp(2)
    z_eiffel = 63 + math.exp(4)
    ll_rome = 3 - math.log(z_is)
    ll_tower = (2 - math.log(z_is)) + (4 - math.log(z_eiffel))
    lls = loglikelihoods(bigram, tiny_tokenizer, [(QUERY, " Rome"), (QUERY, " Eiffel Tower")])
    assert [ll for ll, _ in lls] == pytest.approx([ll_rome, ll_tower], abs=1e-4)
    assert [g for _, g in lls] == [True, False]  # Rome is the greedy token; Eiffel is not
    # Raw sums prefer Rome; per character (4 vs 12, the space not counted) "Eiffel Tower" wins.
    assert ll_rome > ll_tower and ll_rome / 4 < ll_tower / 12
    item = ChoiceItem(QUERY, ("Rome", "Eiffel Tower"), gold=1)
    assert choice_metrics(item, [ll for ll, _ in lls]) == {"acc": 0.0, "acc_norm": 1.0}
    # By tokens (1 vs 2) the answer would differ: the length really is in characters.
    assert ll_rome / 1 > ll_tower / 2


def test_perplexity_task_on_the_bigram_model(bigram, tiny_tokenizer, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" of Rome of Rome of", encoding="utf-8")
    settings = EvalSettings(seq_len=8)
    result = evaluate_models([model_in_memory("bigram", bigram, tiny_tokenizer)], [text], settings=settings,
                             cache=None)
    score = result.scores[0]
    # One window, four predictions: Rome|of = 3/66 twice, of|Rome = 2/65 twice.
    assert score.n == 4
    assert score.metrics["perplexity"] == pytest.approx(1 / math.sqrt(3 / 66 * 2 / 65), rel=1e-5)
    # Windows of 2 tokens: only Rome|of is predicted (twice); the lone last token is context.
    short = evaluate_models([model_in_memory("bigram", bigram, tiny_tokenizer)], [text],
                            settings=EvalSettings(seq_len=2), cache=None).scores[0]
    assert (short.n, short.metrics["perplexity"]) == (2, pytest.approx(66 / 3, rel=1e-5))


def test_batched_greedy_answers_equal_one_by_one(tiny, tiny_tokenizer):
    prompts = ["The capital of France is", "The Eiffel Tower", "Berlin", "The city of Rome is located in"]
    batched = greedy_answers(tiny, tiny_tokenizer, prompts, max_new_tokens=4, chat=False, batch_size=4)
    single = []
    for p in prompts:
        ids = tiny_tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = tiny.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                            pad_token_id=tiny_tokenizer.pad_token_id)
        single.append(tiny_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert batched == single
    assert len(set(single)) > 1  # different prompts, different answers: the padding did not flatten them


def test_cache_hit_and_miss(tiny_llama_family, tmp_path, tiny_tokenizer):
    cache = EvalCache(tmp_path / "cache")
    task = write_jsonl(tmp_path / "mc.jsonl", [{"query": QUERY, "choices": CHOICES, "gold": 0},
                                               {"query": "The Eiffel Tower is in", "choices": CHOICES, "gold": 1}])
    base = str(tiny_llama_family["base"])
    first = evaluate_models([base], [task], cache=cache)
    assert [s.cached for s in first.scores] == [False]
    loads = []
    from evaluation.run import model_from_ref

    spec = model_from_ref(base, cache=cache)
    counted = EvalModel(base, spec.digest, lambda: loads.append(1) or spec.load())
    job = Job.recording()
    again = evaluate_models([counted], [task], cache=cache, job=job)
    assert again.scores[0].cached and again.scores[0].metrics == first.scores[0].metrics
    assert loads == [] and any("from the cache" in m for m in job.messages)  # never loaded
    # The same files in another folder are the same model: a hit by content, not by path.
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    assert evaluate_models([str(copy)], [task], cache=cache).scores[0].cached
    # Another model, a setting that matters, or an edited task file: misses.
    assert not evaluate_models([str(tiny_llama_family["ft1"])], [task], cache=cache).scores[0].cached
    assert not evaluate_models([base], [task], cache=cache, settings=EvalSettings(limit=1)).scores[0].cached
    assert evaluate_models([base], [task], cache=cache, settings=EvalSettings(batch_size=3)).scores[0].cached
    task.write_text(task.read_text().replace('"gold": 1', '"gold": 2'), encoding="utf-8")
    assert not evaluate_models([base], [task], cache=cache).scores[0].cached


def test_progress_is_monotone_and_cancel_stops(tiny, tiny_tokenizer):
    job = Job.recording()
    evaluate_models([model_in_memory("a", tiny, tiny_tokenizer)], ["capitals-mc"], cache=None, job=job,
                    settings=EvalSettings(limit=6, batch_size=4))
    fractions = [f for f, _ in job.events if f is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 4
    cancelled = Job.recording()

    def stop_on_second_batch(fraction, text):
        if text.startswith("scoring choices 5/"):
            cancelled.cancel()

    cancelled.listener = stop_on_second_batch
    with pytest.raises(Cancelled):
        evaluate_models([model_in_memory("a", tiny, tiny_tokenizer)], ["capitals-mc"], cache=None, job=cancelled,
                        settings=EvalSettings(limit=6, batch_size=4))
    assert not any(t == "evaluation done" for _, t in cancelled.events)


def test_several_models_side_by_side(tiny, tiny_tokenizer):
    other = build_tiny_llama(4)
    result = evaluate_models([model_in_memory("a", tiny, tiny_tokenizer), model_in_memory("b", other, tiny_tokenizer)],
                             ["capitals-mc", "wikitext-excerpt"], settings=EvalSettings(limit=4, max_tokens=64),
                             cache=None)
    headers, rows = result.pivot()
    assert headers == ["task", "metric", "a", "b"]
    assert [r[:2] for r in rows] == [["capitals-mc", "acc"], ["capitals-mc", "acc_norm"],
                                     ["wikitext-excerpt", "perplexity"]]
    ppl = rows[2][2:]
    assert ppl[0] != ppl[1] and all(p > 1 for p in ppl)  # two models, two perplexities
    assert load_task("capitals-mc").kind == "choice"
