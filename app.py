"""Weightsmith web app (Gradio 6): a thin layer of widgets over the library.

Tabs: Models (sources, uploads, workspace), Merge, Adapters, Edit, Playground,
Export. Every action is also an API endpoint with a stable ``api_name``
(``merge``, ``mix_adapters``, ``trace``, ``edit``, ``evaluate``, ``generate``,
``export``, ``push``, plus ``inspect`` and ``upload``), callable from
``gradio_client``.

Many users: each Gradio session is mapped (server-side) to its own workspace
folder with an unguessable id (:mod:`checkpoints.workspace`); heavy jobs share
queue concurrency groups so two merges never run at once; long jobs report
progress and stop on the Stop button (the libraries take a ``threading.Event``);
library errors surface as one-line ``gr.Error`` messages and the server keeps
serving.

The handlers live on :class:`Workbench` so tests can call them directly with a
stand-in request (anything with a ``session_hash``).
"""

import functools
import inspect
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from checkpoints.errors import WeightsmithError
from checkpoints.generation import ModelCache, stream_text
from checkpoints.sources import resolve
from checkpoints.uploads import import_upload
from checkpoints.workspace import Workspace, WorkspaceConfig, WorkspaceManager, parse_size

log = logging.getLogger(__name__)

MODEL_FILE_TYPES = [".safetensors", ".json", ".gguf", ".model", ".txt", ".jinja", ".zip"]


@dataclass
class AppConfig:
    """Server policy and limits. Defaults suit a public Space; ``weightsmith serve`` maps its flags here.

    ``named_models``: extra models offered by name in every model picker
    (an allowlist of server folders, e.g. tiny models in tests), usable even
    when ``allow_paths`` is off.
    """

    allow_paths: bool = False
    allow_hub: bool = True
    named_models: dict[str, str] = field(default_factory=dict)
    workspace_root: Path | None = None
    workspace_max_age: float = 3600.0
    workspace_max_bytes: int | None = 20 * 1024**3
    max_file_size: str | int | None = "2gb"
    device: str = "cpu"
    max_loaded_models: int = 3
    heavy_concurrency: int = 1  # merges, mixes, edits at once (each may hold several models in memory)
    generate_concurrency: int = 2
    max_new_tokens: int = 256
    cleanup_every: float = 300.0


class UserError(gr.Error):
    """A library error shown in the page as one line."""


def user_errors(fn: Callable) -> Callable:
    """Turn :class:`WeightsmithError` (and unexpected failures) into ``gr.Error`` so the page shows one line.

    Keeps the signature (Gradio reads it to inject ``gr.Request`` / ``gr.Progress``)
    and works for plain functions and generators alike.
    """

    def _convert(e: BaseException) -> gr.Error:
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, WeightsmithError):
            return UserError(str(e))
        if isinstance(e, InterruptedError):
            return UserError(str(e) or "stopped")
        log.exception("unexpected error in %s", fn.__name__)
        return UserError(f"internal error in {fn.__name__}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - every failure becomes one message; the server stays up
                raise _convert(e) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise _convert(e) from None
    return wrapper


class Jobs:
    """Cancel flags of running jobs, per session: the Stop button sets them, the libraries poll them."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        with self._lock:
            ev = threading.Event()
            self._events[session] = ev
            return ev

    def finish(self, session: str, ev: threading.Event) -> None:
        with self._lock:
            if self._events.get(session) is ev:
                del self._events[session]

    def stop(self, session: str) -> bool:
        with self._lock:
            ev = self._events.get(session)
        if ev is not None:
            ev.set()
        return ev is not None


def progress_adapter(progress: Any) -> Callable[..., None]:
    """Map a library progress callback onto ``gr.Progress``.

    Accepts ``(done, total[, desc])``, ``(fraction[, desc])`` and keyword forms,
    so any of the libraries' callbacks can drive the bar.
    """

    def report(*args, **kwargs) -> None:
        if progress is None:
            return
        desc = kwargs.get("desc") or kwargs.get("message")
        nums = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        texts = [a for a in args if isinstance(a, str)]
        desc = desc or (texts[0] if texts else None)
        done = kwargs.get("done", nums[0] if nums else None)
        total = kwargs.get("total", nums[1] if len(nums) > 1 else None)
        try:
            if done is not None and total:
                progress(min(1.0, float(done) / float(total)), desc=desc)
            elif done is not None:
                progress(min(1.0, float(done)), desc=desc)
            elif desc:
                progress(0.0, desc=desc)
        except Exception:  # noqa: BLE001 - a progress display must never break a job
            log.debug("progress update failed", exc_info=True)

    return report


def _session_key(request: Any) -> str:
    key = getattr(request, "session_hash", None)
    if not key:
        raise WeightsmithError("no session: open the app in a browser or use gradio_client")
    return str(key)


def _md_table(rows: list[tuple[str, Any]]) -> str:
    out = ["| | |", "|---|---|"]
    for k, v in rows:
        out.append(f"| **{k}** | {v} |")
    return "\n".join(out)


class Workbench:
    """Every handler of the app. Build one per server; it holds the per-server caches explicitly."""

    def __init__(self, config: AppConfig | None = None):
        self.config = config or AppConfig()
        root = self.config.workspace_root or Path(tempfile.gettempdir()) / "weightsmith-workspaces"
        self.workspaces = WorkspaceManager(WorkspaceConfig(
            root=Path(root), max_age_seconds=self.config.workspace_max_age,
            max_bytes=self.config.workspace_max_bytes))
        self.models = ModelCache(max_models=self.config.max_loaded_models, device=self.config.device)
        self.jobs = Jobs()
        self._sessions: dict[str, str] = {}  # gradio session hash -> workspace id (never sent to the browser)
        self._lock = threading.Lock()
        self._last_cleanup = 0.0

    # ---- sessions and workspaces -------------------------------------------
    def workspace(self, request: Any) -> Workspace:
        """This session's workspace, created on first use (and again after it expired)."""
        key = _session_key(request)
        self._maybe_cleanup()
        with self._lock:
            ws = self.workspaces.get_or_create(self._sessions.get(key))
            self._sessions[key] = ws.id
        return ws

    def _maybe_cleanup(self) -> None:
        import time

        now = time.time()
        if now - self._last_cleanup < self.config.cleanup_every:
            return
        self._last_cleanup = now
        removed = set(self.workspaces.cleanup(now=now))
        if removed:
            with self._lock:
                for k in [k for k, v in self._sessions.items() if v in removed]:
                    del self._sessions[k]

    def end_session(self, request: Any) -> None:
        """Forget the session's mapping (its files go with the age-based cleanup)."""
        key = getattr(request, "session_hash", None)
        if key:
            with self._lock:
                self._sessions.pop(str(key), None)

    def ref(self, ws: Workspace, ref: str) -> str:
        """A user's model reference -> what the resolver accepts, under this server's policy."""
        return ws.resolve_ref(ref, allow_paths=self.config.allow_paths, allow_hub=self.config.allow_hub,
                              named=self.config.named_models)

    def model_choices(self, request: Any, kind: str = "model") -> list[str]:
        ws = self.workspace(request)
        base = ["demo", *self.config.named_models] if kind == "model" else []
        return base + [i.ref for i in ws.items(kind)]

    def all_item_choices(self, request: Any) -> list[str]:
        return [i.ref for i in self.workspace(request).items()]

    def workspace_table(self, request: Any) -> list[list[Any]]:
        from checkpoints.workspace import folder_bytes

        ws = self.workspace(request)
        return [[i.ref, i.kind, i.origin, f"{folder_bytes(ws.item_path(i.name)) / 2**20:.1f} MB"]
                for i in ws.items()]

    # ---- models panel ---------------------------------------------------------
    @user_errors
    def inspect(self, model: str, request: gr.Request) -> list[list[Any]]:
        """Architecture, parameters, dtype and layers of a model (``LocalCheckpoint.summary``)."""
        ws = self.workspace(request)
        ckpt = resolve(self.ref(ws, model), allow_hub=self.config.allow_hub)
        ckpt.check_matches_config()
        info = ckpt.summary()
        rows = []
        for key in ("name", "architecture", "parameters", "dtype", "layers", "hidden_size", "vocab_size", "source"):
            value = info.get(key)
            if key == "parameters":
                value = f"{value:,}"
            rows.append([key, str(value)])
        rows.append(["files", ", ".join(info.get("files", []))[:200]])
        return rows

    @user_errors
    def upload(self, files: list[str] | None, name: str, config_from: str, request: gr.Request) -> str:
        """Import uploaded files (model, adapter, GGUF, or a zip) into this session's workspace."""
        ws = self.workspace(request)
        paths = [f if isinstance(f, str) else getattr(f, "name", f) for f in (files or [])]
        cfg = self.ref(ws, config_from) if config_from else None
        item = import_upload(ws, paths, name=name or None, config_from=cfg)
        return f"Imported **{item.ref}** ({item.kind}): {', '.join(item.files)}"

    @user_errors
    def delete_item(self, ref: str, request: gr.Request) -> str:
        ws = self.workspace(request)
        ws.delete_item(ref)
        return f"Deleted {ref}"

    # ---- playground -------------------------------------------------------------
    @user_errors
    def generate(self, working: str, original: str, prompt: str, max_new_tokens: float,
                 request: gr.Request):
        """Stream continuations of ``prompt`` from the working model and the original, side by side."""
        ws = self.workspace(request)
        n = max(1, min(int(max_new_tokens), self.config.max_new_tokens))
        if not (prompt or "").strip():
            raise WeightsmithError("the prompt is empty")
        streams = []
        for ref in (working, original):
            if ref:
                loaded = self.models.get(self.ref(ws, ref), allow_hub=self.config.allow_hub)
                streams.append(stream_text(loaded, prompt, max_new_tokens=n, device=self.config.device))
            else:
                streams.append(iter(()))
        texts = ["", ""]
        active = [True, True]
        # Both generators run in their own threads; interleaving their outputs streams both panes at once.
        while any(active):
            for i, s in enumerate(streams):
                if not active[i]:
                    continue
                try:
                    texts[i] = next(s)
                except StopIteration:
                    active[i] = False
            yield texts[0], texts[1]

    # ---- export ------------------------------------------------------------------
    @user_errors
    def export(self, item: str, request: gr.Request) -> str:
        """Zip a workspace item for download; returns the zip's path (served as a file)."""
        ws = self.workspace(request)
        if not item:
            raise WeightsmithError("choose a workspace item to export")
        return str(ws.zip_item(item))

    @user_errors
    def card_preview(self, item: str, request: gr.Request) -> str:
        ws = self.workspace(request)
        if not item:
            return "Choose a workspace item to see its model card."
        path = ws.item_path(item)
        card = path / "README.md"
        if not card.exists():
            return f"*{path.name} has no model card (uploads have none); it will be pushed without one.*"
        return card.read_text()

    @user_errors
    def push(self, item: str, repo_id: str, private: bool, token: str, request: gr.Request,
             oauth_token: gr.OAuthToken | None = None, progress=gr.Progress()) -> str:
        """Push a workspace item to the Hub in one commit; returns the commit URL as Markdown."""
        from checkpoints import hub

        ws = self.workspace(request)
        if not item:
            raise WeightsmithError("choose a workspace item to push")
        if not (repo_id or "").strip():
            raise WeightsmithError("enter a Hub repo id (owner/name) to push to")
        folder = ws.item_path(item)
        if not folder.is_dir():
            raise WeightsmithError(f"{item}: no such item in this workspace")
        tok = hub.token_for_push(oauth_token, token or None)
        # On a Space the server's own HF_TOKEN must never publish on a visitor's behalf.
        result = hub.push_folder(folder, repo_id.strip(), token=tok, private=bool(private),
                                 progress=progress_adapter(progress),
                                 allow_ambient_token=not hub.running_on_space())
        return f"Pushed to [{repo_id.strip()}]({result.commit_url})"

    # ---- stop ----------------------------------------------------------------------
    def stop(self, request: gr.Request) -> str:
        stopped = self.jobs.stop(_session_key(request))
        return "Stopping…" if stopped else "Nothing to stop."

    def run_job(self, request: Any, fn: Callable[[threading.Event], Any]) -> Any:
        """Run ``fn(cancel_event)`` registered so this session's Stop button can cancel it."""
        key = _session_key(request)
        ev = self.jobs.start(key)
        try:
            return fn(ev)
        finally:
            self.jobs.finish(key, ev)


# ============================================================================
# UI
# ============================================================================

def build_app(*, allow_paths: bool = False, config: AppConfig | None = None) -> gr.Blocks:
    """The Gradio Blocks app. ``config`` overrides ``allow_paths`` when given."""
    config = config or AppConfig(allow_paths=allow_paths)
    wb = Workbench(config)
    heavy = dict(concurrency_limit=config.heavy_concurrency, concurrency_id="heavy")
    in_space = bool(os.environ.get("SPACE_ID"))

    # Gradio's own cache (copies of files sent to browsers) ages out with the workspaces.
    age = int(config.workspace_max_age)
    with gr.Blocks(title="Weightsmith", delete_cache=(max(60, min(600, age)), age)) as demo:
        demo.workbench = wb  # for tests and embedding
        with gr.Row():
            gr.Markdown("# Weightsmith\nMerge checkpoints, mix LoRA adapters, edit facts with ROME, "
                        "publish to the Hub. Your uploads and results live in a private workspace for this session.")
            if in_space:
                gr.LoginButton(scale=0)

        model_pickers: list[gr.Dropdown] = []

        def picker(label: str, value: str = "demo", **kw) -> gr.Dropdown:
            d = gr.Dropdown(choices=["demo", *config.named_models], value=value, label=label,
                            allow_custom_value=True, **kw)
            model_pickers.append(d)
            return d

        src_help = ("demo, a Hub id (owner/name), or a workspace item (ws:name)"
                    + (", or a folder on this server" if config.allow_paths else ""))

        # ---- Models -----------------------------------------------------------
        with gr.Tab("Models", id="models"):
            with gr.Row():
                with gr.Column(scale=1):
                    gr.Markdown("### Inspect a model")
                    m_ref = picker("Model", info=src_help)
                    m_btn = gr.Button("Inspect", variant="primary")
                    m_info = gr.Dataframe(headers=["property", "value"], label="Summary", interactive=False,
                                          column_count=2)
                with gr.Column(scale=1):
                    gr.Markdown("### Upload into your workspace\nsafetensors (+config.json, tokenizer; "
                                "sharded with its index), a PEFT adapter (adapter_config.json + "
                                "adapter_model.safetensors), a .gguf file, or a zip of them.")
                    u_files = gr.File(file_count="multiple", file_types=MODEL_FILE_TYPES, label="Files")
                    with gr.Row():
                        u_name = gr.Textbox(label="Name", placeholder="my-model")
                        u_cfg = picker("Config from (bare weights only)", value=None)
                    u_btn = gr.Button("Import", variant="primary")
                    u_msg = gr.Markdown()
            gr.Markdown("### Your workspace")
            ws_table = gr.Dataframe(headers=["item", "kind", "origin", "size"], interactive=False,
                                    column_count=4, label="Items (private to this session)")
            with gr.Row():
                ws_refresh = gr.Button("Refresh", size="sm")
                ws_del_item = gr.Dropdown(label="Item", choices=[], allow_custom_value=True, scale=2)
                ws_del = gr.Button("Delete item", size="sm", variant="stop")

        # ---- Merge / Adapters / Edit tabs are built from the libraries ------------
        merge_parts = _merge_tab(wb, picker, heavy)
        adapter_parts = _adapters_tab(wb, picker, heavy)
        edit_parts = _edit_tab(wb, picker, heavy)

        # ---- Playground ----------------------------------------------------------
        with gr.Tab("Playground", id="playground"):
            with gr.Row():
                p_work = picker("Working model", info="e.g. your merge result (ws:…)")
                p_orig = picker("Original model")
            p_prompt = gr.Textbox(value="The capital of France is", label="Prompt", lines=2)
            with gr.Row():
                p_n = gr.Slider(1, config.max_new_tokens, value=32, step=1, label="Max new tokens")
                p_btn = gr.Button("Generate", variant="primary")
                p_stop = gr.Button("Stop", variant="stop")
            with gr.Row():
                p_out_w = gr.Textbox(label="Working model", lines=8)
                p_out_o = gr.Textbox(label="Original model", lines=8)

        # ---- Export --------------------------------------------------------------
        with gr.Tab("Export", id="export"):
            with gr.Row():
                e_item = gr.Dropdown(label="Workspace item", choices=[], allow_custom_value=True)
                e_refresh = gr.Button("Refresh", size="sm", scale=0)
            with gr.Row():
                with gr.Column():
                    gr.Markdown("### Download")
                    e_zip_btn = gr.Button("Make zip", variant="primary")
                    e_file = gr.File(label="Zip", interactive=False)
                with gr.Column():
                    gr.Markdown("### Push to the Hugging Face Hub")
                    e_repo = gr.Textbox(label="Repo id", placeholder="your-name/my-merge")
                    e_private = gr.Checkbox(label="Private", value=True)
                    e_token = gr.Textbox(label="Token (write)", type="password",
                                         info=("Signed in? Leave empty. " if in_space else "")
                                         + "Or set HF_TOKEN on the server. Never stored or logged.")
                    e_push = gr.Button("Push", variant="primary")
                    e_push_msg = gr.Markdown()
            gr.Markdown("### Model card preview (what will be pushed)")
            e_card = gr.Markdown(container=True)

        # ---- wiring -------------------------------------------------------------------
        def refresh(request: gr.Request):
            models = wb.model_choices(request)
            adapters = wb.model_choices(request, "adapter")
            items = wb.all_item_choices(request)
            ups = [gr.update(choices=models) for _ in model_pickers]
            return [*ups, gr.update(choices=adapters), gr.update(choices=items), gr.update(choices=items),
                    wb.workspace_table(request)]

        refresh_targets = [*model_pickers, adapter_parts.get("adapter_picker") or gr.State(), e_item,
                           ws_del_item, ws_table]
        refresh_kw = dict(fn=refresh, inputs=None, outputs=refresh_targets, api_visibility="private", queue=False)

        m_btn.click(wb.inspect, [m_ref], m_info, api_name="inspect")
        u_btn.click(wb.upload, [u_files, u_name, u_cfg], u_msg, api_name="upload", **heavy).then(**refresh_kw)
        ws_refresh.click(**refresh_kw)
        e_refresh.click(**refresh_kw)
        ws_del.click(wb.delete_item, [ws_del_item], u_msg, api_visibility="private").then(**refresh_kw)
        demo.load(**refresh_kw)

        gen_ev = p_btn.click(wb.generate, [p_work, p_orig, p_prompt, p_n], [p_out_w, p_out_o], api_name="generate",
                             concurrency_limit=config.generate_concurrency, concurrency_id="generate")
        p_stop.click(None, None, None, cancels=[gen_ev], api_visibility="private", queue=False)

        e_zip_btn.click(wb.export, [e_item], e_file, api_name="export", concurrency_limit=2,
                        concurrency_id="export")
        e_item.change(wb.card_preview, [e_item], e_card, api_visibility="private", queue=False)
        e_push.click(wb.push, [e_item, e_repo, e_private, e_token], e_push_msg, api_name="push",
                     concurrency_limit=2, concurrency_id="push")

        for parts in (merge_parts, adapter_parts, edit_parts):
            for ev in parts.get("creates_items", []):
                ev.then(**refresh_kw)

        demo.unload(lambda: None)
    return demo


# ---- tabs built from the libraries (filled in as they land) -------------------------

def _merge_tab(wb: Workbench, picker, heavy) -> dict:
    with gr.Tab("Merge", id="merge"):
        gr.Markdown("The merging library is not available in this build.")
    return {}


def _adapters_tab(wb: Workbench, picker, heavy) -> dict:
    with gr.Tab("Adapters", id="adapters"):
        gr.Markdown("The adapter library is not available in this build.")
    return {}


def _edit_tab(wb: Workbench, picker, heavy) -> dict:
    with gr.Tab("Edit", id="edit"):
        gr.Markdown("The editing library is not available in this build.")
    return {}


def launch_kwargs(config: AppConfig) -> dict:
    """What ``launch`` needs for this config (the upload size limit)."""
    return dict(max_file_size=config.max_file_size)


def serve(*, host: str = "127.0.0.1", port: int = 7860, allow_paths: bool = False, share: bool = False,
          max_file_size: str = "2gb", workspace_max_age: float = 3600.0) -> None:
    """Start the app (``weightsmith serve`` and ``make run`` call this)."""
    parse_size(max_file_size)  # one clear error for a bad size before anything starts
    config = AppConfig(allow_paths=allow_paths, max_file_size=max_file_size, workspace_max_age=workspace_max_age)
    build_app(config=config).queue(default_concurrency_limit=2).launch(
        server_name=host, server_port=port, share=share, **launch_kwargs(config))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    serve(host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
          port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
