"""Pytest fixtures pointing the real ``huggingface_hub`` client at :class:`tests.fake_hub.FakeHub`.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and
``HF_HUB_DISABLE_XET`` into ``huggingface_hub.constants`` when it is first
imported (conftest sets ``HF_HUB_OFFLINE=1`` and other test modules import it
early), but every call site reads ``constants.X`` at call time. So the fixture
patches those attributes (and the environment, for subprocesses) for the
duration of one test; ``monkeypatch`` restores them afterwards.

A socket guard makes any connection to a host other than 127.0.0.1 fail the
test: no test reaches the internet, even by accident.

Use from a test module with ``from hub_fixtures import fake_hub, hub_env, no_internet  # noqa: F401``.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_hub import FakeHub  # noqa: E402

GOOD_TOKEN = "hf_GoodWriteToken0123456789abcdef"
OTHER_TOKEN = "hf_OtherUserToken0123456789abcdef"
BAD_TOKEN = "hf_WrongToken9876543210fedcbaXYZ"


@pytest.fixture
def no_internet(monkeypatch):
    """Fail loudly on any outgoing connection that is not to this machine."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"test tried to reach the internet: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def fake_hub(no_internet):
    with FakeHub(tokens={GOOD_TOKEN: "alice", OTHER_TOKEN: "bob"}) as hub:
        yield hub


@pytest.fixture
def hub_env(fake_hub, monkeypatch, tmp_path):
    """Point huggingface_hub at the fake Hub, online, without Xet, with an empty cache and no stored login."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    home.mkdir()
    env = {
        "HF_ENDPOINT": fake_hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "TRANSFORMERS_OFFLINE", "SPACE_ID"):
        monkeypatch.delenv(key, raising=False)
    patches = {
        "ENDPOINT": fake_hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {"127.0.0.1"}),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for key, value in patches.items():
        monkeypatch.setattr(constants, key, value)
    return {"hub": fake_hub, "env": env, "home": home, "cache": home / "hub"}
