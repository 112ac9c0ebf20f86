"""Every endpoint through ``gradio_client`` against the app launched here, on tiny models.

Also the many-users test: 8 clients at once, each merging and generating; all
finish and none can see another's files.
"""

from __future__ import annotations

import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ui.config import AppConfig, launch_kwargs  # noqa: E402
from ui.layout import build_app  # noqa: E402

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_family):
    root = tmp_path_factory.mktemp("app-ws")
    cfg = AppConfig(workspace_root=root, max_file_size="50mb", named_models={
        "tiny-base": str(tiny_llama_family["base"]), "tiny-ft1": str(tiny_llama_family["ft1"]),
        "tiny-ft2": str(tiny_llama_family["ft2"]), "tiny-ft3": str(tiny_llama_family["ft3"])},
        edit_stats_tokens=2000, stats_root=root / "stats")
    demo = build_app(config=cfg)
    demo.queue(default_concurrency_limit=2).launch(
        server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **launch_kwargs(cfg))
    try:
        yield demo, cfg
    finally:
        demo.close()


def client(server) -> Client:
    demo, _ = server
    return Client(demo.local_url, verbose=False)


def test_api_names_are_stable(server):
    names = set(client(server).view_api(return_format="dict", print_info=False)["named_endpoints"])
    expected = {"/merge", "/mix_adapters", "/trace", "/edit", "/evaluate", "/generate", "/export", "/push",
                "/inspect", "/upload", "/analyze", "/eval"}
    assert expected <= names, names - expected
    # Heavy jobs share one queue slot: two merges (or a merge and an edit) never run together.
    demo, cfg = server
    fns = {f.api_name: f for f in demo.fns.values()}
    heavy = {n: (fns[n].concurrency_id, fns[n].concurrency_limit) for n in ("merge", "mix_adapters", "edit", "trace")}
    assert set(heavy.values()) == {("heavy", cfg.heavy_concurrency)} and cfg.heavy_concurrency == 1
    # The configured upload limit reached Gradio.
    assert demo.max_file_size is not None and 49 * 10**6 <= demo.max_file_size <= 53 * 2**20


def test_inspect_and_errors(server):
    c = client(server)
    table = c.predict("tiny-base", api_name="/inspect")
    rows = dict(table["data"])
    assert rows["architecture"] == "llama" and rows["layers"] == "4"
    with pytest.raises(Exception, match="server paths are off"):
        c.predict("/etc", api_name="/inspect")
    # The server keeps serving after an error.
    assert dict(c.predict("tiny-ft1", api_name="/inspect")["data"])["layers"] == "4"


def test_upload_generate_export(server, tiny_llama_family, tmp_path):
    c = client(server)
    files = [handle_file(str(p)) for p in tiny_llama_family["ft3"].iterdir() if p.is_file()]
    msg = c.predict(files, "up3", "", api_name="/upload")
    assert "ws:up3" in msg
    work, orig = c.predict("ws:up3", "tiny-base", "The capital of France is", 5, api_name="/generate")
    assert isinstance(work, str) and isinstance(orig, str) and work != orig
    zpath = c.predict("ws:up3", api_name="/export")
    with zipfile.ZipFile(zpath) as zf:
        assert "up3/model.safetensors" in zf.namelist()
    # Another client (another session) cannot reach this upload.
    other = client(server)
    with pytest.raises(Exception, match="no such item"):
        other.predict("ws:up3", api_name="/export")


def test_push_without_token_is_a_clear_error(server, monkeypatch, tmp_path):
    # A merged item with its card, a valid repo id, the network allowed: the push gets as far as
    # choosing a token and finds none (no field, no HF_TOKEN, no stored login), before any request.
    from huggingface_hub import constants

    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "SPACE_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    c = client(server)
    c.predict(MERGE, "to-push", api_name="/merge")
    with pytest.raises(Exception, match="no Hugging Face token: create a write token"):
        c.predict("ws:to-push", "me/x", True, "", api_name="/push")
    # On a Space the server's own HF_TOKEN never publishes for a visitor: still no token.
    monkeypatch.setenv("HF_TOKEN", "hf_" + "s" * 34)
    monkeypatch.setenv("SPACE_ID", "me/weightsmith")
    with pytest.raises(Exception, match="no Hugging Face token"):
        c.predict("ws:to-push", "me/x", True, "", api_name="/push")
    # Non-vacuity: the token field is what this path reads (a malformed one is its own error).
    with pytest.raises(Exception, match="fewer than 8 characters"):
        c.predict("ws:to-push", "me/x", True, "short", api_name="/push")
    with pytest.raises(Exception, match="choose a workspace item"):
        c.predict("", "me/x", True, "", api_name="/push")


MERGE = """merge_method: task_arithmetic
base_model: tiny-base
models:
  - model: tiny-ft1
    parameters: {weight: 0.5}
  - model: tiny-ft2
    parameters: {weight: 0.5}
"""


def test_merge_and_mix_endpoints(server, tmp_path, tiny_llama_family):
    from test_app import make_tiny_adapter

    c = client(server)
    md, plot, ref = c.predict(MERGE, "api-merge", api_name="/merge")
    assert ref == "ws:api-merge" and "tensors changed" in md and plot is not None
    with pytest.raises(Exception, match="unknown merge method"):
        c.predict(MERGE.replace("task_arithmetic", "nope"), "x", api_name="/merge")
    ad = make_tiny_adapter(tiny_llama_family["base"], tmp_path / "ad", seed=5)
    c.predict([handle_file(str(ad / "adapter_config.json")), handle_file(str(ad / "adapter_model.safetensors"))],
              "ad", "", api_name="/upload")
    mix = "base_model: tiny-base\nadapters:\n  - {adapter: ws:ad, weight: 1.0}\nmethod: cat\nmerge_into_base: true\n"
    md, ref = c.predict(mix, "api-mix", api_name="/mix_adapters")
    assert ref == "ws:api-mix" and "exact in ΔW space" in md
    work, orig = c.predict(ref, "tiny-base", "The capital of France is", 4, api_name="/generate")
    assert work != orig


def test_trace_edit_evaluate_endpoints(server):
    c = client(server)
    args = ("tiny-base", "{} is located in the city of", "The Eiffel Tower")
    fig, md, layer = c.predict(*args, "hidden", 1, api_name="/trace")
    assert 0 <= layer < 4 and "layer" in md
    before, after, md, hist = c.predict(*args, "Rome", "Paris", layer, api_name="/edit")
    assert "Edit **1**" in md and hist["data"][0][4] == "Rome"
    scores = dict(c.predict(*args, "Rome", "Paris", "The Eiffel Tower is in", "The Louvre is in the city of",
                            api_name="/evaluate")["data"])
    assert "efficacy" in scores and scores["active edits"] == "1"
    hist, msg = c.predict("tiny-base", 1, api_name="/undo")
    assert hist["data"] == [] and "Undid" in msg


def test_eight_clients_at_once_merge_and_generate(server):
    """8 sessions merge and generate concurrently: all finish, each sees only its own items."""
    demo, cfg = server

    def user(i: int) -> tuple[int, str, list[str], str]:
        c = client(server)
        _, _, ref = c.predict(MERGE.replace("0.5}", f"{0.1 * (i + 1):.1f}}}", 1), f"user{i}", api_name="/merge")
        work, _ = c.predict(ref, "tiny-base", "The capital of France is", 3, api_name="/generate")
        # Every other user's result is invisible to this session.
        hidden = []
        for j in range(8):
            if j != i:
                try:
                    c.predict(f"ws:user{j}", api_name="/export")
                except Exception as e:  # noqa: BLE001
                    hidden.append(str(e))
        zpath = c.predict(ref, api_name="/export")
        return i, ref, hidden, zpath

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(user, range(8)))
    assert sorted(r[0] for r in results) == list(range(8))
    for i, ref, hidden, zpath in results:
        assert ref == f"ws:user{i}"
        assert len(hidden) == 7 and all("no such item" in h for h in hidden)
        with zipfile.ZipFile(zpath) as zf:
            assert f"user{i}/model.safetensors" in zf.namelist()
    # Eight separate workspaces exist on disk, one item each.
    wb = demo.workbench
    roots = [p for p in wb.workspaces.config.root.iterdir() if (p / "items" / "user0").exists()]
    assert len(roots) == 1
