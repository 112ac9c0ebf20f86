"""Workspaces (per-session folders) and uploads: isolation, cleanup, quota, safe unpacking."""

from __future__ import annotations

import io
import json
import stat
import time
import zipfile
from pathlib import Path

import pytest

from checkpoints.errors import WeightsmithError
from checkpoints.sizes import parse_size
from checkpoints.uploads import import_upload, safe_extract_zip
from checkpoints.workspace import WorkspaceConfig, WorkspaceManager


@pytest.fixture
def manager(tmp_path):
    return WorkspaceManager(WorkspaceConfig(root=tmp_path / "ws", max_age_seconds=60, max_bytes=50 * 2**20))


def test_ids_are_unguessable_and_distinct(manager):
    a, b = manager.create(), manager.create()
    assert a.id != b.id and len(a.id) == 32
    assert a.path.parent == b.path.parent == manager.config.root
    assert manager.get(a.id).path == a.path


@pytest.mark.parametrize("bad", ["", None, "../x", "a" * 31, "a/b" + "c" * 29, "." * 32])
def test_get_rejects_malformed_ids(manager, bad):
    with pytest.raises(WeightsmithError, match="workspace"):
        manager.get(bad)


def test_item_names_cannot_escape(manager):
    ws = manager.create()
    for bad in ["../other", "..", "/etc", "a/b", "ws:../x", ".hidden", ""]:
        with pytest.raises(WeightsmithError, match="not a valid workspace item name"):
            ws.item_path(bad)
    assert ws.item_path("ws:good-name").name == "good-name"


def test_one_session_cannot_reach_anothers_items(manager):
    a, b = manager.create(), manager.create()
    d = a.new_item_dir("secret")
    d.mkdir()
    (d / "x.txt").write_text("mine")
    a.register("secret", kind="model", origin="merge")
    assert [i.name for i in a.items()] == ["secret"]
    assert b.items() == []
    with pytest.raises(WeightsmithError, match="no such item"):
        b.resolve_ref("ws:secret")
    with pytest.raises(WeightsmithError, match="no such item"):
        b.zip_item("secret")
    # An id of another workspace typed as a path is not a path when paths are off.
    with pytest.raises(WeightsmithError, match="server paths are off"):
        b.resolve_ref(str(d))


def test_resolve_ref_policy(manager, tmp_path):
    ws = manager.create()
    assert ws.resolve_ref("demo") == "demo"
    assert ws.resolve_ref("owner/model") == "owner/model"
    with pytest.raises(WeightsmithError, match="Hub ids are not allowed"):
        ws.resolve_ref("owner/model", allow_hub=False)
    with pytest.raises(WeightsmithError, match="server paths are off"):
        ws.resolve_ref(str(tmp_path))
    assert ws.resolve_ref(str(tmp_path), allow_paths=True) == str(tmp_path)
    assert ws.resolve_ref("tiny", named={"tiny": tmp_path}) == str(tmp_path)
    with pytest.raises(WeightsmithError, match="no model chosen"):
        ws.resolve_ref("  ")


def test_new_item_dir_suffixes(manager):
    ws = manager.create()
    a = ws.new_item_dir("my merge!")
    a.mkdir()
    b = ws.new_item_dir("my merge!")
    assert a.name == "my-merge" and b.name == "my-merge-2"


def test_cleanup_by_age(manager):
    old, fresh = manager.create(), manager.create()
    (old.path / ".last-used").write_text(str(time.time() - 3600))
    removed = manager.cleanup()
    assert removed == [old.id]
    assert not old.path.exists() and fresh.path.exists()
    with pytest.raises(WeightsmithError, match="expired"):
        manager.get(old.id)
    # A stray folder that is not a workspace id is left alone.
    stray = manager.config.root / "not-a-workspace"
    stray.mkdir()
    manager.cleanup(now=time.time() + 10**6)
    assert stray.exists()


def test_quota(tmp_path):
    m = WorkspaceManager(WorkspaceConfig(root=tmp_path / "ws", max_bytes=1000))
    ws = m.create()
    ws.check_quota(500)
    with pytest.raises(WeightsmithError, match="workspace full"):
        ws.check_quota(2000)


def test_parse_size():
    assert parse_size("2GiB") == 2 * 1024**3  # the one parser (checkpoints.sizes): binary with "i" ...
    assert parse_size("500MB") == 500 * 10**6  # ... decimal without
    assert parse_size(123) == 123
    assert parse_size(None) is None
    with pytest.raises(WeightsmithError, match="not a size"):
        parse_size("lots")


def test_zip_item_contains_files_not_metadata(manager):
    ws = manager.create()
    d = ws.new_item_dir("out")
    d.mkdir()
    (d / "config.json").write_text("{}")
    ws.register("out", kind="model", origin="merge")
    z = ws.zip_item("out")
    with zipfile.ZipFile(z) as zf:
        assert zf.namelist() == ["out/config.json"]


# ---- uploads ---------------------------------------------------------------

def _zip_bytes(members: dict[str, bytes], *, symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize("evil", ["../evil.json", "/abs.json", "a/../../evil.json", "C:/x.json", "a\\..\\b.json"])
def test_zip_traversal_refused(tmp_path, evil):
    z = tmp_path / "e.zip"
    z.write_bytes(_zip_bytes({evil: b"{}"}))
    with pytest.raises(WeightsmithError, match="refused"):
        safe_extract_zip(z, tmp_path / "out", max_bytes=None)
    assert not (tmp_path / "evil.json").exists()


def test_zip_symlink_and_bomb_refused(tmp_path):
    z = tmp_path / "s.zip"
    z.write_bytes(_zip_bytes({"ok.json": b"{}"}, symlink="link.json"))
    with pytest.raises(WeightsmithError, match="symbolic link"):
        safe_extract_zip(z, tmp_path / "o1", max_bytes=None)
    big = tmp_path / "b.zip"
    with zipfile.ZipFile(big, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", b"0" * 2_000_000)
    with pytest.raises(WeightsmithError, match="over the"):
        safe_extract_zip(big, tmp_path / "o2", max_bytes=1_000_000)


def test_upload_model_files(manager, tiny_llama_dir, tmp_path):
    ws = manager.create()
    files = [p for p in tiny_llama_dir.iterdir() if p.is_file()]
    item = import_upload(ws, files, name="tiny upload")
    assert item.kind == "model" and item.name == "tiny-upload"
    from checkpoints.sources import resolve

    ckpt = resolve(ws.resolve_ref(item.ref))
    assert ckpt.summary()["layers"] == 4
    assert [i.name for i in ws.items("model")] == ["tiny-upload"]
    assert not any(ws.tmp_dir.iterdir())  # staging removed


def test_upload_zip_wrapped_in_folder(manager, tiny_llama_dir, tmp_path):
    ws = manager.create()
    z = tmp_path / "model.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in tiny_llama_dir.iterdir():
            zf.write(p, f"wrapped/{p.name}")
    item = import_upload(ws, [z])
    assert item.kind == "model" and (item.path / "config.json").exists()


def test_upload_bare_weights_needs_config(manager, tiny_llama_dir, tmp_path):
    ws = manager.create()
    w = tmp_path / "ft.safetensors"
    w.write_bytes((tiny_llama_dir / "model.safetensors").read_bytes())
    with pytest.raises(WeightsmithError, match="no config.json"):
        import_upload(ws, [w])
    assert ws.items() == [] and not (ws.items_dir.exists() and any(ws.items_dir.iterdir()))
    item = import_upload(ws, [w], config_from=str(tiny_llama_dir))
    assert item.kind == "model" and (item.path / "config.json").exists()


def test_upload_adapter(manager, tmp_path):
    import torch
    from safetensors.torch import save_file

    ws = manager.create()
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "peft_type": "LORA"}))
    w = tmp_path / "adapter_model.safetensors"
    # A whole LoRA pair: uploads are validated like any adapter (a lone lora_A is refused).
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)}, str(w))
    item = import_upload(ws, [cfg, w], name="a1")
    assert item.kind == "adapter" and item.ref == "ws:a1"
    with pytest.raises(WeightsmithError, match="adapter_model.safetensors"):
        import_upload(ws, [cfg], name="a2")


def test_upload_refuses_pickles_and_unknown(manager, tmp_path):
    ws = manager.create()
    p = tmp_path / "pytorch_model.bin"
    p.write_bytes(b"x")
    with pytest.raises(WeightsmithError, match="pickled weights are not accepted"):
        import_upload(ws, [p])
    s = tmp_path / "run.sh"
    s.write_text("echo")
    with pytest.raises(WeightsmithError, match="unsupported file type"):
        import_upload(ws, [s])
    with pytest.raises(WeightsmithError, match="no files uploaded"):
        import_upload(ws, [])


def test_upload_sharded_model(manager, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import build_tiny_llama, save_model

    folder = tmp_path / "sharded"
    save_model(build_tiny_llama(0), folder, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    ws = manager.create()
    item = import_upload(ws, [p for p in folder.iterdir() if p.is_file()], name="sharded")
    from checkpoints.sources import resolve

    ckpt = resolve(ws.resolve_ref(item.ref))
    assert len(ckpt.files) == len(shards) and ckpt.summary()["layers"] == 4
    # A shard missing from the upload is named in the error, and nothing is kept.
    with pytest.raises(WeightsmithError, match="missing"):
        import_upload(ws, [p for p in folder.iterdir() if p.is_file() and p != shards[0]], name="broken")
    assert [i.name for i in ws.items()] == ["sharded"]


def test_upload_adapter_as_zip(manager, tmp_path):
    import torch
    from safetensors.torch import save_file

    src = tmp_path / "lora"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "peft_type": "LORA"}))
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 8), "base_model.model.x.lora_B.weight": torch.zeros(8, 2)},
              str(src / "adapter_model.safetensors"))
    z = tmp_path / "lora.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in src.iterdir():
            zf.write(p, f"my-lora/{p.name}")
        zf.writestr("__MACOSX/._junk", b"x")
    ws = manager.create()
    item = import_upload(ws, [z])
    assert item.kind == "adapter" and item.name == "lora"
    assert sorted(item.files) == ["adapter_config.json", "adapter_model.safetensors"]


def test_upload_gguf_is_converted_into_the_workspace(manager, tmp_path, monkeypatch):
    """The GGUF branch hands the file to the foundation's converter with the item folder as output."""
    import checkpoints.gguf_convert as gc

    seen = {}

    def fake_convert(gguf, *, cache_root=None, out_dir=None):
        seen["gguf"], seen["out"] = Path(gguf).name, out_dir
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(gc, "convert_gguf", fake_convert)
    g = tmp_path / "tiny.Q8_0.gguf"
    g.write_bytes(b"GGUF")
    ws = manager.create()
    item = import_upload(ws, [g], name="from-gguf")
    assert item.kind == "model" and seen["gguf"] == "tiny.Q8_0.gguf" and seen["out"] == ws.item_path("from-gguf")
    two = tmp_path / "b.gguf"
    two.write_bytes(b"GGUF")
    with pytest.raises(WeightsmithError, match="one .gguf"):
        import_upload(ws, [g, two])
