"""Hub downloads through checkpoints.sources against the local fake Hub: online, offline from the cache,
offline without a cache entry, Hub unreachable, wrong token."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpoints.errors import WeightsmithError
from checkpoints.sources import download_from_hub, resolve
from hub_fixtures import BAD_TOKEN, GOOD_TOKEN, fake_hub, hub_env, no_internet  # noqa: F401


@pytest.fixture
def seeded(hub_env, tiny_llama_dir):
    """alice/tiny on the fake Hub holds the tiny llama folder (weights as LFS) plus a README."""
    files = {p.name: p.read_bytes() for p in Path(tiny_llama_dir).iterdir() if p.is_file()}
    files["README.md"] = b"---\ntags: [x]\n---\n# tiny\n"
    hub_env["hub"].seed("alice/tiny", files)
    return hub_env, files


def test_online_download_then_offline_from_cache(seeded, monkeypatch):
    from huggingface_hub import constants

    env, files = seeded
    hub = env["hub"]
    path = download_from_hub("alice/tiny")
    assert Path(path).is_relative_to(env["cache"])
    got = {p.name: p.read_bytes() for p in Path(path).iterdir() if p.is_file()}
    expected = {k: v for k, v in files.items() if k != "README.md"}  # HUB_PATTERNS skip the card
    assert got == expected
    paths = [p for _, p, _ in hub.requests]
    assert "/api/models/alice/tiny/revision/main" in paths
    assert any(p.startswith("/alice/tiny/resolve/") and p.endswith("model.safetensors") for p in paths)
    assert hub.unhandled == []

    ckpt = resolve("alice/tiny")
    assert ckpt.kind == "hub" and ckpt.name == "alice/tiny" and ckpt.hub_id == "alice/tiny"
    assert ckpt.num_layers == 4 and "model.embed_tokens.weight" in ckpt.reader().keys()

    # Offline: the same snapshot comes from the cache and nothing goes over the wire.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(hub.requests)
    assert download_from_hub("alice/tiny") == path
    assert resolve("alice/tiny").reader().keys() == ckpt.reader().keys()
    assert len(hub.requests) == n


def test_offline_without_cache_says_how_to_proceed(hub_env, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsmithError) as err:
        resolve("alice/never-downloaded")
    msg = str(err.value)
    assert msg.startswith("alice/never-downloaded: not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set")
    assert "hf download alice/never-downloaded" in msg and "HF_HOME" in msg
    assert hub_env["hub"].requests == []


def test_unreachable_hub_without_cache(hub_env):
    hub_env["hub"].stop()  # connection refused from now on
    with pytest.raises(WeightsmithError, match="not in the local Hugging Face cache and the Hub cannot be reached"):
        download_from_hub("alice/tiny")


def test_missing_repo_and_wrong_token(seeded):
    env, _ = seeded
    with pytest.raises(WeightsmithError, match="bob/absent: no such repo on the Hub"):
        download_from_hub("bob/absent")
    with pytest.raises(WeightsmithError) as err:
        download_from_hub("alice/tiny", token=BAD_TOKEN)
    assert "the Hub rejected the token (401)" in str(err.value)
    assert BAD_TOKEN not in str(err.value)
    assert any(tok == BAD_TOKEN for _, _, tok in env["hub"].requests)  # non-vacuous: it was really sent


def test_private_repo_needs_its_token(hub_env, tiny_llama_dir):
    hub = hub_env["hub"]
    files = {p.name: p.read_bytes() for p in Path(tiny_llama_dir).iterdir() if p.is_file()}
    hub.seed("alice/private-tiny", files, private=True)
    with pytest.raises(WeightsmithError, match="no such repo on the Hub \\(or it is private: pass a token\\)"):
        download_from_hub("alice/private-tiny")
    path = download_from_hub("alice/private-tiny", token=GOOD_TOKEN)
    assert (Path(path) / "model.safetensors").read_bytes() == files["model.safetensors"]
