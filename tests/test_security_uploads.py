"""Hostile uploads (issue 11): each gives one clear line, and nothing is half-imported."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from checkpoints.errors import WeightsmithError
from checkpoints.uploads import import_upload
from checkpoints.workspace import WorkspaceConfig, WorkspaceManager

SERVER_FILE = Path("/etc/passwd")


@pytest.fixture
def ws(tmp_path):
    manager = WorkspaceManager(WorkspaceConfig(root=tmp_path / "ws", max_age_seconds=60, max_bytes=50 * 2**20))
    return manager.create()


def adapter_members() -> dict[str, bytes]:
    g = torch.Generator().manual_seed(0)
    weights = {"base_model.model.x.lora_A.weight": torch.randn(2, 8, generator=g),
               "base_model.model.x.lora_B.weight": torch.randn(8, 2, generator=g)}
    return {"adapter_config.json": json.dumps({"r": 2, "lora_alpha": 4, "peft_type": "LORA"}).encode(),
            "adapter_model.safetensors": save(weights)}


def make_zip(path: Path, members: list[tuple[str, bytes]], *, compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def patch(path: Path, old: bytes, new: bytes) -> None:
    raw = path.read_bytes()
    assert len(old) == len(new) and raw.count(old) >= 1
    path.write_bytes(raw.replace(old, new))


def refused(ws, files, match: str) -> str:
    with pytest.raises(WeightsmithError, match=match) as e:
        import_upload(ws, files)
    msg = str(e.value)
    assert "\n" not in msg and str(ws.path) not in msg
    # nothing half-imported: no item, no item folder, no scratch left behind
    assert ws.items() == [] and _listing(ws.items_dir) == [] and _listing(ws.tmp_dir) == []
    return msg


def _listing(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.exists() else []


def test_good_zip_imports(ws, tmp_path):
    """Non-vacuity: the same adapter zipped plainly imports, with and without compression."""
    members = list(adapter_members().items())
    for comp in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        item = import_upload(ws, [make_zip(tmp_path / f"ok{comp}.zip", members, compression=comp)])
        assert item.kind == "adapter" and sorted(item.files) == ["adapter_config.json", "adapter_model.safetensors"]


def test_damaged_crc_is_one_line(ws, tmp_path):
    """Before: zipfile's BadZipFile escaped ("internal error in upload")."""
    members = adapter_members()
    z = make_zip(tmp_path / "crc.zip", list(members.items()), compression=zipfile.ZIP_STORED)
    data = members["adapter_model.safetensors"]
    patch(z, data[-8:], bytes(b ^ 0xFF for b in data[-8:]))
    refused(ws, [z], r"zip member 'adapter_model.safetensors': bad CRC-32; the zip is damaged")


def test_damaged_deflate_stream_is_one_line(ws, tmp_path):
    z = make_zip(tmp_path / "deflate.zip", list(adapter_members().items()))
    raw = bytearray(z.read_bytes())
    start = raw.index(b"adapter_model.safetensors") + len("adapter_model.safetensors")
    for i in range(start + 20, start + 60):
        raw[i] ^= 0x5A
    z.write_bytes(bytes(raw))
    refused(ws, [z], r"zip member 'adapter_model.safetensors': (bad CRC-32|damaged data)")


def test_zip_bomb_by_ratio(ws, tmp_path):
    """Before: 40 MB of spaces (40 KB compressed) unpacked as long as it fit the quota."""
    members = [*adapter_members().items(), ("README.md", b" " * 40 * 2**20)]
    z = make_zip(tmp_path / "bomb.zip", members)
    assert z.stat().st_size < 2**20
    refused(ws, [z], r"zip member 'README.md': compressed \d+:1, over the 100:1 .* \(a zip bomb\?\)")


def test_duplicate_member_names(ws, tmp_path):
    """Before: the second adapter_config.json silently replaced the first."""
    members = adapter_members()
    z = tmp_path / "dup.zip"
    with pytest.warns(UserWarning, match="Duplicate name"):
        make_zip(z, [*members.items(), ("adapter_config.json", b'{"r": 64, "peft_type": "LORA"}')])
    refused(ws, [z], r"zip member 'adapter_config.json': the zip holds it twice")
    z2 = make_zip(tmp_path / "dup2.zip", [*members.items(), ("./adapter_config.json", b"{}")])
    refused(ws, [z2], "holds it twice")


def test_non_utf8_member_name(ws, tmp_path):
    """Before: a Latin-1 name was accepted as cp437 mojibake."""
    members = list(adapter_members().items())
    z = make_zip(tmp_path / "latin1.zip", [*members, ("notes-XXXX.md", b"hello")])
    patch(z, b"notes-XXXX.md", b"notes-\xe9t\xe9s.md")
    refused(ws, [z], "its name is not UTF-8 text")


def test_utf8_name_without_the_flag_is_read_as_utf8(ws, tmp_path):
    """Non-vacuity: archivers that write UTF-8 without setting the flag are fine."""
    members = list(adapter_members().items())
    z = make_zip(tmp_path / "utf8.zip", [*members, ("rXXadme.md", b"hello")])
    patch(z, b"rXXadme.md", "réadme.md".encode())
    item = import_upload(ws, [z])
    assert "réadme.md" in item.files


def test_control_characters_and_symlinks(ws, tmp_path):
    members = list(adapter_members().items())
    refused(ws, [make_zip(tmp_path / "ctl.zip", [*members, ("a\x01b.md", b"x")])], "control characters")
    import stat

    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
        info = zipfile.ZipInfo("tokenizer.json")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, str(SERVER_FILE))
    refused(ws, [z], "symbolic link, refused")


def test_encrypted_member(ws, tmp_path):
    members = list(adapter_members().items())
    z = make_zip(tmp_path / "enc.zip", members, compression=zipfile.ZIP_STORED)
    raw = bytearray(z.read_bytes())
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.find(sig)
        while at >= 0:
            raw[at + flag_at] |= 0x01
            at = raw.find(sig, at + 4)
    z.write_bytes(bytes(raw))
    refused(ws, [z], "encrypted, refused")


def _sharded_zip(tmp_path: Path, src: Path, shard_name: str) -> Path:
    from test_security_resolver import _point_index_at, _sharded

    out = _sharded(src, tmp_path / "sharded")
    _point_index_at(out, shard_name)
    z = tmp_path / "model.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(out.iterdir()):
            zf.write(p, f"model/{p.name}")
    return z


@pytest.mark.parametrize("shard", [str(SERVER_FILE), "../../../../../../../../etc/passwd", "../outside.safetensors"])
def test_index_naming_files_outside_the_upload(ws, tmp_path, tiny_llama_dir, shard):
    """Before: '/etc/passwd' as a shard reached the header reader, whose error showed the file's size."""
    msg = refused(ws, [_sharded_zip(tmp_path, tiny_llama_dir, shard)],
                  rf"model.safetensors.index.json: entry '{shard}' is an absolute path or leaves the folder")
    assert str(SERVER_FILE.stat().st_size) not in msg


def test_same_file_uploaded_twice(ws, tmp_path):
    members = adapter_members()
    files = []
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for name, data in members.items():
            (tmp_path / d / name).write_bytes(data)
            files.append(tmp_path / d / name)
    refused(ws, files, "uploaded twice")


def test_adapter_config_of_the_wrong_type(ws, tmp_path):
    members = adapter_members()
    for i, bad in enumerate((b"[1]", b"\xff\xfe", b'{"r": 1, "r": 2}')):
        z = make_zip(tmp_path / f"cfg{i}.zip", [("adapter_config.json", bad),
                                                ("adapter_model.safetensors", members["adapter_model.safetensors"])])
        refused(ws, [z], "adapter_config.json: (expected a JSON object|corrupt JSON)")
