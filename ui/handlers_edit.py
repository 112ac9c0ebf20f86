"""Edit tab handlers: the session's in-memory EditSession, trace, edit, evaluate, undo, batch, save."""

from pathlib import Path
from typing import Annotated, Literal

import gradio as gr

from checkpoints.errors import WeightsmithError
from checkpoints.model_cache import building_models
from checkpoints.sources import resolve
from checkpoints.workspace import Workspace
from editing.methods import DEFAULT_METHOD, FALLBACK_METHOD, METHODS as EDIT_METHODS, MULTI_LAYER, batch_method, check_method

from .endpoint import FilePath, Range, endpoint
from .forms import optional_number
from .progress import gradio_job, show_progress
from .tables import history_rows

MAX_BATCH_EDITS = 200  # a batch holds the queue's heavy slot; larger files go through the CLI


def layer_value(value: str | float | None) -> int | None:
    """The Layer field (text on the page, a number from an API client): empty means the suggested/default
    layer (None), else a whole number >= 0; anything else is one line naming the field."""
    return optional_number(value, "layer", empty="the suggested layer", low=0, integer=True)  # type: ignore[return-value]


def planned_layers(model_type: str, num_layers: int, method: str | None, layer: int | None) -> list[int]:
    """The layers :meth:`editing.session.EditSession.apply` changes for ``method`` and the Layer field's
    ``layer`` (None: empty), so the page can say so before the edit. It follows the library's rule
    (tests/test_app_rough_edges.py checks it against the layers each applied edit reports):
    one-layer methods edit ``layer`` or ROME's default layer; MEMIT methods the four layers around it
    (:meth:`MemitHyperParams.layers_for`, the library's one rule)."""
    from editing.memit import MemitHyperParams
    from editing.rome import default_layer

    if check_method(method) in MULTI_LAYER:
        return MemitHyperParams().layers_for(model_type, num_layers, layer)
    return [default_layer(model_type, num_layers) if layer is None else layer]


def named_method(method: str | None) -> str | None:
    """The method to pass to the library: None for the menu's preselected default, so a model that cannot
    hold a patch is edited with the fallback (the result names the method used) instead of refusing."""
    return None if not method or method == DEFAULT_METHOD else method


def layers_text(layers: list[int]) -> str:
    """``layer 4``, ``layers 2–5`` (consecutive) or ``layers 1, 3``."""
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}–{layers[-1]}"
    return "layers " + ", ".join(map(str, layers))


def load_edit_requests(path: Path) -> list:
    """The edit requests of an uploaded CSV or JSON file (:mod:`editing.batch_file`), at most :data:`MAX_BATCH_EDITS`."""
    from editing.batch_file import load_edit_requests as load

    requests = load(path)
    if len(requests) > MAX_BATCH_EDITS:
        raise WeightsmithError(f"{path.name}: {len(requests)} records; the app takes at most {MAX_BATCH_EDITS} "
                               f"(use the CLI: weightsmith edit --batch)")
    return requests


class EditHandlers:
    """Mixin of :class:`ui.workbench.Workbench`."""

    def edit_session(self, ws: Workspace, model_ref: str, *, create: bool = True):
        """This workspace's in-memory EditSession for ``model_ref`` (a new one when the model changes)."""
        from editing.prepare import open_session

        resolved = self.ref(ws, model_ref)
        with self._lock:
            entry = self._edit_sessions.get(ws.id)
            if entry is not None and entry[0] == resolved:
                self._edit_sessions[ws.id] = self._edit_sessions.pop(ws.id)  # most recently used
                return entry[1]
        if not create:
            raise WeightsmithError("no edits yet for this model in this session")
        ckpt = resolve(resolved, **self.policy(ws))
        with building_models():  # the same load as `weightsmith demo-model`'s statistics: the same cache keys
            session = open_session(ckpt, stats=self.stats, corpus=self.config.edit_corpus,
                                   stats_tokens=self.config.edit_stats_tokens, device=self.config.device)
        with self._lock:
            self._edit_sessions[ws.id] = (resolved, session)
            # Each session holds a full model copy: keep only the most recent few.
            while len(self._edit_sessions) > self.config.max_edit_sessions:
                self._edit_sessions.pop(next(iter(self._edit_sessions)))
        return session

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
            job=gradio_job(progress, cancel), device=self.config.device))
        layer = result.suggest_layer()
        fig = plot_trace(result)
        md = (f"The model's answer: **{result.answer.strip()}** ({result.seconds:.1f} s, {result.samples} noise "
              f"samples). Suggested edit layer **{layer}** (strongest {result.kind} effect at the subject's "
              f"last token, or at its strongest token when that row is flat, within the layers ROME edits well); "
              f"set as the edit layer.")
        return fig, md, layer

    @endpoint
    def edit(self, model: str, prompt: str, subject: str, target: str, target_true: str,
             layer, request: gr.Request, progress=gr.Progress(),
             method: Literal[EDIT_METHODS] | None = None):  # type: ignore[valid-type]
        """Apply one edit (``method``: rome, r-rome, alphaedit, memit, alphaedit-memit, patch; empty: the default);
        ``layer``: a whole number, or empty for the suggested/default layer.
        Returns (generation before, after, summary, history table)."""
        from editing.before_after import continuations_before_after
        from editing.request import EditRequest

        ws = self.workspace(request)
        session = self.edit_session(ws, model)
        req = EditRequest(prompt, subject, target, layer_value(layer), (target_true or None))
        session.check(req)
        applied = self.run_job(request, lambda cancel: session.apply(req, job=gradio_job(progress, cancel),
                                                                     method=named_method(method)))
        show_progress(progress, 1.0, "generating the continuation before and after the edit")
        before, after = continuations_before_after(session, req.text, applied, max_new_tokens=24)
        info = applied.summary()
        md = (f"Edit **{applied.id}** ({applied.method}): {subject} → **{target}** at {layers_text(applied.layers)} "
              f"in {info.get('seconds', '?')} s. Undo it below; save it from the history."
              + (f"\n\n**Warning:** {applied.warning}" if applied.warning else ""))
        return req.text + before, req.text + after, md, history_rows(session.history)

    def edit_plan(self, model: str, method: str | None, layer, request: gr.Request) -> str:
        """The line under the Layer field: which layers the next edit changes, from the model's config (no
        load) and the library's rule (:func:`planned_layers`); what is wrong with the field, if anything."""
        try:
            ckpt = self.checkpoint(self.workspace(request), model, allow_hub=False)
            num_layers, model_type = ckpt.num_layers, ckpt.model_type
        except WeightsmithError:
            return ""  # no model to plan for yet (a Hub id not downloaded, a typo): the edit will say
        try:
            chosen = layer_value(layer)
            m = check_method(method)
        except WeightsmithError as e:
            return f"⚠ {e}"
        if chosen is not None and not 0 <= chosen < num_layers:
            return f"⚠ layer {chosen} is out of range: this model has layers 0–{num_layers - 1}"
        note = ""
        if m == "patch":
            from checkpoints.arch import spec_for
            from editing.patch import gated_mlp

            if not gated_mlp(spec_for(model_type)):  # the default falls back (named_method); patch cannot
                m, note = FALLBACK_METHOD, f"; a {model_type} MLP cannot take patch neurons"
        layers = planned_layers(model_type, num_layers, m, chosen)
        if chosen is None:
            why = ("its default: four around this model's ROME layer" if m in MULTI_LAYER
                   else "this model's default")
        else:
            why = f"the four around layer {chosen}" if m in MULTI_LAYER else "the Layer field"
        return f"**{m}** will edit **{layers_text(layers)}** ({why}{note})."

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
        show_progress(progress, 0.0, "scoring the prompt, paraphrases and neighbours, then generating")
        scores = fact_scores(session.model, session.tokenizer, record)
        n = len(session.history)
        rows = [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in scores.items()]
        return rows + [["active edits", str(n)]]

    @endpoint
    def undo(self, model: str, edit_id: Annotated[float | None, Range(0, integer=True)], request: gr.Request):
        """Undo edit ``edit_id`` (empty: the latest active edit); returns (history table, message)."""
        ws = self.workspace(request)
        session = self.edit_session(ws, model, create=False)
        if edit_id is None:
            if not session.history:
                raise WeightsmithError("no active edit to undo")
            edit_id = session.history[-1]["id"]
        session.undo(int(edit_id))
        return history_rows(session.history), (f"Undid edit {int(edit_id)}; the weights are exactly as without it. "
                                               "Evaluate again for the scores without it.")

    def active_edits(self, model: str, request: gr.Request):
        """The Undo choices: the ids of the active edits, latest first; none chosen (Undo takes the latest)."""
        try:
            session = self.edit_session(self.workspace(request), model, create=False)
        except WeightsmithError:
            return gr.update(choices=[], value=None)
        return gr.update(choices=[h["id"] for h in reversed(session.history)], value=None)

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
            requests, job=gradio_job(progress, cancel),
            method=batch_method(named_method(method)) if named_method(method) else None))
        return history_rows(session.history), (f"Batch edit {applied.id}: {len(requests)} facts over "
                                               f"{layers_text(applied.layers)}.")

    @endpoint
    def save_edits(self, model: str, save_as: Literal["model", "adapter"] | None, name: str, request: gr.Request,
                   progress=gr.Progress()):
        """Write the session's edits to the workspace as a full model or a rank-1 LoRA adapter."""
        ws = self.workspace(request)
        session = self.edit_session(ws, model, create=False)
        out = ws.new_item_dir(name or "edited", default="edited")
        checked = ""
        if save_as == "model":
            ws.check_quota()
            show_progress(progress, 0.0, "saving the edited model")
            # A model stored narrower than float32 is checked fact by fact first (editing.stored_precision).
            session.export_model(out, widen=True, progress=lambda f, text: show_progress(progress, 0.9 * f, text))
            kind = "model"
            if session.precision_report is not None:
                checked = f" Checked: {session.precision_report.line()}."
        else:
            session.export_adapter(out)
            kind = "adapter"
        ws.register(out.name, kind=kind, origin="edit", details={"base": model, "edits": len(session.history)})
        return f"Saved **ws:{out.name}** ({kind}); push or download it from **Export**.{checked}"
