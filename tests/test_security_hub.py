"""Every Hub call has a bounded wait: a Hub that accepts connections and never answers ends the call with one line.

Issue 11, "A Hub that hangs hangs the push forever". The fake Hub's hang mode
reads a request and never answers. Each call runs on a thread joined with a
generous limit, so that the code before the fix fails here instead of hanging
the suite; the timeout under test is 1 s (``WEIGHTSMITH_HUB_TIMEOUT``).
"""

from __future__ import annotations

import logging
import threading
import traceback
from pathlib import Path

import pytest

from checkpoints.errors import WeightsmithError
from checkpoints.hub import push_folder
from hub_fixtures import GOOD_TOKEN, fake_hub, hub_env, no_internet  # noqa: F401
from test_security_secrets import META_TOKEN, Capture, _assert_nowhere, _folder

# A call that has not returned after this long is hung (the bound under test is ~1 s plus instant retries).
GIVE_UP = 90


@pytest.fixture
def short_timeout(monkeypatch):
    """WEIGHTSMITH_HUB_TIMEOUT=1; huggingface_hub's retry pauses skipped; the default client restored after."""
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setenv("WEIGHTSMITH_HUB_TIMEOUT", "1")
    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)
    yield
    try:
        from checkpoints.hub_client import restore_default_hub_client
    except ImportError:  # before issue 11
        return
    restore_default_hub_client()


def _run_bounded(fn):
    """Run ``fn`` on a thread; return (finished, exception or None)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(GIVE_UP)
    return not thread.is_alive(), box.get("error")


@pytest.mark.parametrize("route, stage", [
    (r"^/api/repos/create$", "creating the repo"),
    (r"/preupload/", "uploading files"),
    (r"\.git/info/lfs/objects/batch$", "uploading files"),
    (r"^/__lfs__/upload/", "uploading files"),
    (r"/commit/", "uploading files"),
])
def test_push_against_a_hung_hub_fails_with_one_line(hub_env, tmp_path, short_timeout, route, stage):
    hub = hub_env["hub"]
    hub.hang_paths = [route]
    folder = _folder(tmp_path)
    finished, error = _run_bounded(lambda: push_folder(folder, "alice/hung", token=GOOD_TOKEN))
    assert finished, f"push still waiting on a hung Hub ({route}) after {GIVE_UP} s"
    assert isinstance(error, WeightsmithError), repr(error)
    message = str(error)
    assert message.startswith(f"the Hub did not answer within 1 s while {stage}"), message
    assert "WEIGHTSMITH_HUB_TIMEOUT" in message and "\n" not in message
    # The hung route was really reached, and once only: retries after a timeout do not wait again.
    assert len(hub.hung) == 1, hub.hung
    assert len(hub.commits("alice/hung")) <= 1  # nothing committed beyond the Hub's initial commit


def test_hung_push_leaks_no_token_in_debug_logs(hub_env, tmp_path, short_timeout, monkeypatch, capsys):
    hub = hub_env["hub"]
    hub.tokens[META_TOKEN] = "alice"  # a valid token that no "hf_..." pattern would catch
    hub.hang_paths = [r"/preupload/"]
    capture = Capture(monkeypatch)
    try:
        finished, error = _run_bounded(lambda: push_folder(_folder(tmp_path), "alice/hung", token=META_TOKEN))
        logging.getLogger("weightsmith.test").debug("crafted: Bearer %s", META_TOKEN)
    finally:
        capture.close()
    assert finished and isinstance(error, WeightsmithError)
    out, err = capsys.readouterr()
    exc_text = "".join(traceback.format_exception(error))
    _assert_nowhere(META_TOKEN, [str(error), exc_text, out, err, *capture.handler_lines])
    # Non-vacuous: the push got as far as the hung route with this token, DEBUG records were captured
    # across it, and the crafted one held the token before redaction.
    assert hub.hung and any(tok == META_TOKEN for _, _, tok in hub.requests)
    assert any("preupload" in line for line in capture.handler_lines)
    assert any(META_TOKEN in r for r in capture.raw)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf"])
def test_bad_timeout_setting_is_one_line(hub_env, tmp_path, monkeypatch, value):
    monkeypatch.setenv("WEIGHTSMITH_HUB_TIMEOUT", value)
    with pytest.raises(WeightsmithError, match=r"^WEIGHTSMITH_HUB_TIMEOUT=.*positive number of seconds"):
        push_folder(_folder(tmp_path), "alice/t", token=GOOD_TOKEN)
    assert hub_env["hub"].requests == []


def test_downloads_and_whoami_against_a_hung_hub_end(hub_env, tmp_path, short_timeout):
    """snapshot_download, hf_hub_download and whoami through the configured client give up too."""
    from huggingface_hub import HfApi, close_session, hf_hub_download, snapshot_download

    from checkpoints.hub_client import configure_hub_client

    hub = hub_env["hub"]
    hub.seed("alice/model", {"config.json": b"{}"})
    assert configure_hub_client() == 1.0
    hub.hang_paths = [r"^/api/"]
    calls = {
        "snapshot_download": lambda: snapshot_download("alice/model", cache_dir=str(tmp_path / "c1")),
        "whoami": lambda: HfApi(token=GOOD_TOKEN).whoami(),
    }
    for name, call in calls.items():
        close_session()  # a fresh client each time: each call must meet the hang itself
        finished, error = _run_bounded(call)
        assert finished, f"{name} still waiting on a hung Hub"
        assert error is not None, name
    hub.hang_paths = [r"/resolve/"]
    close_session()
    finished, error = _run_bounded(lambda: hf_hub_download("alice/model", "config.json", cache_dir=str(tmp_path / "c2")))
    assert finished and error is not None
    # Non-vacuity: the same calls succeed once the Hub answers again (fresh client: no remembered timeout).
    hub.hang_paths = []
    close_session()
    assert Path(hf_hub_download("alice/model", "config.json", cache_dir=str(tmp_path / "c3"))).read_bytes() == b"{}"
    assert HfApi(token=GOOD_TOKEN).whoami()["name"] == "alice"
    assert [path.split("/")[1] for _, path in hub.hung] == ["api", "api", "alice"]
