"""CounterFact scores (ES/PS/NS, magnitudes, harmonic mean) against hand-computed values.

The model is an exact bigram model (tests/bigram_model.py): the next-token
distribution after a prompt depends only on the prompt's last token, with
logits we choose, so every probability is a fraction we can write down.
Vocabulary of 64 tokens: with logits ln(a) on one token, ln(b) on another and
0 elsewhere, P = a / (a + b + 62).
"""

from __future__ import annotations

import math

import pytest

from editing.evaluate import (EvalRecord, aggregate, evaluate_edit, evaluate_edits, harmonic_mean, perplexity,
                              target_logprobs)
from bigram_model import bigram_fixture, bigram_model

PROMPT = "The {} is located in the city of"  # last token "Ġof"
REC = EvalRecord(PROMPT, "Eiffel Tower", "Rome", "Paris",
                 paraphrases=["The Eiffel Tower is in", "The Eiffel Tower is a tower in the city"],  # "Ġin", "Ġcity"
                 neighborhood=["The capital of France is", "France is a"])  # "Ġis", "Ġa"

ROWS = {
    "Ġof": {"ĠRome": math.log(3)},  # P(Rome) 3/66, P(Paris) 1/66: new wins
    "Ġin": {"ĠParis": math.log(2)},  # P(Rome) 1/65, P(Paris) 2/65: true wins
    "Ġcity": {"ĠRome": math.log(5)},  # 5/68 vs 1/68: new wins
    "Ġis": {"ĠParis": math.log(4)},  # neighbour: P(Paris) 4/67 vs P(Rome) 1/67: true wins
    "Ġa": {"ĠRome": math.log(2)},  # neighbour: P(Rome) 2/65 vs P(Paris) 1/65: new wins
    "ĠEiffel": {"ĠTower": math.log(7)},  # P(Tower | Eiffel) = 7/70
    "ĠRome": {"Ġof": math.log(2)},  # P(of | Rome) = 2/65 (perplexity test)
}


model = bigram_fixture(ROWS)


def test_bigram_model_probabilities_are_the_chosen_ones(model, tiny_tokenizer):
    # The testbed itself: log P(" Rome" | "... of") = ln(3/66); P(" Paris" | "... in") = 2/65.
    lp = target_logprobs(model, tiny_tokenizer, [REC.text, "The Eiffel Tower is in"], ["Rome", "Paris"])
    assert lp == pytest.approx([math.log(3 / 66), math.log(2 / 65)], abs=1e-5)


def test_target_probability_is_the_per_token_mean(model, tiny_tokenizer):
    # " Eiffel Tower" is two tokens: exp(mean log p) = sqrt(P(Eiffel|of) · P(Tower|Eiffel)) = sqrt(1/66 · 7/70).
    lp = target_logprobs(model, tiny_tokenizer, [REC.text], ["Eiffel Tower"])[0]
    assert lp == pytest.approx((math.log(1 / 66) + math.log(7 / 70)) / 2, abs=1e-5)
    # Non-vacuity: the sum of the log-probs (no mean) is a different number.
    assert abs(lp - (math.log(1 / 66) + math.log(7 / 70))) > 1.0


def test_scores_match_hand_computation(model, tiny_tokenizer):
    s = evaluate_edit(model, tiny_tokenizer, REC)
    assert s["efficacy"] == 1.0
    assert s["efficacy_magnitude"] == pytest.approx(3 / 66 - 1 / 66, abs=1e-6)
    assert s["paraphrase"] == 0.5  # "in" loses, "city" wins
    assert s["paraphrase_magnitude"] == pytest.approx(((1 / 65 - 2 / 65) + (5 / 68 - 1 / 68)) / 2, abs=1e-6)
    assert s["neighborhood"] == 0.5  # "is" keeps Paris, "a" moves to Rome
    assert s["neighborhood_magnitude"] == pytest.approx(((4 / 67 - 1 / 67) + (1 / 65 - 2 / 65)) / 2, abs=1e-6)


def test_neighbourhood_uses_its_own_true_answer(model, tiny_tokenizer):
    # With "Rome" as the neighbours' true answer, NS compares P(Rome) > P(Rome): never a win.
    rec = EvalRecord(PROMPT, "Eiffel Tower", "Rome", "Paris", neighborhood=["The capital of France is"],
                     neighborhood_true="Rome")
    assert evaluate_edit(model, tiny_tokenizer, rec)["neighborhood"] == 0.0
    # Non-vacuity: with the default (the record's true answer, Paris) the same prompt wins.
    rec.neighborhood_true = None
    assert evaluate_edit(model, tiny_tokenizer, rec)["neighborhood"] == 1.0


def test_many_records_scored_together_equal_each_scored_alone(model, tiny_tokenizer):
    # evaluate_edits batches every record's prompts by length; each record keeps its own scores and order.
    other = EvalRecord(PROMPT, "Eiffel Tower", "Paris", "Rome", paraphrases=["The Eiffel Tower is in"],
                       neighborhood=["France is a"])  # the roles swapped: different scores
    recs = [REC, other, REC, other]
    together = evaluate_edits(model, tiny_tokenizer, recs)
    alone = [evaluate_edit(model, tiny_tokenizer, r) for r in recs]
    assert [sorted(t) for t in together] == [sorted(a) for a in alone]
    assert all(t[k] == pytest.approx(a[k], abs=1e-6) for t, a in zip(together, alone) for k in a)
    # Non-vacuity: the two records really score differently, so a mix-up of rows would show.
    assert together[0]["efficacy"] == 1.0 and together[1]["efficacy"] == 0.0
    assert together[0]["paraphrase"] != together[1]["paraphrase"]


def test_efficacy_flips_when_the_new_target_loses(tiny_tokenizer):
    m = bigram_model(tiny_tokenizer, {**ROWS, "Ġof": {"ĠParis": math.log(3)}})
    s = evaluate_edit(m, tiny_tokenizer, REC)
    assert s["efficacy"] == 0.0
    assert s["efficacy_magnitude"] == pytest.approx(1 / 66 - 3 / 66, abs=1e-6)


def test_harmonic_mean_and_aggregate():
    assert harmonic_mean([1.0, 0.5, 0.5]) == pytest.approx(3 / (1 + 2 + 2))  # 0.6
    assert harmonic_mean([1.0, 0.5, 0.0]) == 0.0
    assert harmonic_mean([]) == 0.0
    # Non-vacuity: not the arithmetic mean.
    assert harmonic_mean([1.0, 0.5, 0.5]) != pytest.approx(2 / 3)
    rows = [{"efficacy": 1.0, "paraphrase": 0.5, "neighborhood": 0.5, "efficacy_magnitude": 0.25},
            {"efficacy": 0.0, "paraphrase": 1.0, "neighborhood": 1.0, "efficacy_magnitude": -0.05}]
    agg = aggregate(rows)
    assert (agg["n"], agg["efficacy"], agg["paraphrase"], agg["neighborhood"]) == (2, 0.5, 0.75, 0.75)
    assert agg["efficacy_magnitude"] == pytest.approx(0.1)
    assert agg["paraphrase_magnitude"] is None  # no record has it
    assert agg["score"] == pytest.approx(round(3 / (2 + 4 / 3 + 4 / 3), 4))
    assert "gen_efficacy" not in agg and "fluency" not in agg  # generation keys only when measured
    agg = aggregate([{**rows[0], "gen_efficacy": 1.0, "fluency": 4.0}, {**rows[1], "gen_efficacy": 0.0}])
    assert (agg["gen_efficacy"], agg["fluency"]) == (0.5, 4.0)


def test_aggregate_of_evaluated_records(model, tiny_tokenizer):
    other = EvalRecord(PROMPT, "Eiffel Tower", "Paris", "Rome")  # swapped: efficacy 0 on the same prompt
    agg = aggregate([evaluate_edit(model, tiny_tokenizer, REC), evaluate_edit(model, tiny_tokenizer, other)])
    assert agg["efficacy"] == 0.5
    assert agg["efficacy_magnitude"] == pytest.approx(((3 / 66 - 1 / 66) + (1 / 66 - 3 / 66)) / 2, abs=1e-6)
    assert agg["paraphrase"] == 0.5 and agg["neighborhood"] == 0.5  # only REC has them
    assert agg["score"] == pytest.approx(0.5)


def test_perplexity_by_hand(model, tiny_tokenizer):
    of, rome = tiny_tokenizer.convert_tokens_to_ids(["Ġof", "ĠRome"])
    ids = [of, rome, of, rome, of]
    # One window: Rome|of, of|Rome, Rome|of, of|Rome -> exp(-mean log p) = 1 / sqrt(3/66 · 2/65).
    assert perplexity(model, ids, seq_len=8) == pytest.approx(1 / math.sqrt(3 / 66 * 2 / 65), rel=1e-5)
    # Windows of 2: [of Rome] [of Rome] [of]: only Rome|of is predicted (twice), the lone token is context.
    assert perplexity(model, ids, seq_len=2) == pytest.approx(66 / 3, rel=1e-5)


def test_pairs_with_the_same_row_share_one_forward_pass(model, tiny_tokenizer, monkeypatch):
    """A prompt scored against two one-token targets is one input row, run once; a two-token target needs
    its own row. The values are the hand-computed ones either way."""
    rows_run: list[int] = []
    forward = model.base_model.forward

    def counting(*args, **kwargs):
        rows_run.append(int(kwargs["input_ids"].shape[0]))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.base_model, "forward", counting)
    lp = target_logprobs(model, tiny_tokenizer, [REC.text, REC.text, REC.text], ["Rome", "Paris", "Eiffel Tower"])
    assert lp == pytest.approx([math.log(3 / 66), math.log(1 / 66),
                                (math.log(1 / 66) + math.log(7 / 70)) / 2], abs=1e-5)
    assert sum(rows_run) == 2  # three pairs, two distinct rows (the prompt; the prompt + " Eiffel")
