"""The Evaluate tab's endpoint ``/eval`` through ``gradio_client``: the library's numbers, the cache, bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ui.config import AppConfig, launch_kwargs  # noqa: E402
from ui.layout import build_app  # noqa: E402
from ui.plots_eval import eval_bars_plot  # noqa: E402

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_family):
    root = tmp_path_factory.mktemp("eval-ws")
    cfg = AppConfig(workspace_root=root, named_models={"tiny-base": str(tiny_llama_family["base"]),
                                                       "tiny-ft1": str(tiny_llama_family["ft1"])},
                    stats_root=root / "stats")
    demo = build_app(config=cfg)
    demo.queue(default_concurrency_limit=2).launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True,
                                                   **launch_kwargs(cfg))
    try:
        yield demo, cfg
    finally:
        demo.close()


def test_eval_endpoint_gives_the_librarys_numbers_and_caches(server, tiny_llama_family, tmp_path):
    from evaluation import EvalSettings, evaluate_models

    demo, cfg = server
    c = Client(demo.local_url, verbose=False)
    assert "/eval" in c.view_api(return_format="dict", print_info=False)["named_endpoints"]
    table, plot, notes = c.predict(["tiny-base", "tiny-ft1"], ["capitals-mc"], None, 6, 8, api_name="/eval")
    assert table["headers"] == ["task", "metric", "tiny-base", "tiny-ft1"]
    expected = evaluate_models([str(tiny_llama_family["base"]), str(tiny_llama_family["ft1"])], ["capitals-mc"],
                               settings=EvalSettings(limit=6), cache=None)
    _, rows = expected.pivot()
    assert table["data"] == [[t, m, *[round(v, 4) for v in vals]] for t, m, *vals in rows]
    assert plot is not None and "from the cache" not in notes and "6 items" in notes
    # The same request again: every result from the server's cache (beside its statistics folder).
    again, _, notes = c.predict(["tiny-base", "tiny-ft1"], ["capitals-mc"], None, 6, 8, api_name="/eval")
    assert again["data"] == table["data"] and notes.count("from the cache") == 2
    assert any((cfg.stats_root.parent / "eval" / "results").rglob("*.json"))
    # An uploaded task file in the same format works.
    own = tmp_path / "mine.jsonl"
    own.write_text('{"query": "The capital of France is", "choices": ["Paris", "Rome"], "gold": 0}\n',
                   encoding="utf-8")
    table, _, _ = c.predict(["tiny-base"], [], handle_file(str(own)), None, 8, api_name="/eval")
    assert [r[:2] for r in table["data"]] == [["mine", "acc"], ["mine", "acc_norm"]]


def test_eval_endpoint_refuses_bad_input_with_one_line(server, tmp_path):
    demo, _ = server
    c = Client(demo.local_url, verbose=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"query": "Q", "choices": ["a", "b"], "gold": 0}\n{"prompt": "x"}\n')
    with pytest.raises(Exception, match="line 2: a style item in a file of choice items"):
        c.predict(["tiny-base"], [], handle_file(str(bad)), None, 8, api_name="/eval")
    with pytest.raises(Exception, match="Bundled tasks: .* is not in the list of choices"):
        c.predict(["tiny-base"], ["/etc/passwd"], None, None, 8, api_name="/eval")
    with pytest.raises(Exception, match="pick a bundled task or upload a task file"):
        c.predict(["tiny-base"], [], None, None, 8, api_name="/eval")
    with pytest.raises(Exception, match="server paths are off"):
        c.predict(["/etc"], ["capitals-mc"], None, None, 8, api_name="/eval")
    # The server keeps serving.
    table, _, _ = c.predict("tiny-base", "capitals-mc", None, 2, 8, api_name="/eval")
    assert table["headers"] == ["task", "metric", "tiny-base"]


def test_bar_plot_puts_perplexity_on_its_own_axis():
    rows = [["mc", "acc", 0.5, 0.75], ["text", "perplexity", 12.0, 30.0]]
    fig = eval_bars_plot(["task", "metric", "a", "b"], rows)
    assert len(fig.axes) == 2
    heights = [[p.get_height() for p in ax.patches] for ax in fig.axes]
    assert heights == [[0.5, 0.75], [12.0, 30.0]]
    assert len(eval_bars_plot(["task", "metric", "a"], rows[:1]).axes) == 1
