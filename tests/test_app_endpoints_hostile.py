"""Hostile arguments at every API endpoint: one clear line naming the argument, and the server keeps serving.

Each endpoint's handler is called with each argument replaced by a value of the
wrong kind (None, a list, a dict, a huge string, negative / NaN / infinite
numbers, bytes, text with a NUL or a lone surrogate). Every call either works
or raises one ``gr.Error`` line; none is an unexpected server error. Then the
same through ``gradio_client``, where Gradio parses each argument first.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ui import forms, workbench_base  # noqa: E402
from ui.config import AppConfig, launch_kwargs, queue_kwargs  # noqa: E402
from ui.endpoint import MAX_TEXT_CHARS, scrub_paths  # noqa: E402
from ui.layout import build_app  # noqa: E402
from ui.workbench import Workbench  # noqa: E402

HOSTILE = {
    "None": None, "list": ["demo"], "dict": {"model": "demo"}, "huge": "x" * (MAX_TEXT_CHARS + 1),
    "negative": -3.0, "nan": math.nan, "inf": math.inf, "bytes": b"\xff\xfe\x00", "nul": "a\x00b",
    "surrogate": "caf\udce9",
}
UNEXPECTED = "unexpected server error"


def req(name: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=name)


@pytest.fixture(scope="module")
def wb(tmp_path_factory, tiny_llama_family):
    root = tmp_path_factory.mktemp("hostile")
    cfg = AppConfig(workspace_root=root / "ws", named_models={
        "tiny-base": str(tiny_llama_family["base"]), "tiny-ft1": str(tiny_llama_family["ft1"])},
        edit_stats_tokens=500, stats_root=root / "stats")
    return Workbench(cfg)


MERGE = ("merge_method: linear\nmodels:\n  - model: tiny-base\n    parameters: {weight: 0.5}\n"
         "  - model: tiny-ft1\n    parameters: {weight: 0.5}\n")
MIX = "base_model: tiny-base\nadapters:\n  - {adapter: ws:nothing, weight: 1.0}\nmethod: cat\n"
FACT = ("tiny-base", "{} is located in the city of", "The Eiffel Tower")

# endpoint -> (handler name, good positional arguments before the request)
ENDPOINTS = {
    "inspect": ("inspect", ("tiny-base",)),
    "upload": ("upload", ([], "n", "")),
    "generate": ("generate", ("tiny-base", "", "Hi", 2)),
    "merge": ("merge", (MERGE, "out")),
    "mix_adapters": ("mix_adapters", (MIX, "mix")),
    "trace": ("trace", (*FACT, "mlp", 1)),
    "edit": ("edit", (*FACT, "Rome", "Paris", 1)),
    "evaluate": ("evaluate", (*FACT, "Rome", "Paris", "The Eiffel Tower is in", "The Louvre is in")),
    "undo": ("undo", ("tiny-base", 1)),
    "edit_batch": ("edit_batch", ("tiny-base", None)),
    "save_edits": ("save_edits", ("tiny-base", "adapter", "saved")),
    "export": ("export", ("ws:nothing",)),
    "push": ("push", ("ws:nothing", "me/repo", True, "")),
    "export_gguf": ("export_gguf", ("ws:nothing", "q8_0")),
}


def call(wb, endpoint: str, args: tuple, session: str):
    name, _ = ENDPOINTS[endpoint]
    fn = getattr(wb, name)
    kw = {"progress": None} if "progress" in fn.__wrapped__.__code__.co_varnames else {}
    out = fn(*args, req(session), **kw)
    if endpoint == "generate":
        out = list(out)  # a generator: run it
    return out


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_every_argument_of_every_endpoint_refuses_hostile_values_in_one_line(wb, endpoint, monkeypatch):
    from checkpoints import hub

    # A push must never reach a network: the token check refuses first (no token given).
    monkeypatch.setattr(hub, "push_folder", lambda *a, **k: pytest.fail("push reached the Hub"))
    _, good = ENDPOINTS[endpoint]
    seen = []
    for i in range(len(good)):
        for label, bad in HOSTILE.items():
            args = good[:i] + (bad,) + good[i + 1:]
            try:
                call(wb, endpoint, args, session=f"{endpoint}-{i}-{label}")
            except gr.Error as e:
                msg = str(e.message)
                assert "\n" not in msg and len(msg) <= 500, (endpoint, i, label, msg)
                assert UNEXPECTED not in msg and "Error:" not in msg, (endpoint, i, label, msg)
                seen.append(msg)
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"{endpoint} arg {i} = {label}: {type(e).__name__} escaped: {e}")
    assert seen  # non-vacuous: hostile values were refused


def test_the_good_arguments_work(wb):
    """Non-vacuous: the baselines the hostile values replace are accepted (so a refusal is the bad value's)."""
    assert dict(call(wb, "inspect", ENDPOINTS["inspect"][1], "good"))["layers"] == "4"
    assert call(wb, "generate", ENDPOINTS["generate"][1], "good")[-1][0]
    assert call(wb, "merge", ENDPOINTS["merge"][1], "good")[2] == "ws:out"


@pytest.mark.parametrize("endpoint, index, value, expected", [
    ("inspect", 0, ["demo"], "model must be text, not a list"),
    ("generate", 3, math.nan, "max_new_tokens must be a finite number"),
    ("generate", 3, -3.0, "max_new_tokens must be at least 1"),
    ("generate", 2, "caf\udce9", "prompt is not valid text"),
    ("merge", 0, {"merge_method": "linear"}, "recipe_yaml must be text, not a mapping"),
    ("merge", 0, "x" * (MAX_TEXT_CHARS + 1), "recipe_yaml is too long"),
    ("mix_adapters", 1, b"\xff", "out_name must be text, not bytes"),
    ("trace", 3, "sideways", "kind must be one of hidden, mlp, attn"),
    ("trace", 4, math.inf, "samples must be a finite number"),
    ("trace", 4, 100, "samples must be at most 10"),
    ("edit", 5, -1, "layer must be at least 0"),
    ("edit", 5, 1.5, "layer must be a whole number"),
    ("undo", 1, "first", "edit_id must be a number, not text"),
    ("edit_batch", 1, {"no": "path"}, "file must be an uploaded file"),
    ("save_edits", 1, "zip", "save_as must be one of model, adapter"),
    ("export", 0, 7, "item must be text, not a number"),
    ("push", 2, "yes", "private must be true or false, not text"),
    ("upload", 0, [None], "files[0] must be an uploaded file"),
    ("evaluate", 5, "a\x00b", "paraphrases contains a NUL character"),
])
def test_the_line_names_the_argument(wb, endpoint, index, value, expected):
    _, good = ENDPOINTS[endpoint]
    with pytest.raises(gr.Error) as e:
        call(wb, endpoint, good[:index] + (value,) + good[index + 1:], session="named")
    assert expected in str(e.value.message)


def test_a_bug_is_logged_not_shown(wb, monkeypatch, caplog):
    """An unexpected exception: the page gets one line without its text; the log has the traceback."""
    def broken(*a, **k):
        raise AttributeError("'NoneType' object has no attribute 'secret_path' at /srv/weights/x")

    monkeypatch.setattr(workbench_base, "resolve", broken)
    with pytest.raises(gr.Error) as e:
        wb.inspect("tiny-base", req("bug"))
    msg = str(e.value.message)
    assert msg == "inspect failed on an unexpected server error (logged); nothing was saved"
    assert any(r.exc_info and "secret_path" in str(r.exc_info[1]) for r in caplog.records)


def test_messages_never_show_server_paths():
    ws_file = "/tmp/x/weightsmith-workspaces/" + "A" * 32 + "/items/my-merge/model.safetensors"
    assert scrub_paths(f"{ws_file}: bad header") == "ws:my-merge/model.safetensors: bad header"
    assert scrub_paths("/etc/passwd (1.9 kB) is not a shard") == "<server path> (1.9 kB) is not a shard"
    assert scrub_paths("see https://huggingface.co/a/b and owner/name") == "see https://huggingface.co/a/b and owner/name"
    assert scrub_paths("ΔW / norm, 3/4") == "ΔW / norm, 3/4"


# ---- through gradio_client: Gradio parses each argument before the handler -------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_family):
    root = tmp_path_factory.mktemp("hostile-server")
    cfg = AppConfig(workspace_root=root / "ws", named_models={"tiny-base": str(tiny_llama_family["base"])},
                        stats_root=root / "stats")
    demo = build_app(config=cfg)
    demo.queue(**queue_kwargs(cfg)).launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True,
                                                **launch_kwargs(cfg))
    try:
        yield demo
    finally:
        demo.close()


@pytest.mark.parametrize("api, args, expected", [
    ("/generate", ("tiny-base", "", "Hi", "many", True), "Max new tokens: expected a number, not 'many'"),
    ("/generate", ("tiny-base", "", "Hi", [3], True), "Max new tokens: expected a number, not a list"),
    ("/generate", ("tiny-base", "", "Hi", -5, True), "Max new tokens:"),
    ("/generate", ("tiny-base", "", "Hi", 3, "yes"), "chat must be true or false"),
    ("/inspect", ({"model": "tiny-base"},), "model must be text, not a mapping"),
    ("/edit", (*FACT, "Rome", "Paris", "seven"), "layer must be a whole number"),
    ("/trace", (*FACT, "sideways", 1), "Restore:"),
    ("/upload", ("/etc/passwd", "n", ""), "Files: expected uploaded files"),
    ("/upload", ([{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}], "n", ""), None),
    ("/edit_batch", ("tiny-base", 5), "Batch edits (JSON or CSV): expected uploaded files"),
    ("/save_edits", ("tiny-base", "zip", "n"), "Save edits as:"),
    ("/merge", (["a"], "n"), "recipe_yaml must be text, not a list"),
])
def test_through_the_client_one_line_and_the_server_keeps_serving(server, api, args, expected):
    from gradio_client import Client

    c = Client(server.local_url, verbose=False)
    with pytest.raises(Exception) as e:
        c.predict(*args, api_name=api)
    msg = str(e.value)
    assert "\n" not in msg.strip() and "upstream Gradio app has raised an exception" not in msg, msg
    if expected:
        assert expected in msg, msg
    else:  # a server file named as an upload is refused, and nothing of it is shown
        assert "root:" not in msg and "passwd" not in msg.replace("/etc/passwd", ""), msg
        assert not [i for i in server.workbench.workspaces.config.root.rglob("*") if i.name == "passwd"]
    assert dict(c.predict("tiny-base", api_name="/inspect")["data"])["layers"] == "4"


def test_a_full_disk_is_one_line_without_the_server_path(wb, monkeypatch):
    import errno

    import merging.engine

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "/srv/weights/ws/items/out/model.safetensors")

    monkeypatch.setattr(merging.engine, "run_merge", full)
    with pytest.raises(gr.Error) as e:
        wb.merge(MERGE, "out", req("disk"), None)
    msg = str(e.value.message)
    assert "no space left" in msg and "/srv" not in msg and "unexpected" not in msg, msg


def test_a_table_cell_alias_bomb_is_refused_not_expanded():
    """A merge-table cell holding a YAML alias bomb (10^6 leaves) stays text; the form says the weight is bad."""
    levels = ["&a [1,1,1,1,1,1,1,1,1,1]"] + [f"&{c} [{','.join([f'*{p}'] * 10)}]" for p, c in zip("abcde", "bcdef")]
    bomb = "[" + ", ".join(levels) + "]"
    assert forms.cell_value(bomb) == bomb and forms.cell_value("[0.1, 0.2]") == [0.1, 0.2]  # plain YAML still parses
    _, status = forms.merge_yaml_from_form("task_arithmetic", "tiny-base", [["tiny-ft1", bomb]], [], False, True,
                                         0.5, 0.5, "", "")
    assert status.startswith("⚠") and "weight must be a number" in status
