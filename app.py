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

import logging
import os
import threading
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import gradio as gr

from ui.config import MODEL_FILE_TYPES, AppConfig, launch_kwargs, queue_kwargs, workspace_root
from ui.endpoint import FilePath, Files, Range, endpoint, guard_preprocess
from ui.forms import (adapter_method_choices, adapter_method_md, adapter_param_rows, merge_columns,
                      merge_default_row, merge_form_from_yaml, merge_shared_rows, merge_method_md,
                      merge_yaml_from_form, mix_form_to_yaml, table_rows)
from ui.plots import lines_plot, norms_plot
from ui.progress import StopEvents, cancellable, progress_adapter
from checkpoints.demo_adapters import demo_adapter_path, demo_adapter_refs, demo_adapters, is_demo_adapter_ref
from checkpoints.errors import WeightsmithError
from checkpoints.cards import load_card
from checkpoints.generation import stream_text
from checkpoints.model_cache import LoadedModel, ModelCache, building_models, release_memory, warm_imports
from checkpoints.sources import resolve
from checkpoints.uploads import import_upload
from checkpoints.hub_client import configure_hub_client
from checkpoints.secrets import install_redaction
from checkpoints.sizes import parse_size
from checkpoints.textfiles import load_yaml
from checkpoints.workspace import Workspace, WorkspaceConfig, WorkspaceManager
from editing.methods import DEFAULT_METHOD, METHODS as EDIT_METHODS, batch_method

log = logging.getLogger(__name__)

MAX_BATCH_EDITS = 200  # a batch holds the queue's heavy slot; larger files go through the CLI


def load_edit_requests(path: Path) -> list:
    """The edit requests of an uploaded CSV or JSON file (:mod:`editing.batch_file`), at most :data:`MAX_BATCH_EDITS`."""
    from editing.batch_file import load_edit_requests as load

    requests = load(path)
    if len(requests) > MAX_BATCH_EDITS:
        raise WeightsmithError(f"{path.name}: {len(requests)} records; the app takes at most {MAX_BATCH_EDITS} "
                               f"(use the CLI: weightsmith edit --batch)")
    return requests


def _session_key(request: Any) -> str:
    key = getattr(request, "session_hash", None)
    if not key:
        raise WeightsmithError("no session: open the app in a browser or use gradio_client")
    return str(key)


def _md_table(rows: list[tuple[str, Any]]) -> str:
    """Key/value facts as a compact Markdown list."""
    return "\n".join(f"- **{k}**: {v}" for k, v in rows)


class Workbench:
    """Every handler of the app. Build one per server; it holds the per-server caches explicitly."""

    def __init__(self, config: AppConfig | None = None):
        self.config = config or AppConfig()
        root = workspace_root(self.config)
        self.workspaces = WorkspaceManager(WorkspaceConfig(
            root=Path(root), max_age_seconds=self.config.workspace_max_age,
            max_bytes=self.config.workspace_max_bytes))
        warm_imports()  # before any request thread imports transformers
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
        key = _session_key(request)
        self._maybe_cleanup()
        with self._lock:
            ws = self.workspaces.get_or_create(self._sessions.get(key))
            self._sessions[key] = ws.id
        return ws

    def _maybe_cleanup(self) -> None:
        import time

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
        from checkpoints.workspace import folder_bytes

        ws = self.workspace(request)
        return [[i.ref, i.kind, i.origin, f"{folder_bytes(ws.item_path(i.name)) / 2**20:.1f} MB"]
                for i in ws.items()]

    # ---- models panel ---------------------------------------------------------
    @endpoint
    def inspect(self, model: str, request: gr.Request) -> list[list[Any]]:
        """Architecture, parameters, dtype and layers of a model (``LocalCheckpoint.summary``)."""
        ws = self.workspace(request)
        ckpt = self.checkpoint(ws, model)
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

    @endpoint
    def upload(self, files: Files, name: str, config_from: str, request: gr.Request) -> str:
        """Import uploaded files (model, adapter, GGUF, or a zip) into this session's workspace."""
        ws = self.workspace(request)
        cfg = self.ref(ws, config_from) if config_from else None
        item = import_upload(ws, files, name=name or None, config_from=cfg, **self.local_policy(ws))
        return f"Imported **{item.ref}** ({item.kind}): {', '.join(item.files)}"

    @endpoint
    def delete_item(self, ref: str, request: gr.Request) -> str:
        ws = self.workspace(request)
        ws.delete_item(ref)
        return f"Deleted {ref}"

    # ---- playground -------------------------------------------------------------
    @endpoint
    def generate(self, working: str, original: str, prompt: str, max_new_tokens: Annotated[float, Range(1)],
                 request: gr.Request, chat: bool = True):
        """Stream continuations of ``prompt`` from the working model and the original, side by side.

        ``chat``: wrap the prompt in the model's chat template (when it has one), as instruct models
        and the demo adapters expect.
        """
        ws = self.workspace(request)
        n = max(1, min(int(max_new_tokens), self.config.max_new_tokens))
        if not (prompt or "").strip():
            raise WeightsmithError("the prompt is empty")
        streams = []
        for ref in (working, original):
            if ref:
                loaded = self.loaded_model(ws, ref)
                text = prompt
                if chat and getattr(loaded.tokenizer, "chat_template", None):
                    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                                tokenize=False, add_generation_prompt=True)
                streams.append(stream_text(loaded, text, max_new_tokens=n, device=self.config.device))
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

    # ---- merge ---------------------------------------------------------------------
    @endpoint
    def merge(self, recipe_yaml: str, out_name: str, request: gr.Request, progress=gr.Progress()):
        """Run a merge recipe (mergekit YAML) into a new workspace item.

        Returns (summary Markdown, task-vector norms plot, ``ws:<name>`` of the result).
        """
        from merging.engine import run_merge
        from merging.recipe import MergeRecipe

        ws = self.workspace(request)
        recipe = MergeRecipe.from_dict(load_yaml(recipe_yaml, what="recipe"))
        resolved = recipe.with_models_renamed(lambda r: self.ref(ws, r))
        ws.check_quota()
        out = ws.new_item_dir(out_name or "merge", default="merge")
        progress_adapter(progress)(0.0, "checking models")
        result = self.run_job(request, lambda cancel: run_merge(
            resolved, out, device=self.config.device, progress=progress_adapter(progress), cancel=cancel,
            **self.local_policy(ws)))
        ws.register(out.name, kind="model", origin="merge",
                    details={"method": result.method, "tensors_changed": result.tensors_changed})
        rows = [("result", f"`ws:{out.name}`"), ("method", result.method),
                ("tensors changed", f"{result.tensors_changed} of {result.tensors_total}"),
                ("blocks", result.num_blocks), ("output", f"{result.output_bytes / 2**20:.1f} MB"),
                ("weights", result.finite_check), ("time", f"{result.seconds:.1f} s")]
        if result.lines_alpha is not None:
            rows.append(("LiNeS", f"α = {result.lines_alpha:.4g}, β = {result.lines_beta:.4g}"))
        md = "### Merged\n" + _md_table(rows) + "\n\nTry it in the **Playground** or download it from **Export**."
        return md, norms_plot(result.block_norms), f"ws:{out.name}"

    # ---- adapters ------------------------------------------------------------------
    def adapter_ref(self, ws: Workspace, ref: str) -> str:
        """An adapter reference: a bundled demo adapter, a workspace item, or (policy permitting) Hub id / path."""
        ref = str(ref or "").strip()
        if is_demo_adapter_ref(ref):
            return str(demo_adapter_path(ref))
        if not ref:
            raise WeightsmithError("no adapter named")
        return ws.resolve_ref(ref, allow_paths=self.config.allow_paths, allow_hub=self.config.allow_hub)

    @endpoint
    def mix_adapters(self, recipe_yaml: str, out_name: str, request: gr.Request, progress=gr.Progress()):
        """Mix LoRA adapters from a mix recipe (YAML) into a new workspace item (adapter or merged model).

        Returns (summary Markdown, ``ws:<name>`` of the result).
        """
        from merging.adapters import AdapterMixRecipe, mix_adapters

        ws = self.workspace(request)
        data = load_yaml(recipe_yaml, what="mix recipe")
        recipe = AdapterMixRecipe.from_dict(data or {})
        base_ref = recipe.base_model
        recipe.base_model = self.ref(ws, recipe.base_model)
        for entry in recipe.adapters:
            if isinstance(entry.adapter, list):
                raise WeightsmithError("upload adapter files in the Models tab, then use them as ws:<name>")
            entry.adapter = self.adapter_ref(ws, entry.adapter)
        ws.check_quota()
        out = ws.new_item_dir(out_name or "mix", default="mix")
        policy = self.local_policy(ws)  # the bundled demo adapters are trusted folders too
        policy["trusted_roots"] = (*policy["trusted_roots"], *demo_adapters().values())
        result = self.run_job(request, lambda cancel: mix_adapters(
            recipe, out, progress=progress_adapter(progress), cancel=cancel, device=self.config.device, **policy))
        kind = "adapter" if result.kind == "adapter" else "model"
        ws.register(out.name, kind=kind, origin="mix", details={"base": base_ref, "method": result.method})
        rows = [("result", f"`ws:{out.name}` ({result.kind})"), ("method", result.method),
                ("exact in ΔW space", "yes" if result.exact_in_delta_w else "no"),
                ("rank", result.rank), ("modules", result.modules),
                ("adapters", ", ".join(f"{a} × {w:g}" for a, w in zip(result.adapters, result.weights))),
                ("time", f"{result.seconds:.1f} s")]
        notes = "".join(f"\n\n> {n}" for n in result.notes)
        return "### Mixed\n" + _md_table(rows) + notes, f"ws:{out.name}"

    def loaded_model(self, ws: Workspace, ref: str) -> LoadedModel:
        """A model ready to generate: a checkpoint, or a workspace adapter applied to its base."""
        if str(ref).startswith("ws:") and ws.item(ref).kind == "adapter":
            return self._adapter_model(ws, ws.item(ref))
        return self.models.get(self.ref(ws, ref), **self.policy(ws))

    def _adapter_model(self, ws: Workspace, item) -> LoadedModel:
        import json

        from peft import PeftModel

        from checkpoints.demo import DEMO_NAME

        path = ws.item_path(item.name)
        base_ref = item.details.get("base")
        if not base_ref:
            declared = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            base_ref = "demo" if declared in (DEMO_NAME, None, "") else declared
        key = (str(path), (path / "adapter_model.safetensors").stat().st_mtime_ns, str(base_ref))
        base = self.checkpoint(ws, base_ref)

        def load() -> LoadedModel:
            model = PeftModel.from_pretrained(base.load_model(device=self.config.device), str(path))
            return LoadedModel(model.merge_and_unload().eval(), base.load_tokenizer(), item.name)

        return self.adapter_models.get_or_load(key, load)

    # ---- edit ----------------------------------------------------------------------
    def edit_session(self, ws: Workspace, model_ref: str, *, create: bool = True):
        """This workspace's in-memory EditSession for ``model_ref`` (a new one when the model changes)."""
        from editing.session import EditSession

        resolved = self.ref(ws, model_ref)
        with self._lock:
            entry = self._edit_sessions.get(ws.id)
            if entry is not None and entry[0] == resolved:
                self._edit_sessions[ws.id] = self._edit_sessions.pop(ws.id)  # most recently used
                return entry[1]
        if not create:
            raise WeightsmithError("no edits yet for this model in this session")
        ckpt = resolve(resolved, **self.policy(ws))
        with building_models():
            model, tokenizer = ckpt.load_model(device=self.config.device), ckpt.load_tokenizer()
        session = EditSession(model, tokenizer,
                              stats=self.stats, base_name=ckpt.hub_id or ckpt.name,
                              corpus=self.config.edit_corpus, stats_tokens=self.config.edit_stats_tokens)
        with self._lock:
            self._edit_sessions[ws.id] = (resolved, session)
            # Each session holds a full model copy: keep only the most recent few.
            while len(self._edit_sessions) > self.config.max_edit_sessions:
                self._edit_sessions.pop(next(iter(self._edit_sessions)))
        return session

    def _greedy(self, session, prompt: str, n: int = 24) -> str:
        text = ""
        for text in stream_text(LoadedModel(session.model, session.tokenizer, "edit"), prompt,
                                max_new_tokens=n, device=self.config.device):
            pass
        return text

    @endpoint
    def trace(self, model: str, prompt: str, subject: str, kind: Literal["hidden", "mlp", "attn"] | None,
              samples: Annotated[float | None, Range(1, 10, integer=True)],
              request: gr.Request, progress=gr.Progress()):
        """Causal trace of the fact; returns (heatmap, Markdown with the suggested layer, suggested layer)."""
        from editing.trace import causal_trace, plot_trace

        ws = self.workspace(request)
        session = self.edit_session(ws, model)
        if not (subject or "").strip():
            raise WeightsmithError("the subject is empty")
        result = self.run_job(request, lambda cancel: causal_trace(
            session.model, session.tokenizer, prompt, subject, kind=kind or "mlp", samples=int(samples or 3),
            progress=cancellable(progress, cancel), device=self.config.device))
        layer = result.suggest_layer()
        fig = plot_trace(result)
        md = (f"The model's answer: **{result.answer.strip()}** ({result.seconds:.1f} s, {result.samples} noise "
              f"samples). Suggested edit layer **{layer}** (strongest {result.kind} effect at the subject's "
              f"last token, or at its strongest token when that row is flat, within the layers ROME edits well); "
              f"set as the edit layer.")
        return fig, md, layer

    @endpoint
    def edit(self, model: str, prompt: str, subject: str, target: str, target_true: str,
             layer: Annotated[float | None, Range(0, integer=True)],
             request: gr.Request, progress=gr.Progress(),
             method: Literal[EDIT_METHODS] | None = None):  # type: ignore[valid-type]
        """Apply one edit (``method``: rome, r-rome, alphaedit, memit, alphaedit-memit; empty: the default);
        returns (generation before, after, summary, history table)."""
        from editing.request import EditRequest

        ws = self.workspace(request)
        session = self.edit_session(ws, model)
        req = EditRequest(prompt, subject, target, None if layer in (None, "") else int(layer),
                          (target_true or None))
        session.check(req)
        before = self._greedy(session, req.text)
        applied = self.run_job(request, lambda cancel: session.apply(req, progress=cancellable(progress, cancel),
                                                                     method=method or None))
        after = self._greedy(session, req.text)
        info = applied.summary()
        md = (f"Edit **{applied.id}** ({applied.method}): {subject} → **{target}** at layer {','.join(map(str, applied.layers))} "
              f"in {info.get('seconds', '?')} s. Undo it below; save it from the history."
              + (f"\n\n**Warning:** {applied.warning}" if applied.warning else ""))
        return req.text + before, req.text + after, md, history_rows(session.history)

    @endpoint
    def evaluate(self, model: str, prompt: str, subject: str, target: str, target_true: str, paraphrases: str,
                 neighbours: str, request: gr.Request, progress=gr.Progress()):
        """CounterFact-style scores of the current edits on the prompt, paraphrases and neighbour prompts,
        and the checks by generation (gen_efficacy, gen_paraphrase, gen_neighborhood, fluency)."""
        from editing.fact_scores import fact_scores

        ws = self.workspace(request)
        session = self.edit_session(ws, model)
        if not (target_true or "").strip():
            raise WeightsmithError("enter the true answer to compare the new target against")
        record = {"prompt": prompt, "subject": subject, "target_new": target, "ground_truth": target_true,
                  "rephrase_prompt": [p for p in (paraphrases or "").splitlines() if p.strip()],
                  "locality_prompt": [p for p in (neighbours or "").splitlines() if p.strip()]}
        scores = fact_scores(session.model, session.tokenizer, record)
        n = len(session.history)
        rows = [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in scores.items()]
        return rows + [["active edits", str(n)]]

    @endpoint
    def undo(self, model: str, edit_id: Annotated[float | None, Range(0, integer=True)], request: gr.Request):
        ws = self.workspace(request)
        session = self.edit_session(ws, model, create=False)
        if edit_id in (None, ""):
            raise WeightsmithError("enter the id of the edit to undo (see the history)")
        session.undo(int(edit_id))
        return history_rows(session.history), f"Undid edit {int(edit_id)}; the weights are exactly as without it."

    @endpoint
    def edit_batch(self, model: str, file: FilePath, request: gr.Request, progress=gr.Progress(),
                   method: Literal[EDIT_METHODS] | None = None):  # type: ignore[valid-type]
        """Apply many facts from an uploaded JSON or CSV file in one update (MEMIT, or AlphaEdit's when an
        AlphaEdit method is chosen; ROME and r-ROME edit one fact at a time)."""
        ws = self.workspace(request)
        if not file:
            raise WeightsmithError("upload a JSON or CSV file of edits first")
        requests = load_edit_requests(Path(file))
        session = self.edit_session(ws, model)
        applied = self.run_job(request, lambda cancel: session.apply_batch(
            requests, progress=cancellable(progress, cancel),
            method=batch_method(method) if method else None))
        return history_rows(session.history), (f"Batch edit {applied.id}: {len(requests)} facts over layers "
                                               f"{', '.join(map(str, applied.layers))}.")

    @endpoint
    def save_edits(self, model: str, save_as: Literal["model", "adapter"] | None, name: str, request: gr.Request):
        """Write the session's edits to the workspace as a full model or a rank-1 LoRA adapter."""
        ws = self.workspace(request)
        session = self.edit_session(ws, model, create=False)
        out = ws.new_item_dir(name or "edited", default="edited")
        if save_as == "model":
            ws.check_quota()
            session.export_model(out)
            kind = "model"
        else:
            session.export_adapter(out)
            kind = "adapter"
        ws.register(out.name, kind=kind, origin="edit", details={"base": model, "edits": len(session.history)})
        return f"Saved **ws:{out.name}** ({kind}); push or download it from **Export**."

    # ---- export ------------------------------------------------------------------
    @endpoint
    def export(self, item: str, request: gr.Request) -> str:
        """Zip a workspace item for download; returns the zip's path (served as a file)."""
        ws = self.workspace(request)
        if not item:
            raise WeightsmithError("choose a workspace item to export")
        return str(ws.zip_item(item))

    @endpoint
    def gguf_estimate(self, item: str, qtype: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"], request: gr.Request) -> str:
        """Size of the item's GGUF export in ``qtype`` (Markdown), from the tensor headers alone."""
        from merging.gguf_item import estimate_folder_gguf

        ws = self.workspace(request)
        if not item:
            return "Choose a workspace item to see the size of its GGUF file."
        size = estimate_folder_gguf(ws.item_path(item), qtype, base=self._gguf_base(ws, item), policy=self.policy(ws))
        return f"{qtype}: about **{size / 2**20:.1f} MB** of weights (plus the tokenizer, a few MB)."

    @endpoint
    def export_gguf(self, item: str, qtype: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"], request: gr.Request, progress=gr.Progress()):
        """Write a workspace item (model or LoRA adapter) as GGUF into the item, so that Push publishes it in the
        same commit; returns (the file, Markdown with its size, type and read-back check)."""
        from merging.gguf_item import estimate_folder_gguf, export_folder_gguf

        ws = self.workspace(request)
        if not item:
            raise WeightsmithError("choose a workspace item to export")
        folder = ws.item_path(item)
        base, policy = self._gguf_base(ws, item), self.policy(ws)
        ws.check_quota(estimate_folder_gguf(folder, qtype, base=base, policy=policy))
        out = self.run_job(request, lambda cancel: export_folder_gguf(
            folder, qtype, base=base, policy=policy, progress=progress_adapter(progress), cancel=cancel))
        return str(out.result.path), f"{out.result.summary()}\n\n{out.check}. **Push** now adds it to the same commit."

    def _gguf_base(self, ws: Workspace, item: str) -> str | None:
        """The base an adapter item was made on (as the resolver takes it), else None."""
        base = ws.item(item).details.get("base")
        return self.ref(ws, base) if base else None

    @endpoint
    def card_preview(self, item: str, request: gr.Request) -> str:
        ws = self.workspace(request)
        if not item:
            return "Choose a workspace item to see its model card."
        try:
            card = load_card(ws.item_path(item))
        except WeightsmithError as e:  # what Push would say; uploads have no card
            return f"*{e}*"
        # The front matter (what the Hub indexes) as YAML, then the card's body.
        return f"**Front matter**\n```yaml\n{card.data.to_yaml()}\n```\n{card.text.lstrip()}"

    @endpoint
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
        """Run ``fn(cancel_event)`` registered so this session's Stop button can cancel it.

        The session's workspace is held meanwhile: the age-based cleanup never removes it under a running job.
        """
        key = _session_key(request)
        with self._lock:
            ws_id = self._sessions.get(key)
        ev = self.jobs.start(key)
        try:
            with self.workspaces.hold(ws_id or ""):
                return fn(ev)
        finally:
            self.jobs.finish(key, ev)
            release_memory()  # a job's tensors go back to the system, not to a worker thread's malloc arena


# ============================================================================
# UI
# ============================================================================

def build_app(*, allow_paths: bool = False, config: AppConfig | None = None) -> gr.Blocks:
    """The Gradio Blocks app. ``config`` overrides ``allow_paths`` when given."""
    config = config or AppConfig(allow_paths=allow_paths)
    install_redaction()  # no token in any log line or traceback of this server, whichever logger writes it
    configure_hub_client()  # every Hub request of this server has a timeout
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

        model_pickers: list[tuple[gr.Dropdown, str]] = []

        def picker(label: str, value: str = "demo", kind: str = "model", **kw) -> gr.Dropdown:
            """A model dropdown refreshed with the session's items; ``kind="any"`` also lists adapters."""
            d = gr.Dropdown(choices=["demo", *config.named_models], value=value, label=label,
                            allow_custom_value=True, **kw)
            model_pickers.append((d, kind))
            return d

        src_help = ("demo, a Hub id (owner/name), or a workspace item (ws:name)"
                    + (", or a folder on this server" if config.allow_paths else ""))

        # ---- Models -----------------------------------------------------------
        with gr.Tab("Models", id="models", elem_id="tab-models"):
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
        with gr.Tab("Playground", id="playground", elem_id="tab-playground"):
            with gr.Row():
                p_work = picker("Working model", kind="any", info="e.g. your merge or mix result (ws:…)")
                p_orig = picker("Original model")
            p_prompt = gr.Textbox(value="What is the capital of France?", label="Prompt", lines=2)
            with gr.Row():
                p_n = gr.Slider(1, config.max_new_tokens, value=48, step=1, label="Max new tokens")
                p_chat = gr.Checkbox(value=True, label="Chat template", info="as a user message (instruct models)")
                p_btn = gr.Button("Generate", variant="primary")
                p_stop = gr.Button("Stop", variant="stop")
            with gr.Row():
                p_out_w = gr.Textbox(label="Working model", lines=8)
                p_out_o = gr.Textbox(label="Original model", lines=8)

        # ---- Export --------------------------------------------------------------
        with gr.Tab("Export", id="export", elem_id="tab-export"):
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
            with gr.Row():
                with gr.Column():
                    gr.Markdown("### GGUF for llama.cpp, Ollama, LM Studio")
                    e_gguf_type = gr.Dropdown(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"],
                                              value="q8_0", label="GGUF type",
                                              info="q8_0: near-lossless, half of f16; q4/q5: smaller, see README")
                    e_gguf_size = gr.Markdown()
                    e_gguf_btn = gr.Button("Export GGUF", variant="primary")
                    e_gguf_msg = gr.Markdown()
                    e_gguf_file = gr.File(label="GGUF", interactive=False)
            gr.Markdown("### Model card preview (what will be pushed)")
            e_card = gr.Markdown(container=True)

        # ---- wiring -------------------------------------------------------------------
        def refresh(request: gr.Request):
            models = wb.model_choices(request)
            adapters = wb.model_choices(request, "adapter")
            items = wb.all_item_choices(request)
            ups = [gr.update(choices=models + (adapters if kind == "any" else [])) for _, kind in model_pickers]
            adapters = adapter_parts.get("demo_adapters", []) + adapters
            return [*ups, gr.update(choices=adapters), gr.update(choices=items), gr.update(choices=items),
                    wb.workspace_table(request)]

        refresh_targets = [*(d for d, _ in model_pickers), adapter_parts.get("adapter_picker") or gr.State(), e_item,
                           ws_del_item, ws_table]
        refresh_kw = dict(fn=refresh, inputs=None, outputs=refresh_targets, api_visibility="private", queue=False)

        m_btn.click(wb.inspect, [m_ref], m_info, api_name="inspect")
        u_btn.click(wb.upload, [u_files, u_name, u_cfg], u_msg, api_name="upload", **heavy).then(**refresh_kw)
        ws_refresh.click(**refresh_kw)
        e_refresh.click(**refresh_kw)
        ws_del.click(wb.delete_item, [ws_del_item], u_msg, api_visibility="private").then(**refresh_kw)
        demo.load(**refresh_kw)

        gen_ev = p_btn.click(wb.generate, [p_work, p_orig, p_prompt, p_n, p_chat], [p_out_w, p_out_o], api_name="generate",
                             concurrency_limit=config.generate_concurrency, concurrency_id="generate")
        p_stop.click(None, None, None, cancels=[gen_ev], api_visibility="private", queue=False)

        e_zip_btn.click(wb.export, [e_item], e_file, api_name="export", concurrency_limit=2,
                        concurrency_id="export")
        e_item.change(wb.card_preview, [e_item], e_card, api_visibility="private", queue=False)
        for trigger in (e_item.change, e_gguf_type.change):
            trigger(wb.gguf_estimate, [e_item, e_gguf_type], e_gguf_size, api_visibility="private")
        e_gguf_btn.click(wb.export_gguf, [e_item, e_gguf_type], [e_gguf_file, e_gguf_msg], api_name="export_gguf",
                         **heavy).then(wb.card_preview, [e_item], e_card, api_visibility="private")
        e_push.click(wb.push, [e_item, e_repo, e_private, e_token], e_push_msg, api_name="push",
                     concurrency_limit=2, concurrency_id="push")

        demo.unload(wb.end_session)

        for parts in (merge_parts, adapter_parts, edit_parts):
            for ev in parts.get("creates_items", []):
                ev.then(**refresh_kw)
            if "result_ref" in parts:
                # A fresh result becomes the Playground's working model, ready to try.
                parts["result_ref"].change(lambda r: gr.update(value=r) if r else gr.skip(), parts["result_ref"],
                                           p_work, api_visibility="private", queue=False)
            if "init" in parts:
                fn, ins, outs = parts["init"]
                demo.load(fn, ins, outs, api_visibility="private", queue=False)

    guard_preprocess(demo)
    return demo


# ---- tabs built from the libraries (filled in as they land) -------------------------

def _merge_tab(wb: Workbench, picker, heavy) -> dict:
    try:
        from merging.methods import REGISTRY
    except ImportError:
        with gr.Tab("Merge", id="merge", elem_id="tab-merge"):
            gr.Markdown("The merging library is not available in this build.")
        return {}
    default_method = "task_arithmetic" if "task_arithmetic" in REGISTRY else next(iter(REGISTRY))
    with gr.Tab("Merge", id="merge", elem_id="tab-merge"):
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    method = gr.Dropdown([(f"{m.label} ({m.name})", m.name) for m in REGISTRY.values()],
                                         value=default_method, label="Method")
                    base = picker("Base model", info="the model the task vectors are taken against")
                method_info = gr.Markdown(merge_method_md(default_method))
                with gr.Row():
                    add_ref = picker("Add a model", value=None)
                    add_btn = gr.Button("Add ▾", scale=0, min_width=90)
                cols = merge_columns(default_method)
                models = gr.Dataframe(value={"headers": cols, "data": [[""] * len(cols)]}, headers=cols,
                                      label="Models and their parameters (a cell may be a number or a "
                                            "[list] gradient along depth)",
                                      interactive=True, type="array", row_count=1, column_limits=None,
                                      datatype="str")
                shared = gr.Dataframe(value=merge_shared_rows(default_method), headers=["parameter", "value", "about"],
                                      label="Shared parameters", interactive=True, type="array",
                                      static_columns=[0, 2], column_count=3)
                with gr.Row():
                    lines_on = gr.Checkbox(label="LiNeS layer scaling", value=False,
                                           info="λ(ℓ) = α + β·ℓ/(L−1) on the merged task vector")
                    alpha_auto = gr.Checkbox(label="α auto", value=True)
                    alpha = gr.Number(label="α", value=0.5, step=0.05)
                    beta = gr.Number(label="β", value=0.5, step=0.05)
                num_blocks = gr.State(30)
                lines_fig = gr.Plot(lines_plot(False, True, 0.5, 0.5, 30), label="Per-block scale")
                with gr.Row():
                    out_dtype = gr.Dropdown(["", "float32", "bfloat16", "float16"], value="", label="out_dtype",
                                            info="empty: as the inputs")
                    seed = gr.Textbox(label="seed", placeholder="random methods (dare, della)")
                    out_name = gr.Textbox(label="Output name", value="my-merge")
            with gr.Column(scale=2):
                recipe = gr.Code(language="yaml", label="Recipe (mergekit YAML; edit either side)",
                                 interactive=True, lines=22)
                recipe_status = gr.Markdown()
        with gr.Row():
            run = gr.Button("Merge", variant="primary")
            stop = gr.Button("Stop", variant="stop")
        with gr.Row():
            result = gr.Markdown()
            result_ref = gr.Textbox(label="Result", interactive=False, visible=True)
        norms_fig = gr.Plot(label="Task-vector norms per block")

    form = [method, base, models, shared, lines_on, alpha_auto, alpha, beta, out_dtype, seed]
    private = dict(api_visibility="private", queue=False)

    def on_method(m, rows):
        # Keep the models, reset the columns to this method's per-model parameters.
        keep = [r[0] for r in table_rows(rows) if r and str(r[0] or "").strip()]
        cols = merge_columns(m)
        data = [merge_default_row(m, ref) for ref in keep] or [[""] * len(cols)]
        return gr.update(value={"headers": cols, "data": data}, headers=cols), merge_shared_rows(m), merge_method_md(m)

    def on_add(m, rows, ref):
        if not ref:
            return gr.skip()
        cols = merge_columns(m)
        data = [r for r in table_rows(rows) if r and str(r[0] or "").strip()]
        data.append(merge_default_row(m, ref))
        return gr.update(value={"headers": cols, "data": data})

    def on_yaml(text):
        try:
            f = merge_form_from_yaml(text)
        except WeightsmithError as e:
            return [gr.skip()] * 10 + [f"⚠ {e}"]
        return [f["method"], f["base"], gr.update(value=f["models"], headers=f["models"]["headers"]), f["shared"],
                f["lines_on"], f["alpha_auto"], f["alpha"], f["beta"], f["out_dtype"], f["seed"], "✓ form updated from YAML"]

    @endpoint
    def on_base(ref: str, request: gr.Request):
        try:
            return wb.checkpoint(wb.workspace(request), ref, allow_hub=False).num_layers
        except WeightsmithError:
            return gr.skip()

    def plot(on, auto, a, b, L, rows):
        n = sum(1 for r in table_rows(rows) if r and str(r[0] or "").strip())
        return lines_plot(on, auto, a, b, L, max(1, n))

    method.input(on_method, [method, models], [models, shared, method_info], **private).then(
        merge_yaml_from_form, form, [recipe, recipe_status], **private)
    add_btn.click(on_add, [method, models, add_ref], models, **private).then(
        merge_yaml_from_form, form, [recipe, recipe_status], **private)
    for comp in (base, models, shared, lines_on, alpha_auto, alpha, beta, out_dtype, seed):
        comp.input(merge_yaml_from_form, form, [recipe, recipe_status], **private)
    recipe.input(on_yaml, [recipe], [*form, recipe_status], **private, trigger_mode="always_last")
    base.change(on_base, [base], num_blocks, api_visibility="private")
    for comp in (lines_on, alpha_auto, alpha, beta, num_blocks, models):
        comp.change(plot, [lines_on, alpha_auto, alpha, beta, num_blocks, models], lines_fig, **private)

    run_ev = run.click(wb.merge, [recipe, out_name], [result, norms_fig, result_ref], api_name="merge", **heavy)
    stop.click(wb.stop, None, result, cancels=[run_ev], **private)
    return {"creates_items": [run_ev], "result_ref": result_ref,
            "init": (merge_yaml_from_form, form, [recipe, recipe_status])}


def _adapters_tab(wb: Workbench, picker, heavy) -> dict:
    try:
        import merging.adapters  # noqa: F401
    except ImportError:
        with gr.Tab("Adapters", id="adapters", elem_id="tab-adapters"):
            gr.Markdown("The adapter library is not available in this build.")
        return {}
    demo_refs = demo_adapter_refs()
    with gr.Tab("Adapters", id="adapters", elem_id="tab-adapters"):
        with gr.Row():
            with gr.Column(scale=3):
                base = picker("Base model")
                with gr.Row():
                    add_ref = gr.Dropdown(choices=demo_refs, value=demo_refs[0] if demo_refs else None,
                                          label="Add an adapter", allow_custom_value=True,
                                          info="a demo adapter, your uploads (ws:…), or a Hub id")
                    add_btn = gr.Button("Add ▾", scale=0, min_width=90)
                up_files = gr.File(file_count="multiple", file_types=[".json", ".safetensors", ".zip"],
                                   label="…or upload a PEFT adapter (adapter_config.json + "
                                         "adapter_model.safetensors, or a zip)", height=170)
                up_msg = gr.Markdown()
                table = gr.Dataframe(value={"headers": ["adapter", "weight"],
                                            "data": [[r, "0.5"] for r in demo_refs[:2]] or [["", ""]]},
                                     headers=["adapter", "weight"], type="array", interactive=True,
                                     label="Adapters and weights", datatype="str")
                method = gr.Dropdown(adapter_method_choices(), value="cat", label="Method")
                method_info = gr.Markdown(adapter_method_md("cat"))
                params = gr.Dataframe(value=adapter_param_rows("cat"), headers=["parameter", "value"],
                                      type="array", interactive=True, static_columns=[0], column_count=2,
                                      label="Method parameters", row_count=0)
                with gr.Row():
                    lines_on = gr.Checkbox(label="LiNeS depth scaling of ΔW", value=False)
                    alpha = gr.Number(label="α", value=0.5, step=0.05)
                    beta = gr.Number(label="β", value=0.5, step=0.05)
                with gr.Row():
                    output = gr.Radio(["adapter", "merged model"], value="adapter", label="Output")
                    out_name = gr.Textbox(label="Output name", value="my-mix")
            with gr.Column(scale=2):
                recipe = gr.Code(language="yaml", label="Mix recipe (YAML)", interactive=True, lines=16)
                status = gr.Markdown()
        with gr.Row():
            run = gr.Button("Mix", variant="primary")
            stop = gr.Button("Stop", variant="stop")
        with gr.Row():
            result = gr.Markdown()
            result_ref = gr.Textbox(label="Result", interactive=False)
        gr.Markdown("The result becomes the Playground's working model: try it there against the base.")

    form = [base, table, method, params, lines_on, alpha, beta, output]
    private = dict(api_visibility="private", queue=False)

    def on_method(m):
        return adapter_param_rows(m), adapter_method_md(m)

    def on_add(rows, ref):
        if not ref:
            return gr.skip()
        data = [r for r in table_rows(rows) if r and str(r[0] or "").strip()] + [[ref, "1.0"]]
        return gr.update(value={"headers": ["adapter", "weight"], "data": data})

    @endpoint
    def on_upload(files: Files, rows, request: gr.Request):
        if not files:
            return gr.skip(), gr.skip()
        ws = wb.workspace(request)
        item = import_upload(ws, files, **wb.local_policy(ws))
        if item.kind != "adapter":
            ws.delete_item(item.name)
            raise WeightsmithError("that upload is a model, not an adapter: import it in the Models tab")
        data = [r for r in table_rows(rows) if r and str(r[0] or "").strip()] + [[item.ref, "1.0"]]
        return gr.update(value={"headers": ["adapter", "weight"], "data": data}), f"Imported **{item.ref}**"

    method.input(on_method, [method], [params, method_info], **private).then(
        mix_form_to_yaml, form, [recipe, status], **private)
    up_ev = up_files.upload(on_upload, [up_files, table], [table, up_msg], api_visibility="private", **heavy)
    up_ev.then(mix_form_to_yaml, form, [recipe, status], **private)
    add_btn.click(on_add, [table, add_ref], table, **private).then(mix_form_to_yaml, form, [recipe, status], **private)
    for comp in (base, table, params, lines_on, alpha, beta, output):
        comp.input(mix_form_to_yaml, form, [recipe, status], **private)
    run_ev = run.click(wb.mix_adapters, [recipe, out_name], [result, result_ref], api_name="mix_adapters", **heavy)
    stop.click(wb.stop, None, result, cancels=[run_ev], **private)
    return {"creates_items": [run_ev, up_ev], "result_ref": result_ref, "adapter_picker": add_ref,
            "demo_adapters": demo_refs, "init": (mix_form_to_yaml, form, [recipe, status])}


def history_rows(history: list[dict]) -> list[list[Any]]:
    rows = []
    for h in history:
        facts = h.get("facts") or [h]
        for f in facts:
            rows.append([h.get("id"), h.get("method", ""), ",".join(map(str, h.get("layers", []))),
                         str(f.get("prompt", "")).replace("{}", f.get("subject", "")),
                         f.get("target_new", ""), f"{h.get('seconds', '')}",
                         # disabling-edit checks (editing/checks.py): the warning, else ‖ΔW‖/‖W‖
                         (h.get("checks") or {}).get("warning") or
                         (f"ok (‖ΔW‖/‖W‖ {h['checks']['relative_norm']:.3g})" if h.get("checks") else "")])
    return rows


def _edit_tab(wb: Workbench, picker, heavy) -> dict:
    try:
        import editing.session  # noqa: F401
    except ImportError:
        with gr.Tab("Edit", id="edit", elem_id="tab-edit"):
            gr.Markdown("The editing library is not available in this build.")
        return {}
    with gr.Tab("Edit", id="edit", elem_id="tab-edit"):
        with gr.Row():
            model = picker("Model to edit", info="loaded once per session; edits apply in memory until saved")
            layer = gr.Number(label="Layer", value=None, precision=0,
                              info="empty: the suggested/default layer", minimum=0)
            method = gr.Dropdown(list(EDIT_METHODS), value=DEFAULT_METHOD, label="Method",
                                 info="r-rome and alphaedit avoid ROME's disabling edits in long series; "
                                      "memit methods spread an edit over 4 layers")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value="{} is located in the city of",
                                info="{} marks the subject (or write the subject in the prompt)", scale=3)
            subject = gr.Textbox(label="Subject", value="The Eiffel Tower", scale=2)
            target = gr.Textbox(label="New target", value="Rome", scale=1)
            target_true = gr.Textbox(label="True answer (optional)", value="Paris", scale=1)
        with gr.Accordion("Causal trace: where is the fact recalled?", open=True):
            with gr.Row():
                kind = gr.Radio(["hidden", "mlp", "attn"], value="mlp", label="Restore")
                samples = gr.Slider(1, 10, value=3, step=1, label="Noise samples")
                trace_btn = gr.Button("Trace", variant="secondary")
            trace_md = gr.Markdown()
            trace_fig = gr.Plot(label="Causal trace", show_label=False)
        with gr.Row():
            edit_btn = gr.Button("Apply edit", variant="primary")
            stop = gr.Button("Stop", variant="stop")
        with gr.Row():
            before = gr.Textbox(label="Before the edit", lines=4)
            after = gr.Textbox(label="After the edit", lines=4)
        edit_md = gr.Markdown()
        with gr.Accordion("Scores on paraphrases and neighbours", open=True):
            with gr.Row():
                paraphrases = gr.Textbox(label="Paraphrase prompts (one per line, subject included)", lines=3,
                                         value="The Eiffel Tower is in the city of\nWhere is the Eiffel Tower? It is in")
                neighbours = gr.Textbox(label="Neighbour prompts (other subjects whose answer is the true one)",
                                        lines=3, value="The Louvre is located in the city of\n"
                                                       "Notre-Dame de Paris is located in the city of")
            eval_btn = gr.Button("Evaluate")
            scores = gr.Dataframe(headers=["score", "value"], interactive=False, column_count=2, label="Scores")
        gr.Markdown("### Edit history")
        history = gr.Dataframe(headers=["id", "method", "layer", "prompt", "target", "seconds", "check"],
                               interactive=False, column_count=7)
        with gr.Row():
            undo_id = gr.Number(label="Edit id", precision=0, value=None)
            undo_btn = gr.Button("Undo edit")
            batch_file = gr.File(label="Batch edits (JSON or CSV)", file_types=[".json", ".csv"])
            batch_btn = gr.Button("Apply batch (MEMIT)")
        with gr.Row():
            save_as = gr.Radio(["model", "adapter"], value="adapter", label="Save edits as",
                               info="adapter: rank-1 LoRA per edit, kilobytes")
            save_name = gr.Textbox(label="Name", value="edited")
            save_btn = gr.Button("Save to workspace", variant="primary")
        save_md = gr.Markdown()

    private = dict(api_visibility="private", queue=False)
    trace_ev = trace_btn.click(wb.trace, [model, prompt, subject, kind, samples],
                               [trace_fig, trace_md, layer], api_name="trace", **heavy)
    edit_ev = edit_btn.click(wb.edit, [model, prompt, subject, target, target_true, layer, method],
                             [before, after, edit_md, history], api_name="edit", **heavy)
    eval_ev = eval_btn.click(wb.evaluate, [model, prompt, subject, target, target_true, paraphrases, neighbours],
                             scores, api_name="evaluate", **heavy)
    undo_btn.click(wb.undo, [model, undo_id], [history, edit_md], api_name="undo", **heavy)
    batch_ev = batch_btn.click(wb.edit_batch, [model, batch_file, method], [history, edit_md], api_name="edit_batch", **heavy)
    save_ev = save_btn.click(wb.save_edits, [model, save_as, save_name], save_md, api_name="save_edits", **heavy)
    stop.click(wb.stop, None, edit_md, cancels=[trace_ev, edit_ev, eval_ev, batch_ev], **private)
    return {"creates_items": [save_ev]}


def serve(*, host: str = "127.0.0.1", port: int = 7860, allow_paths: bool = False, share: bool = False,
          max_file_size: str = "2gb", workspace_max_age: float = 3600.0, workspace_quota: str | int = "20GiB",
          queue_size: int = 64) -> None:
    """Start the app (``weightsmith serve`` and ``make run`` call this)."""
    parse_size(max_file_size, what="--max-file-size")  # one clear error for a bad size before anything starts
    if int(queue_size) < 1:
        raise WeightsmithError(f"--queue-size {queue_size}: must be at least 1")
    # The ROME statistics corpus (a text file) can be set for a deployment; default: model-sampled text.
    config = AppConfig(allow_paths=allow_paths, max_file_size=max_file_size, workspace_max_age=workspace_max_age,
                       workspace_max_bytes=parse_size(workspace_quota, what="--workspace-quota"),
                       queue_max_size=int(queue_size), edit_corpus=os.environ.get("WEIGHTSMITH_EDIT_CORPUS") or None)
    build_app(config=config).queue(**queue_kwargs(config)).launch(
        server_name=host, server_port=port, share=share, **launch_kwargs(config))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    serve(host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
          port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
