"""evaluation task files (bundled and bad ones), the answer and style scores, and ``weightsmith eval``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigram_model import bigram_model  # noqa: E402
from conftest import save_model  # noqa: E402

import cli  # noqa: E402
from checkpoints.errors import WeightsmithError  # noqa: E402
from evaluation import tasks as task_module  # noqa: E402
from evaluation.scoring import answer_metrics, encode_pair  # noqa: E402
from evaluation.style import caps_rate, pirate_rate, style_scores  # noqa: E402
from evaluation.tasks import bundled_tasks, load_task  # noqa: E402

GOOD = '{"query": "Q?", "choices": ["a", "b"], "gold": 1}\n'


def test_bundled_tasks_load_and_are_described():
    found = bundled_tasks()
    assert set(found) >= {"capitals-mc", "general-mc", "facts-gen", "style-prompts", "wikitext-excerpt"}
    kinds = {name: load_task(name).kind for name in found}
    assert kinds["capitals-mc"] == kinds["general-mc"] == "choice"
    assert (kinds["facts-gen"], kinds["style-prompts"], kinds["wikitext-excerpt"]) == ("generate", "style",
                                                                                        "perplexity")
    readme = (task_module.TASKS_DIR / "README.md").read_text(encoding="utf-8")
    for name, path in found.items():
        assert path.name in readme, f"{path.name}: source and licence not stated in assets/tasks/README.md"
    # Gold answers are spread over the positions (a model always picking the first choice scores low).
    golds = [it.gold for it in load_task("capitals-mc").items]
    assert len(set(golds)) == 4


BAD = [
    (b'{"query": "Q?", "choices": ["a", "b"], "gold": 2}\n', "line 1: 'gold' must be the index"),
    (GOOD.encode() + b'{"query": "Q?", "choices": ["a"], "gold": 0}\n', "line 2: 'choices' must be a list of 2"),
    (GOOD.encode() + b'{"prompt": "say hi"}\n', "line 2: a style item in a file of choice items"),
    (b'{"query": "Q?", "choices": ["a", "b"], "gold": true}\n', "'gold' must be the index"),
    (b'{"query": "", "choices": ["a", "b"], "gold": 0}\n', "'query' must be non-empty text"),
    (b'{"query": "Q?", "choices": ["a", "b"], "gold": 0, "answer": "x"}\n', "unknown field 'answer'"),
    (b'{"prompt": "Q?", "answers": []}\n', "'answers' is empty"),
    (b'{"prompt": "Q?", "answers": "Paris"}\n', "'answers' must be a list"),
    (b'[1, 2]\n', "expected a JSON object, not list"),
    (b'{"query": "Q?",\n', "line 1: not JSON"),
    (b'{"text": "hello"}\n', "neither a choice item"),
    (b'\n\n', "no items"),
    (b'[' * 50_00 + b']' * 50_00 + b'\n', "nested deeper than a task line"),
    (b'{"prompt": "' + b'x' * 30_000 + b'"}\n', "30,014 characters (at most 20,000 a line)"),
    (GOOD.encode() + b'{"query": "caf\xe9?", "choices": ["a", "b"], "gold": 0}\n', "not UTF-8 text (byte 0xe9"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_task_files_are_refused_with_one_line(tmp_path, data, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(data)
    with pytest.raises(WeightsmithError) as e:
        load_task(path)
    text = str(e.value)
    assert message in text and "\n" not in text and "bad.jsonl" in text


def test_a_good_file_of_the_same_shape_loads(tmp_path):
    (tmp_path / "ok.jsonl").write_text(GOOD * 3, encoding="utf-8")  # the BAD cases are one change away from this
    task = load_task(tmp_path / "ok.jsonl")
    assert (task.kind, len(task.items), task.items[0].gold) == ("choice", 3, 1)


def test_too_large_and_missing_task_files(tmp_path, monkeypatch):
    monkeypatch.setattr(task_module, "MAX_TASK_BYTES", 100)
    (tmp_path / "big.txt").write_text("word " * 40, encoding="utf-8")
    with pytest.raises(WeightsmithError, match="big.txt: larger than"):
        load_task(tmp_path / "big.txt")
    with pytest.raises(WeightsmithError, match="no such file, and not a bundled task"):
        load_task(tmp_path / "nope.jsonl")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(WeightsmithError, match="the text is empty"):
        load_task(tmp_path / "empty.txt")


def test_style_scores_by_hand():
    assert caps_rate(["HELLO there"]) == pytest.approx(5 / 10)
    assert caps_rate(["ABC", "d"]) == pytest.approx(3 / 4)  # pooled over answers, not averaged
    assert caps_rate(["123 !"]) == 0.0
    assert pirate_rate(["Arr, matey!", "Hello friend", "Ahoy there", "theyear"]) == pytest.approx(2 / 4)
    assert pirate_rate(["me be hearty"]) == 1.0 and pirate_rate(["me be"]) == 0.0  # plain English words do not count
    assert style_scores([]) == {"caps": 0.0, "pirate": 0.0}


def test_answer_metrics():
    assert answer_metrics("Paris.", ["Paris"]) == {"exact_match": 1.0, "contains": 1.0}
    assert answer_metrics("The capital of France is Paris.", ["Paris"]) == {"exact_match": 0.0, "contains": 1.0}
    assert answer_metrics("Parisian food", ["Paris"]) == {"exact_match": 0.0, "contains": 0.0}  # whole words
    assert answer_metrics("da Vinci\nmore text", ["Leonardo", "da Vinci"])["exact_match"] == 1.0
    assert answer_metrics("", ["x"]) == {"exact_match": 0.0, "contains": 0.0}


def test_pair_encoding_moves_the_contexts_trailing_space(tiny_tokenizer):
    a = encode_pair(tiny_tokenizer, "The capital of France is ", "Paris")
    b = encode_pair(tiny_tokenizer, "The capital of France is", " Paris")
    assert a == b and tiny_tokenizer.convert_ids_to_tokens(b[1]) == ["ĠParis"]


@pytest.fixture(scope="module")
def bigram_dir(tmp_path_factory, tiny_tokenizer):
    rows = {"Ġof": {"ĠRome": math.log(3)}, "ĠRome": {"Ġof": math.log(2)}}
    return save_model(bigram_model(tiny_tokenizer, rows), tmp_path_factory.mktemp("bigram"))


def test_cli_eval_table_and_json(bigram_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    text = tmp_path / "text.txt"
    text.write_text(" of Rome of Rome of", encoding="utf-8")
    assert cli.main(["eval", str(bigram_dir), "--task", str(text), "--seq-len", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (score,) = out["scores"]
    # Saved and reloaded, the final norm has its config's epsilon again: equal to 1e-4, not 1e-6.
    assert score["metrics"]["perplexity"] == pytest.approx(1 / math.sqrt(3 / 66 * 2 / 65), rel=1e-4)
    assert score["cached"] is False
    assert cli.main(["eval", str(bigram_dir), "--task", str(text), "--seq-len", "8"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["task", "metric", str(bigram_dir)]
    assert table[2].split()[:2] == ["text", "perplexity"]
    assert float(table[2].split()[2]) == pytest.approx(score["metrics"]["perplexity"], abs=1e-3)
    assert any(line.startswith("from the cache (1 of 1)") for line in table)


@pytest.mark.parametrize("args,message", [
    (["--task", "BAD"], "line 1: 'gold' must be the index"),
    (["--task", "no-such-task"], "task no-such-task: no such file"),
    (["--task", "capitals-mc", "--batch-size", "0"], "batch size must be at least 1"),
])
def test_cli_eval_errors_exit_2_with_one_line(bigram_dir, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "Q?", "choices": ["a", "b"], "gold": 5}\n', encoding="utf-8")
    args = [str(bad) if a == "BAD" else a for a in args]
    assert cli.main(["eval", str(bigram_dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("weightsmith: error:") and message in err[0]
