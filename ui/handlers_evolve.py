"""Evolve tab handlers: an evolutionary merge search into a workspace item, its curve redrawn after every trial.

One library call (:func:`merging.evolve.run_search`), as the CLI's ``weightsmith evolve``. The search runs on
a thread; its job's progress and each finished trial come back through a queue, so the handler (a generator)
shows progress and yields the plot, the best recipe so far and the trial table as trials finish.
The study is kept in the session's temp folder under the search's hash, so running the same search again
(after a Stop) resumes it.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Any

import gradio as gr

from checkpoints.errors import WeightsmithError
from checkpoints.refs import join_lora_ref, split_lora_ref
from checkpoints.textfiles import load_yaml

from .endpoint import endpoint
from .progress import gradio_job, show_progress
from .tables import md_table

MAX_APP_TRIALS = 200
MAX_APP_MINUTES = 120.0
TABLE_ROWS = 50  # the newest trials shown


class EvolveHandlers:
    """Mixin of :class:`ui.workbench.Workbench`."""

    def evolve_spec(self, ws, search_yaml: str):
        """(the search as the user wrote it, for display; the same with models this session may read, to run)."""
        from evaluation.tasks import bundled_tasks
        from merging.evolve_space import SearchSpec

        data = load_yaml(search_yaml, what="search file")
        known = bundled_tasks()
        tasks = data.get("tasks") if isinstance(data, dict) else None
        for item in tasks if isinstance(tasks, list) else []:
            name = item.get("task") if isinstance(item, dict) else item
            if str(name) not in known:  # checked before any file is read: a path typed here never reaches the disk
                raise WeightsmithError(f"search: task {name} is not a bundled task (have: {', '.join(known)})")
        shown = SearchSpec.from_dict(copy.deepcopy(data))  # every mistake named before anything is resolved
        if shown.max_trials is not None and shown.max_trials > MAX_APP_TRIALS:
            raise WeightsmithError(f"search: budget.trials {shown.max_trials}: at most {MAX_APP_TRIALS} here")
        if shown.minutes is None or shown.minutes > MAX_APP_MINUTES:
            raise WeightsmithError(f"search: give budget.minutes (at most {MAX_APP_MINUTES:g} here; the CLI has no limit)")
        data["models"] = [dict(m, model=self.evolve_ref(ws, m["model"])) if isinstance(m, dict)
                          else self.evolve_ref(ws, m) for m in data["models"]]
        if data.get("base_model"):
            data["base_model"] = self.evolve_ref(ws, data["base_model"])
        return shown, SearchSpec.from_dict(data)

    def evolve_ref(self, ws, ref: Any) -> str:
        """A model reference, ``model+adapter`` allowed (the adapter may be ``demo-adapter:NAME``)."""
        model, lora = split_lora_ref(str(ref))
        if lora is None:
            return self.ref(ws, model)
        return join_lora_ref(self.ref(ws, model), self.adapter_ref(ws, lora))

    @endpoint
    def evolve(self, search_yaml: str, out_name: str, request: gr.Request, progress=gr.Progress()):
        """Run an evolutionary merge search (SEARCH.yaml text) and write its best merge as a workspace item.

        Yields, after each trial: (plot of score against trial, best recipe so far as YAML, trial table,
        summary Markdown, ``ws:<name>`` of the result once written).
        """
        from checkpoints.demo_adapters import demo_adapters
        from merging.evolve import run_search

        ws = self.workspace(request)
        shown, spec = self.evolve_spec(ws, search_yaml)
        ws.check_quota()
        out = ws.new_item_dir(out_name or "evolved", default="evolved")
        policy = self.local_policy(ws)
        policy["trusted_roots"] = (*policy["trusted_roots"], *demo_adapters().values())
        events: queue.Queue = queue.Queue()
        outcome: dict[str, Any] = {}

        def work(cancel: threading.Event):
            job = gradio_job(lambda fraction, desc=None: events.put(("progress", fraction, desc)), cancel)
            return run_search(spec, out, job=job, device=self.config.device, state_dir=ws.tmp_dir / f"evolve-{spec.identity()}",
                              on_trial=lambda records: events.put(("trials", records)), **policy)

        def runner():
            try:
                outcome["result"] = self.run_job(request, work)
            except BaseException as e:  # noqa: BLE001 - handed to the handler's thread, which raises it
                outcome["error"] = e
            finally:
                events.put(("end",))

        show_progress(progress, 0.0, "opening the study")
        threading.Thread(target=runner, name="evolve", daemon=True).start()
        while True:
            event = events.get()
            if event[0] == "end":
                break
            if event[0] == "progress":
                show_progress(progress, event[1], event[2])
            else:
                yield (*evolve_view(shown, event[1]), "Searching…", "")
        if "error" in outcome:
            raise outcome["error"]
        result = outcome["result"]
        ws.register(out.name, kind="model", origin="evolve",
                    details={"method": result.best.recipe.merge_method, "best_score": result.best.score})
        rows = [("result", f"`ws:{out.name}`"), ("best", f"trial {result.best.number}, score {result.best.score:.4f}"),
                ("written model, scored again", f"{result.verified_score:.4f}"),
                ("trials", f"{sum(t.state == 'complete' for t in result.trials)} complete "
                           f"({result.ran_here} ran now)"), ("stopped", result.stopped)]
        md = "### Search done\n" + md_table(rows) + "\n\nThe card records the search; try the model in the **Playground**."
        yield (*evolve_view(shown, result.trials), md, f"ws:{out.name}")


def evolve_view(shown, records) -> tuple:
    """(plot, best recipe YAML with the user's model names, trial table) from the study's trials."""
    from merging.evolve_plots import search_figure

    done = [r for r in records if r.state == "complete"]
    best = max(done, key=lambda r: (r.score, -r.number)) if done else None
    recipe = (f"# trial {best.number}, score {best.score:.4f}\n" + shown.recipe(best.values).to_yaml()) if best else ""
    names = [d.name for d in shown.dimensions]
    table = {"headers": ["trial", "state", "score", *names],
             "data": [[r.number, r.state, None if r.score is None else round(r.score, 4),
                       *[round(r.values[n], 4) if n in r.values else None for n in names]]
                      for r in records[-TABLE_ROWS:]]}
    return search_figure(records), recipe, table
