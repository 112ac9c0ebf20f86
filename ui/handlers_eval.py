"""Evaluate tab handlers: several models on several tasks, as a table and a bar plot (one library call)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import gradio as gr

from checkpoints.errors import WeightsmithError

from .endpoint import FilePath, Range, Texts, endpoint
from .forms import optional_number
from .plots_eval import eval_bars_plot
from .progress import gradio_job, show_progress

MAX_EVAL_MODELS = 6  # each is loaded in turn; more belongs in the CLI


class EvalHandlers:
    """Mixin of :class:`ui.workbench.Workbench`."""

    def eval_cache(self):
        """The server's result cache: beside the editing statistics when the operator placed those, else under
        the Weightsmith home. Keyed by content, so sessions share results without seeing each other's files."""
        from evaluation.cache import EvalCache

        root = self.config.stats_root
        return EvalCache(Path(root).parent / "eval") if root else EvalCache.default()

    def eval_model(self, ws, ref: str, cache):
        """A picked model (``demo``, a Hub id, ``ws:`` item, a workspace adapter or a demo adapter) for the library."""
        from checkpoints.demo_adapters import is_demo_adapter_ref
        from evaluation.run import model_from_ref

        policy = self.policy(ws)
        if is_demo_adapter_ref(ref):
            return model_from_ref(ref, device=self.config.device, cache=cache, **policy)
        base = None
        if ref.startswith("ws:") and ws.item(ref).kind == "adapter":
            base = ws.item(ref).details.get("base")
            base = self.ref(ws, base) if base else None
        return model_from_ref(self.ref(ws, ref), device=self.config.device, cache=cache, name=ref, base=base,
                              **policy)

    @endpoint
    def eval_models(self, models: Texts, tasks: Texts, task_file: FilePath,
                    limit,
                    max_new_tokens: Annotated[float, Range(1, 256, integer=True)],
                    request: gr.Request, progress=gr.Progress()):
        """Score ``models`` on the bundled ``tasks`` and an uploaded ``task_file`` (either may be empty).

        Returns (table of scores: a row per task and metric, a column per model; bar plot; notes Markdown).
        """
        from evaluation.run import EvalSettings, evaluate_models
        from evaluation.tasks import bundled_tasks

        limit = optional_number(limit, "limit", empty="all questions", low=1, high=20_000, integer=True)
        models = [m.strip() for m in models if m.strip()]
        if not models:
            raise WeightsmithError("pick at least one model")
        if len(models) > MAX_EVAL_MODELS:
            raise WeightsmithError(f"{len(models)} models: at most {MAX_EVAL_MODELS} at once here")
        known = bundled_tasks()
        unknown = [t for t in tasks if t not in known]
        if unknown:  # only bundled names: a path typed here must not reach the server's disk
            raise WeightsmithError(f"{unknown[0]}: not a bundled task (have: {', '.join(known)}); upload a file instead")
        chosen: list[Any] = list(tasks) + ([task_file] if task_file else [])
        if not chosen:
            raise WeightsmithError("pick a bundled task or upload a task file")
        ws = self.workspace(request)
        cache = self.eval_cache()
        specs = [self.eval_model(ws, m, cache) for m in models]
        settings = EvalSettings(limit=limit, max_new_tokens=int(max_new_tokens))
        show_progress(progress, 0.0, "reading the tasks")
        result = self.run_job(request, lambda cancel: evaluate_models(
            specs, chosen, settings=settings, job=gradio_job(progress, cancel), device=self.config.device,
            cache=cache))
        headers, rows = result.pivot()
        table = {"headers": headers, "data": [[t, m, *[None if v is None else round(v, 4) for v in vals]]
                                              for t, m, *vals in rows]}
        return table, eval_bars_plot(headers, rows), eval_notes(result)


def eval_notes(result) -> str:
    """What the table does not say: items per task, what came from the cache, a few answers."""
    lines = ["### Evaluated"]
    for s in result.scores:
        where = "from the cache" if s.cached else f"{s.seconds:.1f} s"
        lines.append(f"- **{s.model}** on **{s.task}** ({s.kind}, {s.n} {'tokens' if s.kind == 'perplexity' else 'items'}):"
                     f" {where}")
        for sample in s.samples[:1]:
            lines.append(f"  - “{sample['prompt'][:80]}” → “{sample['answer'][:120]}”")
    return "\n".join(lines)
