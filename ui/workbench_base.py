"""The app's server-side state: sessions mapped to private workspaces, the resolver policy, running jobs.

Each Gradio session is mapped (server-side) to its own workspace folder with an unguessable id
(:mod:`checkpoints.workspace`); a job runs registered so the session's Stop button can cancel it,
and holds its workspace so the age-based cleanup never removes it underneath.
The handlers (``ui.handlers_*``) are mixins over this base, assembled in :mod:`ui.workbench`.
"""

import gc
import threading
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from checkpoints.errors import WeightsmithError
from checkpoints.model_cache import ModelCache, release_memory, warm_imports
from checkpoints.sizes import format_size
from checkpoints.sources import resolve
from checkpoints.workspace import Workspace, WorkspaceConfig, WorkspaceManager, folder_bytes

from .config import AppConfig, workspace_root
from .progress import StopEvents


def session_key(request: Any) -> str:
    key = getattr(request, "session_hash", None)
    if not key:
        raise WeightsmithError("no session: open the app in a browser or use gradio_client")
    return str(key)


class WorkbenchBase:
    """Sessions, workspaces, policy and jobs; one per server, holding the per-server caches explicitly."""

    def __init__(self, config: AppConfig | None = None):
        self.config = config or AppConfig()
        root = workspace_root(self.config)
        self.workspaces = WorkspaceManager(WorkspaceConfig(
            root=Path(root), max_age_seconds=self.config.workspace_max_age,
            max_bytes=self.config.workspace_max_bytes))
        warm_imports()  # before any request thread imports transformers
        # The imported libraries are ~0.44 M long-lived objects that every full collection walks again: the
        # gc.collect of each job's release_memory() and the automatic ones during an edit (measured: 2.5 s
        # each on a loaded 2-core machine, 0 s once frozen), time the library alone does not spend.
        # Frozen, collections walk only what requests allocate; these objects live as long as the server.
        # Once per process, garbage first: a frozen object in a cycle is never freed, and a test process
        # builds many workbenches beside models that are dropped later.
        if not gc.get_freeze_count():
            gc.collect()
            gc.freeze()
        self.models = ModelCache(max_models=self.config.max_loaded_models, device=self.config.device)
        # Base + adapter, merged for the Playground: one at a time, each is a full model copy.
        self.adapter_models = ModelCache(max_models=1, device=self.config.device)
        self.jobs = StopEvents()
        self._sessions: dict[str, str] = {}  # gradio session hash -> workspace id (never sent to the browser)
        self._edit_sessions: dict[str, tuple[str, Any]] = {}  # workspace id -> (model, EditSession)
        self.stats = None
        try:
            from editing.stats import StatsCache

            # On disk, keyed by (model, layer, corpus): sessions share it safely.
            self.stats = StatsCache(self.config.stats_root)
        except ImportError:
            pass
        self._lock = threading.Lock()
        self._last_cleanup = 0.0

    # ---- sessions and workspaces -------------------------------------------
    def workspace(self, request: Any) -> Workspace:
        """This session's workspace, created on first use (and again after it expired)."""
        key = session_key(request)
        self._maybe_cleanup()
        with self._lock:
            ws = self.workspaces.get_or_create(self._sessions.get(key))
            self._sessions[key] = ws.id
        return ws

    def _maybe_cleanup(self) -> None:
        now = time.time()
        with self._lock:  # one request runs the cleanup; the others go on
            if now - self._last_cleanup < self.config.cleanup_every:
                return
            self._last_cleanup = now
        removed = set(self.workspaces.cleanup(now=now))
        if removed:
            with self._lock:
                for k in [k for k, v in self._sessions.items() if v in removed]:
                    del self._sessions[k]
                for ws_id in removed:
                    self._edit_sessions.pop(ws_id, None)  # frees that session's edited model copy

    def end_session(self, request: gr.Request) -> None:
        """The browser tab closed: free its edited model now; its files go with the age-based cleanup."""
        key = getattr(request, "session_hash", None)
        if key:
            with self._lock:
                ws_id = self._sessions.pop(str(key), None)
                if ws_id:
                    self._edit_sessions.pop(ws_id, None)

    def ref(self, ws: Workspace, ref: str) -> str:
        """A user's model reference -> what the resolver accepts, under this server's policy."""
        return ws.resolve_ref(ref, allow_paths=self.config.allow_paths, allow_hub=self.config.allow_hub,
                              named=self.config.named_models)

    def policy(self, ws: Workspace, *, allow_hub: bool | None = None) -> dict:
        """The resolver's policy for this session, passed to every library call that reads a model.

        With local paths off, only ``demo``, Hub ids (downloaded, never looked up on this disk) and
        folders inside the trusted roots are read: this session's workspace and the models the
        operator named.
        """
        return dict(allow_hub=self.config.allow_hub if allow_hub is None else allow_hub, **self.local_policy(ws))

    def local_policy(self, ws: Workspace) -> dict:
        """The part of :meth:`policy` for library calls that take no ``allow_hub`` (merges, uploads)."""
        return dict(allow_local=self.config.allow_paths,
                    trusted_roots=(ws.items_dir, *(Path(p) for p in self.config.named_models.values())))

    def checkpoint(self, ws: Workspace, ref: str, **policy):
        """A user's model reference resolved under this server's policy."""
        return resolve(self.ref(ws, ref), **{**self.policy(ws), **policy})

    def model_choices(self, request: Any, kind: str = "model") -> list[str]:
        ws = self.workspace(request)
        base = ["demo", *self.config.named_models] if kind == "model" else []
        return base + [i.ref for i in ws.items(kind)]

    def all_item_choices(self, request: Any) -> list[str]:
        return [i.ref for i in self.workspace(request).items()]

    def workspace_table(self, request: Any) -> list[list[Any]]:
        ws = self.workspace(request)
        return [[i.ref, i.kind, i.origin, format_size(folder_bytes(ws.item_path(i.name)))]
                for i in ws.items()]

    # ---- jobs -----------------------------------------------------------------------
    def stop(self, request: gr.Request) -> str:
        stopped = self.jobs.stop(session_key(request))
        return "Stopping…" if stopped else "Nothing to stop."

    def run_job(self, request: Any, fn: Callable[[threading.Event], Any]) -> Any:
        """Run ``fn(cancel_event)`` registered so this session's Stop button can cancel it.

        The session's workspace is held meanwhile: the age-based cleanup never removes it under a running job.
        """
        key = session_key(request)
        with self._lock:
            ws_id = self._sessions.get(key)
        ev = self.jobs.start(key)
        try:
            with self.workspaces.hold(ws_id or ""):
                return fn(ev)
        finally:
            self.jobs.finish(key, ev)
            release_memory()  # a job's tensors go back to the system, not to a worker thread's malloc arena
