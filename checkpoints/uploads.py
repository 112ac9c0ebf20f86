"""Turn files a user uploaded into a model or adapter folder in their workspace.

Accepted uploads (several files at once, or one zip holding them):

* a model: ``*.safetensors`` (one file or shards with ``model.safetensors.index.json``)
  plus ``config.json`` and tokenizer files; a bare weights file may take its
  config and tokenizer from ``config_from`` (e.g. ``demo``);
* a PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``;
* a ``.gguf`` file, converted once into a float32 Hugging Face folder.

Safety: only known file types are accepted (no pickles, no code); zip member
names are checked so none can escape the target folder (absolute names, ``..``,
symlinks, drive letters, names given twice, names that are not UTF-8 are refused);
the unpacked size is capped and so is the compression ratio, so a zip bomb stops
with a clear error, as does a damaged member (bad CRC); every file the checkpoint
names must lie inside the upload; everything is staged in the workspace's scratch
folder and renamed into place only when it checks out.

Example::

    item = import_upload(ws, ["/tmp/upl/adapter_config.json", "/tmp/upl/adapter_model.safetensors"], name="french")
    item.kind, item.ref   # ("adapter", "ws:french")
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable

from .containment import member_path
from .errors import WeightsmithError
from .peft_adapter import CONFIG_NAME as ADAPTER_CONFIG
from .peft_adapter import WEIGHTS_NAME as ADAPTER_WEIGHTS
from .peft_adapter import is_adapter_folder, load_adapter_folder
from .workspace import Workspace, safe_item_name

log = logging.getLogger(__name__)

ALLOWED_SUFFIXES = {".safetensors", ".json", ".gguf", ".model", ".txt", ".jinja", ".md", ".yaml", ".yml"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}
# Zip members that archivers add and nobody wants.
_JUNK = ("__MACOSX/", ".DS_Store")
MAX_ZIP_MEMBERS = 10_000
# Weights hardly compress (~1.1:1), JSON and tokenizers ~5-10:1; far beyond that is a bomb.
MAX_RATIO = 100
_RATIO_MIN_BYTES = 2**20  # small members may compress well (e.g. a config of spaces): not worth a refusal
_UTF8_FLAG = 0x800  # general purpose bit 11: the name is UTF-8


@dataclass
class ImportedUpload:
    """What an upload became: an item of the workspace."""

    name: str
    kind: str  # model | adapter
    path: Path
    files: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"ws:{self.name}"


def _member_name(info: zipfile.ZipInfo) -> str:
    """The member's name as UTF-8 text; one clear error when it is not."""
    name = info.filename
    if not info.flag_bits & _UTF8_FLAG:
        # zipfile decoded the raw bytes as cp437; many archivers write UTF-8 without setting the flag.
        try:
            name = name.encode("cp437").decode("utf-8")
        except UnicodeError:
            raise WeightsmithError(
                f"zip member {info.filename!r}: its name is not UTF-8 text, refused (re-create the zip)"
            ) from None
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise WeightsmithError(f"zip member {name!r}: control characters in its name, refused")
    return name


def _check_member_name(name: str) -> PurePosixPath | None:
    """The safe relative path of a zip member, ``None`` for junk/dirs; raises on a dangerous name."""
    if name.endswith("/") or any(j in name for j in _JUNK):
        return None
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise WeightsmithError(f"zip member {name!r}: absolute or Windows path, refused")
    parts = PurePosixPath(name).parts
    if not parts or any(p in ("..", "") for p in parts):
        raise WeightsmithError(f"zip member {name!r}: leaves the folder ('..'), refused")
    return PurePosixPath(*[p for p in parts if p != "."])


def safe_extract_zip(zip_path: Path, dest: Path, *, max_bytes: int | None) -> list[Path]:
    """Extract ``zip_path`` into ``dest`` refusing traversal, symlinks, duplicates, bombs and damage.

    Every refusal is one :class:`WeightsmithError`; the caller removes ``dest`` then
    (nothing of a refused zip is kept).
    """
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise WeightsmithError(f"{zip_path.name}: not a valid zip file") from None
    out = []
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise WeightsmithError(f"{zip_path.name}: more than {MAX_ZIP_MEMBERS} files, refused")
        total = sum(i.file_size for i in infos)
        if max_bytes is not None and total > max_bytes:
            raise WeightsmithError(
                f"{zip_path.name}: unpacks to {total / 2**20:.0f} MB, over the {max_bytes / 2**20:.0f} MB limit"
            )
        seen: set[PurePosixPath] = set()
        for info in infos:
            name = _member_name(info)
            rel = _check_member_name(name)
            if rel is None:
                continue
            if rel in seen:
                raise WeightsmithError(f"zip member {name!r}: the zip holds it twice, refused")
            seen.add(rel)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise WeightsmithError(f"zip member {name!r}: symbolic link, refused")
            _check_suffix(rel.name)
            if info.file_size > _RATIO_MIN_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise WeightsmithError(
                    f"zip member {name!r}: compressed {info.file_size // max(info.compress_size, 1)}:1, "
                    f"over the {MAX_RATIO}:1 a checkpoint can reach (a zip bomb?), refused"
                )
            target = (dest / rel).resolve()
            if root not in target.parents:
                raise WeightsmithError(f"zip member {name!r}: leaves the folder, refused")
            out.append(_extract_member(zf, info, name, target, max_bytes))
    return out


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, target: Path,
                    max_bytes: int | None) -> Path:
    written = 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as dst:
            # Count real bytes: the header's file_size may lie.
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > info.file_size or (max_bytes is not None and written > max_bytes):
                    raise WeightsmithError(f"zip member {name!r}: larger than declared, refused")
                dst.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        # zipfile checks each member's CRC-32 as it reads it ("Bad CRC-32 for file ...").
        why = "bad CRC-32" if "CRC" in str(e) else "damaged data"
        raise WeightsmithError(f"zip member {name!r}: {why}; the zip is damaged, re-create it") from None
    except NotImplementedError:
        raise WeightsmithError(f"zip member {name!r}: unsupported compression method, refused") from None
    except RuntimeError:  # "File ... is encrypted, password required"
        raise WeightsmithError(f"zip member {name!r}: encrypted, refused") from None
    except OSError as e:
        raise WeightsmithError(f"zip member {name!r}: cannot unpack ({e.strerror or type(e).__name__})") from None
    return target


def _check_suffix(filename: str) -> None:
    suffix = Path(filename).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise WeightsmithError(f"{filename}: pickled weights are not accepted as uploads; upload .safetensors")
    if suffix not in ALLOWED_SUFFIXES and suffix != ".zip":
        raise WeightsmithError(
            f"{filename}: unsupported file type {suffix or '(none)'!r} "
            "(upload .safetensors + config.json, a PEFT adapter, a .gguf file, or a zip of them)"
        )


def _content_root(folder: Path) -> Path:
    """The one folder that holds the checkpoint files (a zip often wraps them in a folder)."""
    markers = (ADAPTER_CONFIG, "config.json", "*.safetensors", "*.gguf")
    dirs = set()
    for pattern in markers:
        dirs.update(p.parent for p in folder.rglob(pattern) if p.is_file())
    if not dirs:
        raise WeightsmithError(
            "upload holds no weights: expected .safetensors (+ config.json), adapter files, or a .gguf"
        )
    if len(dirs) > 1:
        names = sorted(str(d.relative_to(folder)) or "." for d in dirs)
        raise WeightsmithError(f"upload holds several checkpoints ({', '.join(names[:4])}); upload one at a time")
    return dirs.pop()


def _classify(folder: Path) -> str:
    if is_adapter_folder(folder):
        return "adapter"
    ggufs = list(folder.glob("*.gguf"))
    if ggufs:
        if len(ggufs) > 1 or any(folder.glob("*.safetensors")):
            raise WeightsmithError("upload one .gguf file on its own")
        return "gguf"
    return "model"


def _check_adapter(folder: Path) -> None:
    """Read the uploaded adapter as every adapter is read: config, factors, containment, one line on error."""
    if not (folder / ADAPTER_WEIGHTS).exists():
        raise WeightsmithError(f"adapter upload needs {ADAPTER_WEIGHTS} next to {ADAPTER_CONFIG}")
    load_adapter_folder(folder, name="upload")


def import_upload(workspace: Workspace, files: Iterable[str | Path], *, name: str | None = None,
                  config_from: str | None = None, max_unpacked_bytes: int | None = None,
                  allow_local: bool = True, trusted_roots: Iterable[Path] = ()) -> ImportedUpload:
    """Import uploaded ``files`` as one workspace item; return what it became.

    ``name``: the item's name (default: from the files). ``config_from``: a
    resolvable model whose config and tokenizer a bare ``.safetensors`` takes,
    resolved under ``allow_local``/``trusted_roots`` (see :func:`checkpoints.sources.resolve`;
    the workspace is always trusted).
    ``max_unpacked_bytes``: cap on what a zip may unpack to (default: the
    workspace quota). Raises :class:`WeightsmithError` with one line; on error
    nothing is left in the workspace.
    """
    paths = [Path(f) for f in files if f]
    if not paths:
        raise WeightsmithError("no files uploaded")
    names = [p.name for p in paths]
    for p in paths:
        if not p.is_file():
            raise WeightsmithError(f"{p.name}: upload is missing on the server (try again)")
        _check_suffix(p.name)
        if names.count(p.name) > 1:
            raise WeightsmithError(f"{p.name}: uploaded twice; upload each file once")
    incoming = sum(p.stat().st_size for p in paths)
    workspace.check_quota(incoming)
    cap = max_unpacked_bytes if max_unpacked_bytes is not None else workspace.config.max_bytes

    staging = workspace.tmp_dir / f"upload-{secrets.token_hex(6)}"
    staging.mkdir(parents=True)
    try:
        for p in paths:
            if p.suffix.lower() == ".zip":
                safe_extract_zip(p, staging, max_bytes=cap)
            else:
                # Only the base name: an upload's own path says nothing about where it goes.
                shutil.copyfile(p, staging / Path(p.name).name)
        root = _content_root(staging)
        kind = _classify(root)
        default = name or (paths[0].stem if len(paths) == 1 else root.name if root != staging else "upload")
        target = workspace.new_item_dir(safe_item_name(name or default, default="upload"))
        if kind == "gguf":
            from .gguf_convert import convert_gguf

            gguf = member_path(root, next(root.glob("*.gguf")).name, owner="upload")
            convert_gguf(gguf, out_dir=target)
            kind = "model"
        elif kind == "adapter":
            _check_adapter(root)
            os.rename(root, target)  # same filesystem: the item appears complete or not at all
        else:
            if not (root / "config.json").exists():
                if not config_from:
                    raise WeightsmithError(
                        "model upload has no config.json: add it (and the tokenizer files), "
                        "or choose a base model to take them from"
                    )
                _copy_support_from(config_from, root, allow_local=allow_local,
                                   trusted_roots=(workspace.path, *trusted_roots))
            from .sources import resolve

            resolve(str(root)).check_matches_config()
            os.rename(root, target)
        item = workspace.register(target.name, kind=kind, origin="upload",
                                  details={"files": sorted(p.name for p in target.iterdir())})
        log.info("imported upload as %s item %s", kind, item.name)
        return ImportedUpload(item.name, kind, target, item.details["files"])
    except OSError as e:  # disk full, permissions: one line, and nothing kept
        if "target" in locals() and target.exists():
            shutil.rmtree(target, ignore_errors=True)
        raise WeightsmithError(f"upload: cannot store the files ({e.strerror or type(e).__name__})") from None
    except BaseException:
        if "target" in locals() and target.exists():
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_support_from(config_from: str, folder: Path, *, allow_local: bool, trusted_roots: Iterable[Path]) -> None:
    from .sources import resolve
    from .tensors import SUPPORT_FILES

    base = resolve(config_from, allow_local=allow_local, trusted_roots=tuple(trusted_roots))
    for fname in SUPPORT_FILES:
        if (base.support_dir / fname).exists() and not (folder / fname).exists():
            shutil.copyfile(member_path(base.support_dir, fname, owner=base.name), folder / fname)
