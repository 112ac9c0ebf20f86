"""End-to-end pushes over real HTTP: the real huggingface_hub client against tests/fake_hub.py.

Every test runs against a server on 127.0.0.1 (see hub_fixtures.py); a socket
guard fails any attempt to reach another host.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints.cards import LOCAL_LOAD_HINT, CardInfo, write_card
from checkpoints.errors import WeightsmithError
from checkpoints.hub import (
    MOCK_OAUTH_TOKEN,
    PushResult,
    collect_files,
    push_folder,
    resolve_token,
    scrub,
    token_for_push,
)
from hub_fixtures import BAD_TOKEN, GOOD_TOKEN, OTHER_TOKEN, fake_hub, hub_env, no_internet  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
DEMO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---------------------------------------------------------------------------------------------
# output folders as the merge and adapter engineers produce them
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merge_output(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A 'merge' of two tiny llamas saved in several shards, with a recipe naming their local paths."""
    from conftest import build_tiny_llama, perturbed, save_model

    base = build_tiny_llama(0)
    src = tmp_path_factory.mktemp("sources")
    ft1 = save_model(perturbed(base, 1), src / "tiny-ft1")
    ft2 = save_model(perturbed(base, 2), src / "tiny-ft2")
    out = tmp_path_factory.mktemp("outputs") / "my-merge"
    save_model(perturbed(base, 3), out, max_shard_size="40KB")
    return out, [ft1, ft2]


def _fresh_merge(tmp_path: Path, merge_output) -> Path:
    """A private copy of the merge output with a card (pushes rewrite the card's loading snippet)."""
    import shutil

    src, (ft1, ft2) = merge_output
    folder = tmp_path / "my-merge"
    shutil.copytree(src, folder)
    recipe = (f"merge_method: task_arithmetic\nbase_model: demo\nmodels:\n  - model: {ft1}\n"
              f"    parameters: {{weight: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5}}\n")
    write_card(folder, CardInfo(
        title="my-merge", relation="merge", base_models=["demo", str(ft1), str(ft2)],
        summary=f"Task arithmetic of two fine-tunes from {ft1.parent}.", tags=["lines"], recipe_yaml=recipe,
        scores={"perplexity": 12.5}, license="apache-2.0"))
    return folder


@pytest.fixture(scope="module")
def adapter_output(tmp_path_factory) -> tuple[Path, Path]:
    """A PEFT LoRA adapter saved from a local tiny llama (so adapter_config.json names a local path)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny_llama, save_model

    base_dir = save_model(build_tiny_llama(0), tmp_path_factory.mktemp("adapter-src") / "tiny-base")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter-out") / "my-adapter"
    peft_model.save_pretrained(str(out))
    write_card(out, CardInfo(title="my-adapter", relation="adapter", base_models=[DEMO_ID], library_name="peft",
                             summary="A rank-2 LoRA on q_proj and v_proj.", recipe_yaml="r: 2\nalpha: 4\n"))
    return out, base_dir


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _writes(hub) -> list[tuple[str, str, str | None]]:
    return [r for r in hub.requests if r[0] in ("POST", "PUT")]


# ---------------------------------------------------------------------------------------------
# successful pushes
# ---------------------------------------------------------------------------------------------
def test_push_merge_output_lands_in_one_commit(hub_env, merge_output, tmp_path, caplog):
    hub = hub_env["hub"]
    folder = _fresh_merge(tmp_path, merge_output)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 2, "non-vacuous: the merge output is sharded"
    stages = []
    caplog.set_level(logging.DEBUG)

    result = push_folder(folder, "alice/my-merge", token=GOOD_TOKEN, progress=lambda f, t: stages.append((f, t)))

    assert isinstance(result, PushResult)
    commits = hub.commits("alice/my-merge")
    assert len(commits) == 2  # the Hub's initial commit + exactly one push commit
    assert result.commit_oid == commits[-1].oid == hub.repos["alice/my-merge"].branches["main"]
    assert result.commit_url == f"{hub.url}/alice/my-merge/commit/{result.commit_oid}"
    assert result.repo_url == f"{hub.url}/alice/my-merge"
    # Every local file arrived byte for byte (the card was saved into the folder before the upload).
    local = _local_files(folder)
    remote = hub.files("alice/my-merge")
    assert set(remote) == set(local) | {".gitattributes"}
    for name, data in local.items():
        assert remote[name] == data, name
    assert sorted(result.files) == sorted(local)
    # Weights went through LFS: uploaded to the storage href, committed as pointers.
    for name in shards:
        assert name in commits[-1].lfs
        assert hub.lfs_store[hashlib.sha256(local[name]).hexdigest()] == local[name]
    # The card's front matter as the Hub saw it: only Hub ids in base_model.
    meta = hub.front_matter("alice/my-merge")
    assert meta["base_model"] == [DEMO_ID]
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    assert {"weightsmith", "merge", "lines"} <= set(meta["tags"])
    assert hub.validated_yaml and hub.validated_yaml[-1]["base_model"] == [DEMO_ID]
    card = remote["README.md"].decode()
    assert "tiny-ft1" in card and "tiny-ft2" in card  # local models are named in the body
    assert str(tmp_path) not in card and str(merge_output[1][0].parent) not in card and "/tmp" not in card
    assert 'from_pretrained("alice/my-merge")' in card and LOCAL_LOAD_HINT not in card
    # Auth: every Hub API call carried the token; the storage PUT (like S3) did not.
    for method, path, token in hub.requests:
        if path.startswith("/__lfs__/upload/"):
            assert token is None
        elif method in ("POST", "GET", "HEAD"):
            assert token == GOOD_TOKEN, (method, path)
    assert [p for _, p, _ in _writes(hub)].count("/api/models/alice/my-merge/commit/main") == 1
    assert hub.unhandled == []
    assert stages[0][0] == 0.0 and stages[-1] == (1.0, "pushed")
    assert GOOD_TOKEN not in caplog.text


def test_push_adapter_output_publishes_public_base_name(hub_env, adapter_output, tmp_path):
    import shutil

    hub = hub_env["hub"]
    src, base_dir = adapter_output
    folder = tmp_path / "my-adapter"
    shutil.copytree(src, folder)
    local_config = (folder / "adapter_config.json").read_text()
    assert str(base_dir) in local_config, "non-vacuous: PEFT recorded the local base path"

    result = push_folder(folder, "alice/my-adapter", token=GOOD_TOKEN, private=True)

    remote = hub.files("alice/my-adapter")
    assert hub.repos["alice/my-adapter"].private
    assert remote["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").read_bytes()
    assert remote["README.md"] == (folder / "README.md").read_bytes()
    # The published config names the base by its public name; the local file is untouched.
    pushed_config = remote["adapter_config.json"].decode()
    assert str(base_dir) not in pushed_config
    assert json.loads(pushed_config)["base_model_name_or_path"] == "tiny-base"
    assert pushed_config == local_config.replace(json.dumps(str(base_dir)), json.dumps("tiny-base"))
    assert (folder / "adapter_config.json").read_text() == local_config
    meta = hub.front_matter("alice/my-adapter")
    assert meta["base_model"] == DEMO_ID and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and {"weightsmith", "lora"} <= set(meta["tags"])
    assert 'PeftModel.from_pretrained(base, "alice/my-adapter")' in remote["README.md"].decode()
    assert result.commit_oid == hub.repos["alice/my-adapter"].branches["main"]
    assert hub.unhandled == []


def test_push_again_updates_existing_repo(hub_env, merge_output, tmp_path):
    hub = hub_env["hub"]
    folder = _fresh_merge(tmp_path, merge_output)
    first = push_folder(folder, "alice/again", token=GOOD_TOKEN)
    (folder / "notes.txt").write_text("second version\n")
    second = push_folder(folder, "alice/again", token=GOOD_TOKEN, commit_message="add notes")
    assert first.commit_oid != second.commit_oid
    assert hub.commits("alice/again")[-1].message == "add notes"
    assert hub.files("alice/again")["notes.txt"] == b"second version\n"
    assert len(hub.commits("alice/again")) == 3
    creates = [r for r in hub.requests if r[1] == "/api/repos/create"]
    assert len(creates) == 2  # the second create answered 409 and exist_ok carried on


def test_push_to_branch_and_as_pull_request(hub_env, merge_output, tmp_path):
    hub = hub_env["hub"]
    folder = _fresh_merge(tmp_path, merge_output)
    dev = push_folder(folder, "alice/branchy", token=GOOD_TOKEN, revision="dev")
    repo = hub.repos["alice/branchy"]
    assert repo.branches["dev"] == dev.commit_oid
    assert set(hub.files("alice/branchy", "main")) == {".gitattributes"}  # main untouched
    assert "README.md" in hub.files("alice/branchy", "dev")

    pr = push_folder(folder, "alice/branchy", token=GOOD_TOKEN, create_pr=True)
    assert pr.pr_url == f"{hub.url}/alice/branchy/discussions/1"
    assert repo.prs == [pr.commit_oid]
    assert set(hub.files("alice/branchy", "main")) == {".gitattributes"}
    assert hub.files("alice/branchy", "refs/pr/1")["README.md"] == (folder / "README.md").read_bytes()

    (folder / "notes.txt").write_text("review fix\n")
    fix = push_folder(folder, "alice/branchy", token=GOOD_TOKEN, revision="refs/pr/1")
    assert repo.prs == [fix.commit_oid] and set(repo.branches) == {"main", "dev"}  # no branch named refs/...
    assert hub.files("alice/branchy", "refs/pr/1")["notes.txt"] == b"review fix\n"
    assert hub.unhandled == []


# ---------------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------------
def test_dropped_upload_leaves_no_commit(hub_env, merge_output, tmp_path, monkeypatch, caplog):
    import types

    import huggingface_hub.utils._http as hf_http

    hub = hub_env["hub"]
    hub.create_repo("alice/dropped", "alice", private=False)
    before = [c.oid for c in hub.commits("alice/dropped")]
    folder = _fresh_merge(tmp_path, merge_output)
    shards = sorted(folder.glob("*.safetensors"))
    victim = shards[-1]
    hub.drop_uploads.add(hashlib.sha256(victim.read_bytes()).hexdigest())
    # The client retries a dropped connection 5 times with 1..8 s back-off: skip the waiting, keep the retries.
    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=lambda s: None))
    caplog.set_level(logging.DEBUG)

    with pytest.raises(WeightsmithError) as err:
        push_folder(folder, "alice/dropped", token=GOOD_TOKEN)

    message = str(err.value)
    assert victim.name in message and "nothing was committed" in message
    assert len(hub.dropped) == 6  # the first try and five retries, all cut off
    assert [c.oid for c in hub.commits("alice/dropped")] == before  # no commit, not even a partial one
    assert not any("/commit/" in p for _, p, _ in hub.requests)
    assert set(hub.files("alice/dropped")) == {".gitattributes"}
    assert GOOD_TOKEN not in message and GOOD_TOKEN not in caplog.text


def test_wrong_token_gets_clear_401_and_is_never_echoed(hub_env, merge_output, tmp_path, caplog, capsys):
    hub = hub_env["hub"]
    folder = _fresh_merge(tmp_path, merge_output)
    caplog.set_level(logging.DEBUG)

    with pytest.raises(WeightsmithError) as err:
        push_folder(folder, "alice/secret", token=BAD_TOKEN)

    message = str(err.value)
    assert message.startswith("the Hub rejected the token (401):")
    assert "\n" not in message
    # Non-vacuous: the server really answered 401 and echoed the token in its body.
    assert any(tok == BAD_TOKEN for _, _, tok in hub.requests) and hub.echo_token_in_errors
    for text in (message, repr(err.value), caplog.text, *capsys.readouterr()):
        assert BAD_TOKEN not in text
        assert BAD_TOKEN[3:] not in text
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert "alice/secret" not in hub.repos


def test_token_without_rights_gets_403_message(hub_env, merge_output, tmp_path):
    hub = hub_env["hub"]
    hub.create_repo("alice/theirs", "alice", private=False)
    folder = _fresh_merge(tmp_path, merge_output)
    with pytest.raises(WeightsmithError, match=r"may not write to alice/theirs \(403\)") as err:
        push_folder(folder, "alice/theirs", token=OTHER_TOKEN)
    assert OTHER_TOKEN not in str(err.value)
    assert len(hub.commits("alice/theirs")) == 1


def test_missing_token_is_a_clear_error_before_any_request(hub_env, merge_output, tmp_path):
    hub = hub_env["hub"]
    folder = _fresh_merge(tmp_path, merge_output)
    with pytest.raises(WeightsmithError, match="no Hugging Face token: .*HF_TOKEN"):
        push_folder(folder, "alice/none")
    assert hub.requests == []


def test_token_resolution_order(hub_env, monkeypatch):
    from huggingface_hub import constants

    Path(constants.HF_TOKEN_PATH).write_text("hf_StoredLoginToken0000000000")
    assert resolve_token(None) == "hf_StoredLoginToken0000000000"
    monkeypatch.setenv("HF_TOKEN", "hf_EnvToken000000000000000000")
    assert resolve_token(None) == "hf_EnvToken000000000000000000"
    assert resolve_token("  hf_Explicit000000000000000  ") == "hf_Explicit000000000000000"
    with pytest.raises(WeightsmithError, match="no Hugging Face token"):
        resolve_token(None, allow_ambient_token=False)
    with pytest.raises(WeightsmithError, match="mock sign-in token"):
        resolve_token(MOCK_OAUTH_TOKEN)


def test_push_uses_hf_token_from_environment(hub_env, merge_output, tmp_path, monkeypatch):
    hub = hub_env["hub"]
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    folder = _fresh_merge(tmp_path, merge_output)
    push_folder(folder, "alice/from-env")
    assert {tok for _, p, tok in hub.requests if p.startswith("/api/")} == {GOOD_TOKEN}


def test_token_for_push_ignores_local_mock_oauth_token():
    import gradio as gr

    mock = gr.OAuthToken(token=MOCK_OAUTH_TOKEN, scope="openid profile", expires_at=0)
    real = gr.OAuthToken(token="hf_oauth_RealToken123456", scope="openid profile write-repos", expires_at=0)
    assert token_for_push(mock, "") is None
    assert token_for_push(mock, " hf_typed123 ") == "hf_typed123"
    assert token_for_push(real, None) == "hf_oauth_RealToken123456"
    assert token_for_push(real, "hf_typed123") == "hf_typed123"  # what the user typed wins
    assert token_for_push(None, None) is None
    assert token_for_push(MOCK_OAUTH_TOKEN, None) is None


def test_scrub_removes_token_and_token_lookalikes():
    assert scrub(f"401: bad Bearer {BAD_TOKEN}.", BAD_TOKEN) == "401: bad Bearer ***."
    lookalike = "hf_" + "aB3" * 12
    assert scrub(f"leaked {lookalike} elsewhere") == "leaked hf_*** elsewhere"
    assert scrub("hf_transfer and hf_xet stay") == "hf_transfer and hf_xet stay"


def test_bad_folders_are_refused_before_any_request(hub_env, merge_output, tmp_path):
    hub = hub_env["hub"]
    folder = _fresh_merge(tmp_path, merge_output)
    card = (folder / "README.md").read_text()

    (folder / "README.md").unlink()
    with pytest.raises(WeightsmithError, match="no model card"):
        push_folder(folder, "alice/x", token=GOOD_TOKEN)

    (folder / "README.md").write_text(card.replace(f"- {DEMO_ID}", "- my-local-model"))
    with pytest.raises(WeightsmithError, match="base_model 'my-local-model' is not a Hub id"):
        push_folder(folder, "alice/x", token=GOOD_TOKEN)

    (folder / "README.md").write_text(card + f"\nTrained in {tmp_path}/runs.\n")
    with pytest.raises(WeightsmithError, match="README.md: names a local path"):
        push_folder(folder, "alice/x", token=GOOD_TOKEN)

    (folder / "README.md").write_text(card)
    with pytest.raises(WeightsmithError, match="not a valid Hub repo id"):
        push_folder(folder, "alice/bad name", token=GOOD_TOKEN)
    with pytest.raises(WeightsmithError, match="no such folder"):
        push_folder(tmp_path / "missing", "alice/x", token=GOOD_TOKEN)
    assert hub.requests == []


def test_offline_mode_refuses_to_push(hub_env, merge_output, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = _fresh_merge(tmp_path, merge_output)
    with pytest.raises(WeightsmithError, match="HF_HUB_OFFLINE=1 is set"):
        push_folder(folder, "alice/off", token=GOOD_TOKEN)
    assert hub_env["hub"].requests == []


def test_collect_files_skips_hidden_and_partial(tmp_path):
    folder = tmp_path / "out"
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("x")
    (folder / ".out.partial-1").mkdir()
    (folder / ".out.partial-1" / "a.safetensors").write_bytes(b"x")
    (folder / ".DS_Store").write_bytes(b"x")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.bin").write_bytes(b"\0\1")
    (folder / "README.md").write_text("---\ntags: [x]\n---\nhi\n")
    assert [name for name, _ in collect_files(folder)] == ["README.md", "sub/b.bin"]


# ---------------------------------------------------------------------------------------------
# the command line, in a fresh process (constants read from the environment at import)
# ---------------------------------------------------------------------------------------------
def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=120)


def test_cli_push_end_to_end(hub_env, merge_output, tmp_path):
    hub = hub_env["hub"]
    folder = _fresh_merge(tmp_path, merge_output)
    proc = _cli(["push", str(folder), "alice/cli-merge", "--private"], {**hub_env["env"], "HF_TOKEN": GOOD_TOKEN})
    assert proc.returncode == 0, proc.stderr
    oid = hub.repos["alice/cli-merge"].branches["main"]
    assert f"commit: {hub.url}/alice/cli-merge/commit/{oid}" in proc.stdout
    assert hub.repos["alice/cli-merge"].private
    remote = hub.files("alice/cli-merge")
    for name, data in _local_files(folder).items():
        assert remote[name] == data, name
    assert GOOD_TOKEN not in proc.stdout + proc.stderr


def test_cli_push_wrong_token_exits_2_with_one_line(hub_env, merge_output, tmp_path):
    folder = _fresh_merge(tmp_path, merge_output)
    proc = _cli(["push", str(folder), "alice/cli-bad", "--token", BAD_TOKEN], hub_env["env"])
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1]
    assert errors[0].startswith("weightsmith: error: the Hub rejected the token (401):")
    assert "httpx2" not in proc.stderr  # request lines stay out of the CLI unless -v
    assert BAD_TOKEN not in proc.stdout + proc.stderr
    assert "alice/cli-bad" not in hub_env["hub"].repos


def test_repo_id_without_namespace_goes_to_the_token_owner(hub_env, merge_output, tmp_path):
    hub = hub_env["hub"]
    folder = _fresh_merge(tmp_path, merge_output)
    result = push_folder(folder, "bare-name", token=GOOD_TOKEN)
    assert result.repo_url == f"{hub.url}/alice/bare-name"
    assert result.commit_oid == hub.repos["alice/bare-name"].branches["main"]
    assert 'from_pretrained("alice/bare-name")' in hub.files("alice/bare-name")["README.md"].decode()


def test_push_writes_a_given_card_into_a_folder_without_one(hub_env, merge_output, tmp_path):
    hub = hub_env["hub"]
    folder = _fresh_merge(tmp_path, merge_output)
    (folder / "README.md").unlink()
    push_folder(folder, "alice/uploaded", token=GOOD_TOKEN,
                card=CardInfo("uploaded", "finetune", [DEMO_ID], "An uploaded model, republished."))
    assert (folder / "README.md").exists()
    assert hub.files("alice/uploaded")["README.md"] == (folder / "README.md").read_bytes()
    assert hub.front_matter("alice/uploaded")["base_model_relation"] == "finetune"


def test_weights_go_through_xet_when_installed(hub_env, merge_output, tmp_path, monkeypatch):
    """push_folder leaves huggingface_hub's default on: with hf_xet installed, LFS files take the Xet path.

    The fake Hub has no Xet storage, so the client's Xet uploader is replaced by one that stores the bytes
    where the Hub's storage would have them; the commit must still be a single one.
    """
    import huggingface_hub._commit_api as commit_api
    from huggingface_hub import constants

    pytest.importorskip("hf_xet")
    hub = hub_env["hub"]
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    sent: list[str] = []

    def fake_xet_upload(*, additions, **kwargs):
        for op in additions:
            data = Path(op.path_or_fileobj).read_bytes()
            op.upload_info.sha256 = hashlib.sha256(data).digest()
            hub.lfs_store[op.upload_info.sha256.hex()] = data
            sent.append(op.path_in_repo)

    monkeypatch.setattr(commit_api, "_upload_xet_files", fake_xet_upload)
    folder = _fresh_merge(tmp_path, merge_output)
    push_folder(folder, "alice/xet", token=GOOD_TOKEN)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert sorted(sent) == shards
    assert not any(p.startswith("/__lfs__/upload/") or p.endswith("/objects/batch") for _, p, _ in hub.requests)
    assert len(hub.commits("alice/xet")) == 2
    assert {n: hub.files("alice/xet")[n] for n in shards} == {n: (folder / n).read_bytes() for n in shards}
