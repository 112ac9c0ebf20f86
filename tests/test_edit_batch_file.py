"""Edit files (CSV, JSON) and the CLI's ``edit --batch``; the scores of one typed-in fact (editing.fact_scores)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints.errors import WeightsmithError  # noqa: E402
from editing.batch_file import load_edit_records, load_edit_requests  # noqa: E402

CSV = ("prompt,subject,target_new,ground_truth\n"
       "{} is located in the city of,The Eiffel Tower,Rome,Paris\n"
       "The capital of {} is,Germany,Madrid,Berlin\n")


def test_csv_and_json_edit_files(tmp_path):
    csv_file = tmp_path / "edits.csv"
    csv_file.write_text("prompt,subject,target_new,ground_truth\n{} is located in,The Eiffel Tower,Rome,Paris\n"
                        "The capital of Germany is,Germany,Madrid,Berlin\n")
    reqs = load_edit_requests(csv_file)
    assert [(q.subject, q.target) for q in reqs] == [("The Eiffel Tower", "Rome"), ("Germany", "Madrid")]
    assert [r.target_true for r in load_edit_records(csv_file)] == ["Paris", "Berlin"]
    assert len(load_edit_records(csv_file, limit=1)) == 1
    js = tmp_path / "edits.json"
    js.write_text('[{"requested_rewrite": {"prompt": "{} plays", "subject": "Messi", '
                  '"target_new": {"str": "tennis"}, "target_true": {"str": "football"}}}]')
    assert load_edit_requests(js)[0].target == "tennis"
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,subject\nx,y\n")
    with pytest.raises(WeightsmithError, match="missing field"):
        load_edit_requests(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt,subject,target_new,ground_truth\n,,,\n")
    with pytest.raises(WeightsmithError, match="no edit rows"):
        load_edit_requests(empty)
    # A row with more cells than the header: the extra cell is dropped, not a crash.
    wide = tmp_path / "wide.csv"
    wide.write_text("prompt,subject,target_new\n{} is in,Paris,Rome,extra\n")
    assert load_edit_requests(wide)[0].target == "Rome"
    latin = tmp_path / "latin.csv"
    latin.write_bytes("prompt,subject,target_new\n{} is in,Z\xfcrich,Rome\n".encode("latin-1"))
    with pytest.raises(WeightsmithError, match="latin.csv"):
        load_edit_requests(latin)


@pytest.fixture
def corpus(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    words = ["the", "city", "tower", "river", "king", "music", "paris", "rome", "game", "team", "north", "old"]
    idx = torch.randint(len(words), (2000,), generator=g).tolist()
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(words[i] for i in idx[j:j + 20]) for j in range(0, 2000, 20)))
    return path


def test_cli_edit_batch_matches_the_library(tiny_llama_dir, corpus, tmp_path, monkeypatch, capsys):
    """``weightsmith edit --batch edits.csv`` writes what EditSession.apply_batch makes of the same file."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cli import main
    from editing.session import EditSession

    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    edits = tmp_path / "edits.csv"
    edits.write_text(CSV)
    out = tmp_path / "edited"
    stats = ["--stats-corpus", str(corpus), "--stats-tokens", "1000"]
    code = main(["edit", str(tiny_llama_dir), "--batch", str(edits), "--out", str(out), *stats])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "edited 2 facts (memit)" in captured.out
    written = load_file(str(out / "model.safetensors"))

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    session = EditSession(model, AutoTokenizer.from_pretrained(str(tiny_llama_dir)), corpus=str(corpus),
                          stats_tokens=1000)
    edit = session.apply_batch(load_edit_requests(edits))
    assert edit.method == "memit" and len(edit.requests) == 2
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
    assert changed  # non-vacuous: the batch moved weights
    for name in changed:
        assert torch.equal(written[name], model.state_dict()[name]), name
    # One line, exit 2 and nothing written for a mixed-up command line or a bad file.
    for argv, message in ((["--batch", str(edits), "--prompt", "{} is"], "drop --prompt"),
                          (["--batch", str(edits), "--layer", "1"], "drop --layer"),
                          (["--subject", "x"], "needs --prompt, --target"),
                          (["--batch", str(tmp_path / "none.csv")], "none.csv")):
        code = main(["edit", str(tiny_llama_dir), *argv, "--out", str(tmp_path / "x"), *stats])
        assert code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_fact_scores_add_the_harmonic_mean_and_the_generation_checks(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editing.evaluate import evaluate_edit
    from editing.fact_scores import fact_scores
    from editing.generation_checks import GenerationConfig, generation_scores

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    record = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
              "ground_truth": "Paris", "rephrase_prompt": ["The Eiffel Tower is in the city of"],
              "locality_prompt": ["The Louvre is located in the city of"]}
    gen = GenerationConfig(answer_tokens=4, fluency_tokens=8)
    scores = fact_scores(model, tok, record, generation=gen)
    plain = evaluate_edit(model, tok, record)
    e, p, n = plain["efficacy"], plain["paraphrase"], plain["neighborhood"]
    expected = 0.0 if 0 in (e, p, n) else 3 / (1 / e + 1 / p + 1 / n)
    assert scores["score"] == pytest.approx(expected)
    assert {k: scores[k] for k in plain} == plain
    assert {k: v for k, v in scores.items() if k.startswith(("gen_", "fluency"))} == \
        generation_scores(model, tok, record, gen)
    # Without neighbours there is no harmonic mean; without generation no generation checks.
    no_n = fact_scores(model, tok, {**record, "locality_prompt": []}, generation=None)
    assert "score" not in no_n and "neighborhood" not in no_n and not any(k.startswith("gen_") for k in no_n)
