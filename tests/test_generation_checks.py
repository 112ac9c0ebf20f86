"""Checks by generation: n-gram entropy by hand, answer matching, and greedy checks on a bigram model we control."""

from __future__ import annotations

import math

import pytest
import torch

from editing.evaluate import EvalRecord
from editing.generation_checks import (GenerationConfig, fluency_on, generation_scores, greedy_continuations,
                                       mean_ngram_entropy, mentions, ngram_entropy, words)
from bigram_model import bigram_fixture, bigram_model

# Greedy chains of this bigram model: "of" -> Rome -> is -> Paris -> is -> Paris ...;
# "in" -> Paris -> is -> ...; "city" -> Rome -> ...; "a" -> Rome -> is -> Paris -> ...
ROWS = {
    "Ġof": {"ĠRome": math.log(3)},
    "ĠRome": {"Ġis": math.log(2)},
    "Ġis": {"ĠParis": math.log(4)},
    "ĠParis": {"Ġis": math.log(2)},
    "Ġin": {"ĠParis": math.log(2)},
    "Ġcity": {"ĠRome": math.log(5)},
    "Ġa": {"ĠRome": math.log(2)},
}
REC = EvalRecord("The {} is located in the city of", "Eiffel Tower", "Rome", "Paris",
                 paraphrases=["The Eiffel Tower is in", "The Eiffel Tower is a tower in the city"],
                 neighborhood=["The capital of France is", "France is a"])


model = bigram_fixture(ROWS)


def test_ngram_entropy_by_hand():
    # "a b a b a": bigrams {ab: 2, ba: 2} -> H2 = 1 bit; trigrams {aba: 2, bab: 1} -> H3 = h(1/3) = 0.918296;
    # ROME's weighting: mean(2/3 H2, 4/3 H3) = (1 + 2 * 0.918296) / 3 = 0.945531.
    assert ngram_entropy("a b a b a") == pytest.approx(0.945531, abs=1e-6)
    assert ngram_entropy("x y z") == pytest.approx(1 / 3)  # H2 = 1, H3 = 0
    # "a b c d e": 4 distinct bigrams (2 bits), 3 distinct trigrams (log2 3): (2 + 2 log2 3) / 3.
    assert ngram_entropy("a b c d e") == pytest.approx((2 + 2 * math.log2(3)) / 3)
    # Repetition scores 0; too short a text has no n-grams.
    assert ngram_entropy("a a a a") == 0.0 and ngram_entropy("one") == 0.0 and ngram_entropy("") == 0.0
    # Non-vacuity: the unweighted mean (H2 + H3) / 2 would give 0.959148, not 0.945531.
    assert abs(ngram_entropy("a b a b a") - (1 + 0.918296) / 2) > 0.01
    assert mean_ngram_entropy(["a b a b a", "a a a a"]) == pytest.approx(0.945531 / 2, abs=1e-6)
    assert mean_ngram_entropy([]) == 0.0


def test_words_split_punctuation():
    assert words("Paris, the city.") == ["Paris", ",", "the", "city", "."]
    # Punctuation counts as words: "x, x, x" is the 5-word "a b a b a" pattern (0.945531 by hand above);
    # without the commas it would be "x x x" (0 bits).
    assert ngram_entropy("x, x, x") == pytest.approx(0.945531, abs=1e-6)
    assert ngram_entropy("x x x") == 0.0


def test_mentions_whole_word_case_insensitive():
    assert mentions(" rome is nice", "Rome")
    assert mentions("in ROME.", "Rome")
    assert not mentions(" Romeo and Juliet", "Rome")
    assert not mentions(" Jerome", "Rome")
    assert mentions("New   York City", "New York")
    assert not mentions("a New Yorker", "New York")
    assert mentions("C++ rocks", "C++")
    assert mentions("São Paulo.", "são paulo")
    assert not mentions("", "Rome") and not mentions("Rome", "  ")


def test_greedy_chain_of_the_bigram_model(model, tiny_tokenizer):
    rows = greedy_continuations(model, tiny_tokenizer, [REC.text, "France is a"], 5)
    assert [tiny_tokenizer.decode(r) for r in rows] == [" Rome is Paris is Paris", " Rome is Paris is Paris"]
    rows = greedy_continuations(model, tiny_tokenizer, ["The Eiffel Tower is in"], 3)
    assert tiny_tokenizer.decode(rows[0]) == " Paris is Paris"


def test_generation_scores_by_hand(model, tiny_tokenizer):
    texts: dict = {}
    cfg = GenerationConfig(answer_tokens=20, fluency_tokens=6)
    s = generation_scores(model, tiny_tokenizer, REC, cfg, texts=texts)
    assert s["gen_efficacy"] == 1.0  # " Rome is Paris ..."
    assert s["gen_paraphrase"] == 0.5  # "in" -> " Paris is ...", "city" -> " Rome is ..."
    assert s["gen_neighborhood"] == 1.0  # both neighbours write "Paris" within 20 tokens
    assert texts["gen_paraphrase"][0].startswith(" Paris is Paris")
    expected = mean_ngram_entropy([REC.text + " Rome is Paris is Paris is",
                                   "The Eiffel Tower is in Paris is Paris is Paris is",
                                   "The Eiffel Tower is a tower in the city Rome is Paris is Paris is"])
    assert s["fluency"] == pytest.approx(expected)
    # Non-vacuity: the answer window matters. With 2 answer tokens, "France is a" writes " Rome is":
    # its true answer Paris is not there yet.
    s2 = generation_scores(model, tiny_tokenizer, REC, GenerationConfig(answer_tokens=2, fluency_tokens=6))
    assert s2["gen_neighborhood"] == 0.5 and s2["gen_efficacy"] == 1.0


def test_generation_efficacy_follows_the_model(tiny_tokenizer):
    # The same record on a model that answers "Paris" after "of": efficacy by generation is 0.
    m = bigram_model(tiny_tokenizer, {**ROWS, "Ġof": {"ĠParis": math.log(3)}})
    s = generation_scores(m, tiny_tokenizer, REC, GenerationConfig(answer_tokens=20, fluency_tokens=6))
    assert s["gen_efficacy"] == 0.0 and s["gen_paraphrase"] == 0.5


def test_fluency_on_fixed_prompts(model, tiny_tokenizer):
    f = fluency_on(model, tiny_tokenizer, ["France is a", "The Eiffel Tower is in"], GenerationConfig(fluency_tokens=4))
    assert f == pytest.approx(mean_ngram_entropy(["France is a Rome is Paris is", "The Eiffel Tower is in Paris is Paris is"]))


def test_batched_generation_equals_one_at_a_time(tiny_tokenizer):
    # Left padding must not change what a prompt generates (positions and masks come from the padding).
    from conftest import build_tiny_llama

    m = build_tiny_llama(3)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(10.0)  # sharp logits: no near-ties for padding noise to flip
    prompts = ["The Eiffel Tower is located in the city of", "Berlin is", "The capital of France is Paris . Rome"]
    together = greedy_continuations(m, tiny_tokenizer, prompts, 8)
    alone = [greedy_continuations(m, tiny_tokenizer, [p], 8)[0] for p in prompts]
    assert together == alone
    assert len({tuple(r) for r in alone}) > 1  # non-vacuity: the prompts generate different text


def test_cli_eval_edits_reports_generation_checks(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import json

    from cli import main

    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the capital of France is Paris . Rome is in Italy . Berlin is in Germany ."] * 60))
    records = tmp_path / "recs.json"
    records.write_text(json.dumps([{"prompt": "The {} is located in the city of", "subject": "Eiffel Tower",
                                    "target_new": "Rome", "ground_truth": "Paris",
                                    "rephrase_prompt": "The Eiffel Tower is in", "locality_prompt": "Berlin is in",
                                    "locality_ground_truth": "Germany"}]))
    args = ["eval-edits", str(tiny_llama_dir), str(records), "--layer", "1", "--stats-corpus", str(corpus), "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    keys = {"gen_efficacy", "gen_paraphrase", "gen_neighborhood", "fluency"}
    assert keys <= set(result) and keys <= set(result["baseline"])
    assert all(0.0 <= result[k] <= 1.0 for k in keys - {"fluency"}) and result["fluency"] >= 0.0
    assert main(args + ["--no-generation"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert not keys & set(result) and not keys & set(result["baseline"])
