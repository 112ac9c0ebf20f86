"""Per-session workspaces for the web app: private folders for uploads and outputs.

Each browser session gets a :class:`Workspace`, a folder under one root whose
name is an unguessable id (``secrets.token_urlsafe``). A session only ever
holds its own id (in server-side state), and every name a user types is
mapped into that folder by :meth:`Workspace.item_path`, which refuses anything
that could step outside it. Nothing lists the root to users.

Items (models, adapters, results) live in ``<root>/<id>/items/<name>/`` with a
small ``.weightsmith-item.json`` describing them; zips for download go to
``<root>/<id>/exports/``. A user-visible reference to an item is
``ws:<name>``; :meth:`Workspace.resolve_ref` turns references into what the
library's resolver accepts, enforcing the server's policy on local paths.

Example::

    manager = WorkspaceManager(WorkspaceConfig(root=Path("/tmp/ws"), max_age_seconds=3600))
    ws = manager.create()
    out = ws.new_item_dir("my-merge")          # a fresh, empty folder name for an output
    ...                                         # write into out, then ws.register(out.name, kind="model", origin="merge")
    ws.resolve_ref("ws:my-merge", allow_paths=False)   # -> "/tmp/ws/<id>/items/my-merge"
    manager.cleanup()                           # removes workspaces idle for longer than max_age
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import threading
import time
import zipfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from .errors import WeightsmithError
from .refs import is_hub_id, join_lora_ref, split_lora_ref

log = logging.getLogger(__name__)

ITEM_META = ".weightsmith-item.json"
REF_PREFIX = "ws:"
ItemKind = Literal["model", "adapter", "other"]

# token_urlsafe(24) gives 32 chars of [A-Za-z0-9_-]; nothing else is ever a workspace id.
_WS_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")
# Item names are single path components a user can read and type.
_ITEM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
_TRASH = ".deleting-"  # an expired workspace renamed out of reach before its files are removed


def safe_item_name(name: str, *, default: str = "item") -> str:
    """A user-typed name made into a safe single path component (letters, digits, ``._-``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name or "").strip()).strip(".-_")[:80]
    return cleaned or default


def folder_bytes(path: Path) -> int:
    """Total size of the regular files under ``path`` (symlinks are not followed)."""
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:  # removed while we walked
            continue
    return total


@dataclass
class WorkspaceConfig:
    """Where workspaces live and how long / how large they may grow.

    ``max_age_seconds``: a workspace idle (not touched) for longer is deleted by
    :meth:`WorkspaceManager.cleanup`. ``max_bytes``: quota per workspace
    (``None`` = unlimited).
    """

    root: Path
    max_age_seconds: float = 3600.0
    max_bytes: int | None = 20 * 1024**3


@dataclass
class WorkspaceItem:
    """One entry of a workspace: a model or adapter folder (uploaded or produced)."""

    name: str
    kind: ItemKind
    origin: str  # upload | merge | mix | edit | ...
    created: float
    details: dict = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return REF_PREFIX + self.name


class Workspace:
    """One session's private folder. Create through :class:`WorkspaceManager`."""

    def __init__(self, ws_id: str, path: Path, config: WorkspaceConfig):
        self.id = ws_id
        self.path = path
        self.config = config

    @property
    def items_dir(self) -> Path:
        return self.path / "items"

    @property
    def exports_dir(self) -> Path:
        return self.path / "exports"

    @property
    def tmp_dir(self) -> Path:
        """Scratch space (uploads being unpacked); inside the workspace so it counts and is cleaned."""
        d = self.path / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def touch(self) -> None:
        """Mark the workspace as in use now (age-based cleanup counts from the last touch)."""
        (self.path / ".last-used").write_text(str(time.time()))

    def last_used(self) -> float:
        try:
            return float((self.path / ".last-used").read_text())
        except (OSError, ValueError):
            return self.path.stat().st_mtime

    # ---- names and paths -------------------------------------------------
    def item_path(self, name: str) -> Path:
        """The folder of item ``name``; refuses anything that is not one safe path component."""
        name = str(name)
        if name.startswith(REF_PREFIX):
            name = name[len(REF_PREFIX):]
        if not _ITEM_NAME.match(name) or name in (".", ".."):
            raise WeightsmithError(f"{name!r}: not a valid workspace item name (letters, digits, . _ -)")
        path = self.items_dir / name
        # Defence in depth: the resolved path must stay inside this workspace.
        if self.items_dir.resolve() not in path.resolve().parents:
            raise WeightsmithError(f"{name!r}: outside the workspace")
        return path

    def new_item_dir(self, wanted: str, *, default: str = "result") -> Path:
        """A not-yet-existing item folder path named after ``wanted`` (suffix -2, -3, ... if taken)."""
        base = safe_item_name(wanted, default=default)
        self.items_dir.mkdir(parents=True, exist_ok=True)
        candidate, n = base, 1
        while (self.items_dir / candidate).exists():
            n += 1
            candidate = f"{base}-{n}"
        return self.item_path(candidate)

    def register(self, name: str, *, kind: ItemKind, origin: str, details: dict | None = None) -> WorkspaceItem:
        """Write the item's description next to its files (the folder must exist).

        Every upload and result passes here, so this is where the quota holds: an item that takes
        the workspace over it is deleted again and the user gets one line.
        """
        path = self.item_path(name)
        if not path.is_dir():
            raise WeightsmithError(f"{name}: no such item in this workspace")
        limit = self.config.max_bytes
        if limit is not None and self.size_bytes() > limit:
            item_mb = folder_bytes(path) / 2**20
            shutil.rmtree(path, ignore_errors=True)
            raise WeightsmithError(
                f"workspace full: {path.name} ({item_mb:.0f} MB) would exceed the {limit / 2**20:.0f} MB quota, "
                "so it was not kept (delete items or download and start a new session)")
        item = WorkspaceItem(path.name, kind, origin, time.time(), details or {})
        (path / ITEM_META).write_text(json.dumps(asdict(item), indent=1))
        self.touch()
        return item

    def items(self, kind: ItemKind | None = None) -> list[WorkspaceItem]:
        """Registered items, newest first (optionally of one kind)."""
        out = []
        if not self.items_dir.is_dir():
            return out
        for meta in self.items_dir.glob(f"*/{ITEM_META}"):
            try:
                data = json.loads(meta.read_text())
                item = WorkspaceItem(**data)
            except (OSError, ValueError, TypeError):
                continue
            if kind is None or item.kind == kind:
                out.append(item)
        return sorted(out, key=lambda i: i.created, reverse=True)

    def item(self, name: str) -> WorkspaceItem:
        path = self.item_path(name)
        try:
            return WorkspaceItem(**json.loads((path / ITEM_META).read_text()))
        except (OSError, ValueError, TypeError):
            raise WeightsmithError(f"{path.name}: no such item in this workspace") from None

    def delete_item(self, name: str) -> None:
        path = self.item_path(name)
        if path.exists():
            shutil.rmtree(path)

    # ---- references --------------------------------------------------------
    def resolve_ref(self, ref: str, *, allow_paths: bool = False, allow_hub: bool = True,
                    named: dict[str, str | Path] | None = None) -> str:
        """Map what a user typed to what :func:`checkpoints.sources.resolve` accepts.

        * ``demo`` stays ``demo``; ``ws:<name>`` becomes this workspace's item folder;
        * a key of ``named`` (server-chosen models, e.g. an allowlist) becomes its path;
        * a Hub id ``owner/name`` stays as is (if ``allow_hub``);
        * anything else is a server-side path, allowed only with ``allow_paths``;
        * ``model+adapter`` (a LoRA input of a merge recipe) maps each side as above.
        """
        ref = str(ref or "").strip()
        if not ref:
            raise WeightsmithError("no model chosen")
        model, lora = split_lora_ref(ref)
        if lora is not None:  # a merge recipe's model+adapter: each side mapped on its own
            return join_lora_ref(*(self.resolve_ref(side, allow_paths=allow_paths, allow_hub=allow_hub, named=named)
                                   for side in (model, lora)))
        if ref == "demo":
            return ref
        if named and ref in named:
            return str(named[ref])
        if ref.startswith(REF_PREFIX):
            path = self.item_path(ref)
            if not path.is_dir():
                raise WeightsmithError(f"{ref}: no such item in this workspace (it may have expired)")
            self.touch()
            return str(path)
        if allow_paths and (ref.startswith(("/", "~", ".")) or Path(ref).expanduser().exists()):
            return ref
        if is_hub_id(ref):
            if not allow_hub:
                raise WeightsmithError(f"{ref}: Hub ids are not allowed on this server")
            return ref
        if allow_paths:
            return ref
        raise WeightsmithError(
            f"{ref}: not demo, a Hub id (owner/name) or a workspace item (ws:name); "
            "server paths are off (start with --allow-local-paths to allow them)"
        )

    # ---- size and export ---------------------------------------------------
    def size_bytes(self) -> int:
        return folder_bytes(self.path)

    def check_quota(self, extra_bytes: int = 0) -> None:
        """Raise when the workspace (plus ``extra_bytes`` about to be written) exceeds the quota."""
        limit = self.config.max_bytes
        if limit is None:
            return
        used = self.size_bytes()
        if used + extra_bytes > limit:
            raise WeightsmithError(
                f"workspace full: {(used + extra_bytes) / 2**20:.0f} MB of {limit / 2**20:.0f} MB "
                "(delete items or download and start a new session)"
            )

    def zip_item(self, name: str) -> Path:
        """Zip item ``name`` (its files, not the item description) into ``exports/<name>.zip``."""
        src = self.item_path(name)
        if not src.is_dir():
            raise WeightsmithError(f"{name}: no such item in this workspace")
        self.exports_dir.mkdir(parents=True, exist_ok=True)
        target = self.exports_dir / f"{src.name}.zip"
        # Only the newest zip is kept (the app hands each one to Gradio, which copies it into its cache):
        # the quota counts it, and older zips are removed once it is complete.
        old = [p for p in self.exports_dir.iterdir() if p.name != target.name]
        self.check_quota(folder_bytes(src) - sum(p.stat().st_size for p in old if p.is_file()))
        tmp = target.with_suffix(".zip.part")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            # Weights hardly compress; STORED keeps exports fast on a CPU-bound server.
            for path in sorted(src.rglob("*")):
                if path.is_file() and not path.is_symlink() and path.name != ITEM_META:
                    zf.write(path, f"{src.name}/{path.relative_to(src).as_posix()}")
        tmp.replace(target)
        for p in old:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        self.touch()
        return target


class WorkspaceManager:
    """Creates, finds and cleans up workspaces under ``config.root``.

    ``get`` only accepts ids this process handed out earlier or folders that
    exist under the root with a well-formed id; ids are never listed to users.

    Safe under concurrent requests: finding (and touching) a workspace and
    deciding to delete it happen under one lock, and a workspace held by a
    running job (:meth:`hold`) is never deleted, however long the job runs.
    """

    def __init__(self, config: WorkspaceConfig):
        self.config = config
        self.config.root = Path(config.root)
        self.config.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()  # workspace id -> running jobs using it

    @contextmanager
    def hold(self, ws_id: str) -> Iterator[None]:
        """Keep workspace ``ws_id`` out of cleanup while the block runs (a job reading or writing it)."""
        with self._lock:
            self._held[ws_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._held[ws_id] -= 1
                if self._held[ws_id] <= 0:
                    del self._held[ws_id]
                path = self.config.root / ws_id
                if ws_id and _WS_ID.match(ws_id) and path.is_dir():
                    Workspace(ws_id, path, self.config).touch()  # the job's end counts as use

    def create(self) -> Workspace:
        """A new empty workspace with a fresh unguessable id."""
        ws_id = secrets.token_urlsafe(24)
        path = self.config.root / ws_id
        path.mkdir(parents=True, exist_ok=False, mode=0o700)
        ws = Workspace(ws_id, path, self.config)
        ws.touch()
        log.info("created workspace %s…", ws_id[:6])
        return ws

    def get(self, ws_id: str | None) -> Workspace:
        """The workspace with this id; raises if the id is malformed or the workspace expired."""
        if not ws_id or not _WS_ID.match(str(ws_id)):
            raise WeightsmithError("no workspace for this session (reload the page)")
        path = self.config.root / ws_id
        if not path.is_dir():
            raise WeightsmithError("this session's workspace has expired (reload the page to start a new one)")
        return Workspace(ws_id, path, self.config)

    def get_or_create(self, ws_id: str | None) -> Workspace:
        """The session's workspace, or a new one when it has none yet or it expired."""
        with self._lock:  # cleanup cannot remove it between the check and the touch
            if ws_id and _WS_ID.match(str(ws_id)) and (self.config.root / ws_id).is_dir():
                ws = Workspace(ws_id, self.config.root / ws_id, self.config)
                ws.touch()
                return ws
        return self.create()

    def delete(self, ws_id: str) -> None:
        if ws_id and _WS_ID.match(str(ws_id)):
            shutil.rmtree(self.config.root / ws_id, ignore_errors=True)

    def cleanup(self, *, now: float | None = None) -> list[str]:
        """Delete workspaces idle for longer than ``max_age_seconds``; return the ids removed."""
        now = time.time() if now is None else now
        removed = []
        for path in self.config.root.iterdir():
            if path.name.startswith(_TRASH) and path.is_dir():  # left by an interrupted cleanup
                shutil.rmtree(path, ignore_errors=True)
                continue
            if not path.is_dir() or not _WS_ID.match(path.name):
                continue
            with self._lock:
                if self._held[path.name]:
                    continue
                try:
                    idle = now - Workspace(path.name, path, self.config).last_used()
                except OSError:
                    continue
                if idle <= self.config.max_age_seconds:
                    continue
                # Renamed under the lock (atomic): from here no request can find it; deleted outside the lock.
                trash = path.with_name(_TRASH + path.name)
                try:
                    path.rename(trash)
                except OSError:
                    continue
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(path.name)
        if removed:
            log.info("removed %d expired workspace(s)", len(removed))
        return removed
