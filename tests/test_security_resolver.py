"""Containment and the resolver's policy (issue 11).

A file a checkpoint names stays inside that checkpoint's folder after symlinks
are followed; errors never reveal a server file's path, size or contents; with
local paths off only ``demo``, Hub ids (downloaded, never looked up on disk) and
trusted folders (the session's workspace) are read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from checkpoints import sources
from checkpoints.errors import WeightsmithError
from checkpoints.refs import is_hub_id
from checkpoints.sources import resolve
from checkpoints.tensors import INDEX_NAME, ShardedWriter

SERVER_FILE = Path("/etc/passwd")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _sharded(src: Path, out: Path) -> Path:
    """``src`` rewritten as several shards with an index."""
    ck = resolve(src)
    with ShardedWriter(out, max_shard_bytes=20_000) as w:
        for name in ck.reader().keys():
            w.add(name, ck.reader().get(name, dtype=None))
        w.copy_support_files(ck.support_dir)
    return out


def _point_index_at(folder: Path, shard: str) -> None:
    index = json.loads((folder / INDEX_NAME).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (shard if v == first else v) for k, v in index["weight_map"].items()}
    (folder / INDEX_NAME).write_text(json.dumps(index))


def _no_leak(msg: str, *paths: Path) -> None:
    assert "\n" not in msg
    for p in paths:
        assert str(p.resolve()) not in msg and str(p) not in msg or p == SERVER_FILE
    size = SERVER_FILE.stat().st_size
    assert f"{size} bytes" not in msg and f" {size} " not in msg


# ---------------------------------------------------------------------------
# Containment: index shards, weight files, support files
# ---------------------------------------------------------------------------

def test_index_naming_a_server_file_leaks_nothing(tmp_path, tiny_llama_dir):
    """Before: '/etc/passwd' as a shard was opened and its size shown in the error."""
    folder = _sharded(tiny_llama_dir, tmp_path / "m")
    _point_index_at(folder, str(SERVER_FILE))
    with pytest.raises(WeightsmithError, match=r"entry '/etc/passwd' is an absolute path") as e:
        resolve(folder)
    _no_leak(str(e.value), tmp_path)


def test_index_with_dotdot_is_refused(tmp_path, tiny_llama_dir):
    """Before: '../other/model.safetensors' was read, so a merge exported tensors from elsewhere."""
    outside = _copy(tiny_llama_dir, tmp_path / "other")
    folder = _sharded(tiny_llama_dir, tmp_path / "m")
    _point_index_at(folder, "../other/model.safetensors")
    assert (folder / "../other/model.safetensors").is_file()  # the file is there to be stolen
    with pytest.raises(WeightsmithError, match=r"model.safetensors.index.json: entry '../other/model.safetensors'"):
        resolve(folder)
    assert outside.exists()


def test_symlinked_shard_leading_out_is_refused(tmp_path, tiny_llama_dir):
    folder = _sharded(tiny_llama_dir, tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    stolen = tmp_path / "secret.safetensors"
    shutil.copy(shard, stolen)
    shard.unlink()
    shard.symlink_to(stolen)
    with pytest.raises(WeightsmithError, match="points outside the checkpoint folder") as e:
        resolve(folder)
    _no_leak(str(e.value), stolen, tmp_path)


@pytest.mark.parametrize("target", [SERVER_FILE, Path("/nonexistent/x.safetensors")])
def test_symlinked_single_file_same_words_whether_or_not_target_exists(tmp_path, tiny_llama_dir, target):
    folder = _copy(tiny_llama_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(target)
    with pytest.raises(WeightsmithError) as e:
        resolve(folder)
    assert str(e.value) == "m: entry 'model.safetensors' points outside the checkpoint folder, refused"


def test_tokenizer_linked_to_a_server_file_is_never_copied(tmp_path, tiny_llama_family):
    """Before: tokenizer.json -> /etc/passwd was accepted, and a merge copied the server file into its output."""
    from merging.engine import run_merge
    from merging.recipe import MergeRecipe

    base = _copy(tiny_llama_family["base"], tmp_path / "base")
    (base / "tokenizer.json").unlink()
    (base / "tokenizer.json").symlink_to(SERVER_FILE)
    with pytest.raises(WeightsmithError, match="entry 'tokenizer.json' points outside"):
        resolve(base)
    recipe = MergeRecipe.from_yaml(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(tiny_llama_family["ft1"]), "parameters": {"weight": 1.0}}]}))
    with pytest.raises(WeightsmithError, match="tokenizer.json"):
        run_merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_links_inside_the_folder_and_the_hub_cache_are_fine(tmp_path, tiny_llama_dir):
    """Non-vacuity: a shard in a subfolder, a link within the folder, and the HF cache's links into blobs/ all load."""
    folder = _sharded(tiny_llama_dir, tmp_path / "m")
    shards = sorted(folder.glob("model-*.safetensors"))
    (folder / "sub").mkdir()
    shards[0].rename(folder / "sub" / shards[0].name)
    _point_index_at(folder, f"sub/{shards[0].name}")
    shards[1].rename(folder / "real.bin.safetensors")
    shards[1].symlink_to(folder / "real.bin.safetensors")
    want = resolve(tiny_llama_dir).reader()
    got = resolve(folder).reader()
    assert sorted(got.keys()) == sorted(want.keys())
    name = want.keys()[0]
    assert (got.get(name) == want.get(name)).all()

    # huggingface_hub cache layout: snapshots/<rev>/file -> ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(p for p in tiny_llama_dir.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    assert sorted(resolve(snap).reader().keys()) == sorted(want.keys())


def test_pickle_linked_out_is_refused(tmp_path, tiny_llama_dir):
    import torch

    folder = tmp_path / "p"
    folder.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", folder / "config.json")
    torch.save({"x": torch.zeros(1)}, tmp_path / "elsewhere.bin")
    (folder / "pytorch_model.bin").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(WeightsmithError, match="'pytorch_model.bin' points outside"):
        resolve(folder)


def test_errors_name_files_not_server_folders(tmp_path, tiny_llama_dir):
    """Before: a corrupt config or index was reported with its full server path."""
    folder = _copy(tiny_llama_dir, tmp_path / "deep" / "server" / "m")
    (folder / "config.json").write_text("{oops")
    with pytest.raises(WeightsmithError) as e:
        resolve(folder)
    assert str(e.value).startswith("m: config.json: corrupt JSON") and str(tmp_path) not in str(e.value)


# ---------------------------------------------------------------------------
# Policy: local paths off
# ---------------------------------------------------------------------------

@pytest.fixture()
def hub_calls(monkeypatch):
    """Record Hub downloads instead of making them (the Hub is never reached in tests)."""
    calls = []

    def fake(repo_id, **kw):
        calls.append(repo_id)
        raise WeightsmithError(f"{repo_id}: not in the local Hugging Face cache (test)")

    monkeypatch.setattr(sources, "download_from_hub", fake)
    return calls


def test_hub_shaped_name_is_never_read_from_disk(tmp_path, tiny_llama_dir, monkeypatch, hub_calls):
    """Before: 'models/secret' resolved to a folder under the server's working directory."""
    monkeypatch.chdir(tmp_path)
    _copy(tiny_llama_dir, tmp_path / "models" / "secret")
    assert resolve("models/secret").kind == "folder"  # the CLI (local paths on) still reads it
    with pytest.raises(WeightsmithError, match="not in the local Hugging Face cache"):
        resolve("models/secret", allow_local=False)
    assert hub_calls == ["models/secret"]
    with pytest.raises(WeightsmithError, match="Hub ids are not allowed"):
        resolve("models/secret", allow_local=False, allow_hub=False)
    assert hub_calls == ["models/secret"]


@pytest.mark.parametrize("ref", ["models", "./models/secret", "models/secret/", "../x", "/etc", "~/x",
                                 "models/secret/../secret", "a/b/c"])
def test_paths_refused_when_local_is_off(tmp_path, tiny_llama_dir, monkeypatch, hub_calls, ref):
    monkeypatch.chdir(tmp_path)
    _copy(tiny_llama_dir, tmp_path / "models" / "secret")
    with pytest.raises(WeightsmithError, match="local paths are not allowed here"):
        resolve(ref, allow_local=False)
    assert hub_calls == []


def test_trusted_roots_and_escapes_from_them(tmp_path, tiny_llama_dir, hub_calls):
    ws = tmp_path / "ws"
    item = _copy(tiny_llama_dir, ws / "items" / "mine")
    other = _copy(tiny_llama_dir, tmp_path / "other-session")
    assert resolve(str(item), allow_local=False, trusted_roots=[ws]).name == "mine"
    for ref in (str(other), f"{item}/../../../other-session"):
        with pytest.raises(WeightsmithError, match="local paths are not allowed here"):
            resolve(ref, allow_local=False, trusted_roots=[ws])
    (ws / "items" / "link").symlink_to(other)  # a link inside the workspace to another session
    with pytest.raises(WeightsmithError, match="local paths are not allowed here"):
        resolve(str(ws / "items" / "link"), allow_local=False, trusted_roots=[ws])
    # a bare weights file takes its config under the same policy
    with pytest.raises(WeightsmithError, match="local paths are not allowed here"):
        resolve(str(item / "model.safetensors"), config_from=str(other), allow_local=False, trusted_roots=[ws])
    assert hub_calls == []


def test_merge_with_local_paths_off_reads_no_disk_folder(tmp_path, tiny_llama_family, monkeypatch, hub_calls):
    from merging.engine import check_recipe, run_merge
    from merging.recipe import MergeRecipe

    monkeypatch.chdir(tmp_path)
    _copy(tiny_llama_family["ft1"], tmp_path / "models" / "secret")
    ws = tmp_path / "ws"
    base = _copy(tiny_llama_family["base"], ws / "items" / "base")
    recipe = MergeRecipe.from_yaml(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": "models/secret", "parameters": {"weight": 1.0}}]}))
    for call in (lambda: check_recipe(recipe, allow_local=False, trusted_roots=[ws]),
                 lambda: run_merge(recipe, ws / "items" / "out", allow_local=False, trusted_roots=[ws])):
        with pytest.raises(WeightsmithError, match="not in the local Hugging Face cache"):
            call()
    assert hub_calls == ["models/secret", "models/secret"] and not (ws / "items" / "out").exists()
    # non-vacuity: with local paths on (the CLI) the same recipe merges the local folder
    assert run_merge(recipe, tmp_path / "cli-out").tensors_changed > 0


# ---------------------------------------------------------------------------
# One Hub-id rule
# ---------------------------------------------------------------------------

def test_one_hub_id_rule():
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_id("a/b.c-d_e") and is_hub_id("models/secret")
    for bad in ("models/secret\n", "é/x", "a/b/c", "/abs/x", "./a", "a--b/c", "a/..", "a/b.git", "a/b.", "a/.b",
                "-a/b", "", "a/" + "x" * 97, None, 3):
        assert not is_hub_id(bad), bad
    # the cards use the very same rule as the resolver
    from checkpoints import cards

    assert cards.is_hub_id is is_hub_id


def test_third_party_errors_lose_the_server_folder(tmp_path, tiny_llama_dir):
    """A broken tokenizer or GGUF is reported by file name; transformers' own message carried the folder."""
    from checkpoints.gguf_convert import convert_gguf

    folder = _copy(tiny_llama_dir, tmp_path / "srv" / "m")
    (folder / "tokenizer.json").write_text("{broken")
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises(WeightsmithError, match="^m: cannot load tokenizer") as e:
        resolve(folder).load_tokenizer()
    assert str(tmp_path) not in str(e.value)
    g = tmp_path / "srv" / "bad.gguf"
    g.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(WeightsmithError, match="^bad.gguf: cannot read GGUF") as e:
        convert_gguf(g, out_dir=tmp_path / "out")
    assert str(tmp_path) not in str(e.value) and not (tmp_path / "out").exists()
