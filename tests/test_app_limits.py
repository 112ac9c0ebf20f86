"""The app's containment and limits: what a visitor can reach, and the quota and queue that bound them.

* With local paths off, a name shaped like a Hub id (``models/secret``) is never
  read from the server's disk, even when such a folder sits in the server's
  working directory; the error shows neither the server's paths nor the
  folder's files, sizes or contents.
* The workspace quota holds for uploads and results; the queue is bounded.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ui.config import AppConfig, queue_kwargs  # noqa: E402
from ui.layout import build_app  # noqa: E402
from ui.workbench import Workbench  # noqa: E402
from hub_fixtures import fake_hub, hub_env, no_internet  # noqa: E402,F401

SECRET_TEXT = "TOP-SECRET-CONTENT-41"
LINEAR = ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
          "  - model: {b}\n    parameters: {{weight: 0.5}}\n")
_opened: list[str] | None = None  # paths opened or listed while a test records


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event in ("open", "os.listdir", "os.scandir") and args and args[0] is not None:
        _opened.append(str(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only while ``_opened`` is a list


def opened_under(folder: Path, call) -> tuple[list[str], str | None]:
    """Run ``call()``: (paths under ``folder``, absolute or relative to the cwd, it opened or listed; the
    one-line message of the ``gr.Error`` it raised, or None)."""
    global _opened
    _opened, error = [], None
    try:
        call()
    except gr.Error as e:
        error = str(e.message)
    finally:
        seen, _opened = _opened, None
    rel = str(folder.relative_to(Path.cwd())) if folder.is_relative_to(Path.cwd()) else None
    return [p for p in seen if p.startswith(str(folder)) or (rel and p.startswith(rel))], error


def req(name: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=name)


@pytest.fixture
def server_cwd(tmp_path, monkeypatch, tiny_llama_family):
    """The server's working directory holds ``models/secret``: a complete tiny model and a private note."""
    cwd = tmp_path / "server-cwd"
    secret = cwd / "models" / "secret"
    shutil.copytree(tiny_llama_family["ft1"], secret)
    (secret / "adapter_config.json").write_text('{"peft_type": "LORA", "note": "%s"}' % SECRET_TEXT)
    (secret / "NOTES.txt").write_text(SECRET_TEXT)
    monkeypatch.chdir(cwd)
    return cwd


def _wb(tmp_path, tiny_llama_family, **kw) -> Workbench:
    return Workbench(AppConfig(workspace_root=tmp_path / "ws", stats_root=tmp_path / "stats",
                                       named_models={"tiny-base": str(tiny_llama_family["base"])}, **kw))


def _secret_calls(wb: Workbench, tiny_llama_family) -> dict:
    bare = tiny_llama_family["ft2"] / "model.safetensors"
    return {
        "inspect": lambda r: wb.inspect("models/secret", r),
        "generate": lambda r: list(wb.generate("models/secret", "", "Hi", 2, r)),
        "merge": lambda r: wb.merge(LINEAR.format(a="models/secret", b="tiny-base"), "m", r, None),
        "trace": lambda r: wb.trace("models/secret", "{} is in", "Paris", "mlp", 1, r, None),
        "upload config_from": lambda r: wb.upload([str(bare)], "bare", "models/secret", r),
    }


def test_a_hub_shaped_name_is_never_read_from_the_server_disk(server_cwd, hub_env, tmp_path, tiny_llama_family):
    wb = _wb(tmp_path, tiny_llama_family)
    secret = server_cwd / "models" / "secret"
    sizes = {str(p.stat().st_size) for p in secret.iterdir()}
    for what, call in _secret_calls(wb, tiny_llama_family).items():
        opened, msg = opened_under(secret, lambda: call(req(f"visitor-{what}")))
        assert opened == [] and msg is not None, (what, opened, msg)
        assert "\n" not in msg and "unexpected" not in msg, (what, msg)
        assert str(server_cwd) not in msg and str(tmp_path) not in msg and SECRET_TEXT not in msg, (what, msg)
        assert "model.safetensors" not in msg and not (set(re.findall(r"\d{4,}", msg)) & sizes), (what, msg)
    assert not list((tmp_path / "ws").rglob("NOTES.txt"))  # nothing of it was copied into a workspace


def test_the_same_name_is_read_when_the_operator_allows_local_paths(server_cwd, hub_env, tmp_path,
                                                                    tiny_llama_family):
    """Non-vacuous: the folder is a readable model, so refusing it above is the policy, not an accident."""
    wb = _wb(tmp_path, tiny_llama_family, allow_paths=True)
    rows = []
    opened, msg = opened_under(server_cwd / "models" / "secret", lambda: rows.extend(wb.inspect("models/secret",
                                                                                               req("operator"))))
    assert msg is None and dict(rows)["layers"] == "4"
    assert any(p.endswith("config.json") for p in opened)  # the audit hook sees the reads it must see


def test_mix_never_reads_the_server_folder(server_cwd, hub_env, tmp_path, tiny_llama_family):
    wb = _wb(tmp_path, tiny_llama_family)
    for recipe in ("base_model: models/secret\nadapters:\n  - {adapter: demo-adapter:caps, weight: 1.0}\n",
                   "base_model: tiny-base\nadapters:\n  - {adapter: models/secret, weight: 1.0}\n"):
        opened, msg = opened_under(server_cwd / "models" / "secret", lambda: wb.mix_adapters(
            recipe + "method: cat\n", "mix", req("visitor-mix"), None))
        assert opened == [] and msg is not None, (opened, msg)
        assert str(server_cwd) not in msg and SECRET_TEXT not in msg and "unexpected" not in msg, msg


# ---- limits ------------------------------------------------------------------------------------------

def test_quota_holds_for_uploads_and_results(tmp_path, tiny_llama_family):
    """A result that takes the workspace over its quota is not kept; the user gets one line."""
    size = sum(p.stat().st_size for p in tiny_llama_family["ft1"].iterdir())
    wb = _wb(tmp_path, tiny_llama_family, workspace_max_bytes=int(size * 1.5))
    wb.config.named_models["tiny-ft1"] = str(tiny_llama_family["ft1"])
    r = req("quota")
    files = [str(p) for p in tiny_llama_family["ft1"].iterdir() if p.is_file()]
    assert "ws:first" in wb.upload(files, "first", "", r)  # fits
    with pytest.raises(gr.Error, match="workspace full"):
        wb.upload(files, "second", "", r)  # would not fit: refused before copying
    with pytest.raises(gr.Error, match="workspace full: .* quota, so it was not kept"):
        wb.merge(LINEAR.format(a="tiny-base", b="tiny-ft1"), "big", r, None)
    ws = wb.workspace(r)
    assert [i.name for i in ws.items()] == ["first"] and not ws.item_path("big").exists()
    assert ws.size_bytes() <= wb.config.workspace_max_bytes
    wb.delete_item("ws:first", r)  # room again: the same merge now works
    md, _, ref = wb.merge(LINEAR.format(a="tiny-base", b="tiny-ft1"), "big", r, None)
    assert ref == "ws:big" and "**weights**: all" in md and "finite" in md  # the user sees the weights' check


def test_the_queue_is_bounded():
    cfg = AppConfig()
    kw = queue_kwargs(cfg)
    assert kw["max_size"] == cfg.queue_max_size == 64 and kw["default_concurrency_limit"] == 2
    demo = build_app(config=AppConfig(queue_max_size=5, workspace_root=None))
    demo.queue(**queue_kwargs(demo.workbench.config))
    assert demo._queue.max_size == 5
