"""The app's handlers called directly (no server): sessions, errors, playground, export, push."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import app  # noqa: E402
from checkpoints.generation import ModelCache, generate_text  # noqa: E402
from hub_fixtures import GOOD_TOKEN, fake_hub, hub_env, no_internet  # noqa: E402,F401


def req(name: str) -> SimpleNamespace:
    """Stand-in for gr.Request: handlers only read ``session_hash``."""
    return SimpleNamespace(session_hash=name)


@pytest.fixture
def wb(tmp_path, tiny_llama_family):
    cfg = app.AppConfig(workspace_root=tmp_path / "ws", named_models={
        "tiny-base": str(tiny_llama_family["base"]), "tiny-ft1": str(tiny_llama_family["ft1"]),
        "tiny-ft2": str(tiny_llama_family["ft2"])})
    return app.Workbench(cfg)


def _upload_tiny(wb, session, folder: Path, name: str) -> str:
    files = [str(p) for p in folder.iterdir() if p.is_file()]
    msg = wb.upload(files, name, "", req(session))
    assert f"ws:{name}" in msg
    return f"ws:{name}"


def test_sessions_get_distinct_private_workspaces(wb):
    a, b = wb.workspace(req("a")), wb.workspace(req("b"))
    assert a.id != b.id
    assert wb.workspace(req("a")).id == a.id  # stable within a session
    with pytest.raises(Exception, match="no session"):
        wb.workspace(SimpleNamespace(session_hash=None))


def test_inspect_named_model_and_path_policy(wb, tiny_llama_family):
    rows = dict(wb.inspect("tiny-base", req("a")))
    assert rows["architecture"] == "llama" and rows["layers"] == "4" and rows["dtype"] == "float32"
    assert int(rows["parameters"].replace(",", "")) > 0
    # Server paths are off by default: naming a folder is refused with one clear line.
    with pytest.raises(gr.Error, match="server paths are off"):
        wb.inspect(str(tiny_llama_family["base"]), req("a"))
    wb.config.allow_paths = True
    assert dict(wb.inspect(str(tiny_llama_family["base"]), req("a")))["layers"] == "4"


def test_errors_are_one_line_gr_errors(wb):
    with pytest.raises(gr.Error) as e:
        wb.inspect("ws:../../etc", req("a"))
    assert "\n" not in str(e.value) and "not a valid workspace item name" in str(e.value)
    with pytest.raises(gr.Error, match="no such item"):
        wb.export("ws:nothing", req("a"))


def test_upload_is_private_to_its_session(wb, tiny_llama_family):
    ref = _upload_tiny(wb, "a", tiny_llama_family["ft1"], "mine")
    assert ref in wb.model_choices(req("a"))
    assert ref not in wb.model_choices(req("b"))
    assert wb.workspace_table(req("b")) == []
    with pytest.raises(gr.Error, match="no such item"):
        wb.inspect(ref, req("b"))
    with pytest.raises(gr.Error, match="no such item"):
        wb.export(ref, req("b"))
    assert dict(wb.inspect(ref, req("a")))["layers"] == "4"


def test_generate_streams_both_sides(wb, tiny_llama_family):
    steps = list(wb.generate("tiny-ft1", "tiny-base", "The capital of France is", 6, req("a")))
    assert len(steps) >= 2
    work, orig = steps[-1]
    cache = ModelCache()
    assert work == generate_text(cache, str(tiny_llama_family["ft1"]), "The capital of France is", max_new_tokens=6)
    assert orig == generate_text(cache, str(tiny_llama_family["base"]), "The capital of France is", max_new_tokens=6)
    assert work != orig  # non-vacuous: the two panes really show two models
    # The text grows as tokens stream in.
    assert len(steps[0][0]) <= len(work)
    with pytest.raises(gr.Error, match="prompt is empty"):
        list(wb.generate("tiny-ft1", "tiny-base", "  ", 6, req("a")))


def test_export_zip_holds_the_item(wb, tiny_llama_family):
    ref = _upload_tiny(wb, "a", tiny_llama_family["ft2"], "zipme")
    path = Path(wb.export(ref, req("a")))
    assert path.suffix == ".zip" and wb.workspace(req("a")).path in path.parents
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
    assert "zipme/config.json" in names and "zipme/model.safetensors" in names
    assert not any(".weightsmith-item" in n for n in names)


def test_card_preview(wb, tiny_llama_family):
    ref = _upload_tiny(wb, "a", tiny_llama_family["ft2"], "nocard")
    assert "no model card" in wb.card_preview(ref, req("a"))
    (wb.workspace(req("a")).item_path(ref) / "README.md").write_text("---\ntags: [x]\n---\n# Hello card")
    assert "# Hello card" in wb.card_preview(ref, req("a"))


def test_push_through_the_hub_library(wb, tiny_llama_family, hub_env, fake_hub):
    ref = _upload_tiny(wb, "a", tiny_llama_family["ft2"], "pushme")
    folder = wb.workspace(req("a")).item_path(ref)
    (folder / "README.md").write_text("---\ntags:\n- weightsmith\n---\n# pushme\n")
    msg = wb.push(ref, "alice/pushme", False, GOOD_TOKEN, req("a"), None, None)
    assert "alice/pushme" in msg and "commit" in msg
    with pytest.raises(gr.Error, match="repo id"):
        wb.push(ref, " ", False, GOOD_TOKEN, req("a"), None, None)
    with pytest.raises(gr.Error) as e:
        wb.push(ref, "alice/pushme", False, "hf_definitelyWrongToken123456", req("a"), None, None)
    assert "hf_definitelyWrongToken123456" not in str(e.value)


def test_stop_sets_the_running_jobs_cancel_flag(wb):
    seen = {}

    def job(cancel):
        assert wb.stop(req("a")) == "Stopping…"
        seen["cancelled"] = cancel.is_set()
        return 1

    assert wb.run_job(req("a"), job) == 1
    assert seen["cancelled"] is True
    assert wb.stop(req("a")) == "Nothing to stop."


def test_progress_adapter_accepts_library_shapes():
    calls = []
    rep = app.progress_adapter(lambda frac, desc=None: calls.append((round(frac, 3), desc)))
    rep(3, 4, "tensors")
    rep(0.5)
    rep(done=1, total=2, desc="x")
    assert calls == [(0.75, "tensors"), (0.5, None), (0.5, "x")]
    app.progress_adapter(None)(1, 2)  # no bar: silently ignored


def test_workspace_cleanup_forgets_expired_sessions(wb):
    ws = wb.workspace(req("old"))
    (ws.path / ".last-used").write_text("0")
    wb._last_cleanup = 0
    wb.config.cleanup_every = 0
    fresh = wb.workspace(req("old"))  # cleanup ran, the session got a new workspace
    assert fresh.id != ws.id and not ws.path.exists()
