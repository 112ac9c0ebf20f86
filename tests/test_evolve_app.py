"""The Evolve tab's handler: a search into a workspace item with live updates, the session's policy, one-line
refusals, resume of the same search after a Stop, and the page's /evolve endpoint (tiny random models)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import gradio as gr
import pytest

from ui.config import AppConfig
from ui.workbench import Workbench


def req(name: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=name)


@pytest.fixture
def wb(tmp_path, tiny_llama_family):
    return Workbench(AppConfig(workspace_root=tmp_path / "ws", named_models={
        "tiny-base": str(tiny_llama_family["base"]), "tiny-ft1": str(tiny_llama_family["ft1"]),
        "tiny-ft2": str(tiny_llama_family["ft2"])}))


def search(trials: int = 3, **kw) -> str:
    models = kw.get("models", "[tiny-ft1, tiny-ft2]")
    task = kw.get("task", "wikitext-excerpt")
    return f"""merge_method: task_arithmetic
base_model: tiny-base
models: {models}
search: {{weight: [0.0, 1.0], lines: {{alpha: [0.0, 1.0]}}}}
tasks: [{{task: {task}}}]
eval: {{max_tokens: 64, seq_len: 32}}
budget: {{trials: {trials}, minutes: 10}}
"""


def test_search_yields_after_each_trial_and_registers_the_best(wb, tiny_llama_family):
    updates = list(wb.evolve(search(3), "evo", req("a")))
    assert len(updates) == 4  # one per trial, then the result
    for n, (fig, best, table, md, ref) in enumerate(updates[:3], 1):
        assert len(table["data"]) == n and fig is not None and best.startswith("# trial") and ref == ""
    fig, best, table, md, ref = updates[-1]
    assert ref == "ws:evo" and "Search done" in md
    assert "tiny-ft1" in best and str(tiny_llama_family["ft1"]) not in best  # the user's names, no server path
    ws = wb.workspace(req("a"))
    item = ws.item("ws:evo")
    assert item.kind == "model" and item.origin == "evolve"
    scores = [row[2] for row in table["data"]]
    assert round(item.details["best_score"], 4) == max(scores) and len(set(scores)) == 3
    assert "## Evolutionary search" in (ws.item_path("evo") / "README.md").read_text()
    # The same search again resumes its study: the budget is spent, so no trial runs; a new item is written.
    again = list(wb.evolve(search(3), "evo", req("a")))
    assert len(again) == 1 and again[0][4] == "ws:evo-2" and "0 ran now" in again[0][3]


@pytest.mark.parametrize("text, message", [
    (search(task="/etc/passwd"), "is not a bundled task"),  # refused before the file is read
    (search(task="general-mc").replace("task: general-mc", "task: general-mc, metric: caps"), "not a metric"),
    (search(models="[/tmp/x, tiny-ft2]"), "server paths are off"),
    (search(models="[tiny-ft1+/tmp/adapter, tiny-ft2]"), "server paths are off"),
    (search().replace("minutes: 10", "minutes: 1000"), "at most 120 here"),
])
def test_refusals_are_one_line_and_write_nothing(wb, text, message):
    with pytest.raises(gr.Error) as err:
        list(wb.evolve(text, "evo", req("b")))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert wb.workspace(req("b")).items() == []


def test_stop_cancels_the_search_and_writes_no_item(wb):
    gen = wb.evolve(search(20), "evo", req("c"))
    first = next(gen)  # the first trial is done
    assert len(first[2]["data"]) == 1
    threading.Timer(0.0, lambda: wb.stop(req("c"))).start()
    with pytest.raises(gr.Error, match="search was cancelled"):
        list(gen)
    assert wb.workspace(req("c")).items() == []


def test_the_page_has_an_evolve_endpoint_in_its_own_queue(tmp_path):
    from ui.layout import build_app

    demo = build_app(config=AppConfig(workspace_root=tmp_path / "ws"))
    (fn,) = [f for f in demo.fns.values() if f.api_name == "evolve"]
    assert (fn.concurrency_id, fn.concurrency_limit) == ("evolve", 1)  # never holds the merges' slot
