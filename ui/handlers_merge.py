"""Merge tab handlers: run a recipe into a workspace item, analyse its task vectors before merging,
and the block count its LiNeS plot previews."""

import gradio as gr

from checkpoints.errors import WeightsmithError
from checkpoints.sizes import format_size
from checkpoints.textfiles import load_yaml

from .endpoint import endpoint
from .forms import optional_number
from .plots import norms_plot
from .progress import gradio_job, show_progress
from .tables import md_table


class MergeHandlers:
    """Mixin of :class:`ui.workbench.Workbench`."""

    @endpoint
    def merge(self, recipe_yaml: str, out_name: str, request: gr.Request, progress=gr.Progress()):
        """Run a merge recipe (mergekit YAML; several ``name:``d documents for a multi-stage recipe,
        whose intermediate stages are cached in this session's workspace) into a new workspace item.

        Returns (summary Markdown, task-vector norms plot, ``ws:<name>`` of the result).
        """
        from merging.multistage import run_recipe

        ws = self.workspace(request)
        ws.check_quota()
        out = ws.new_item_dir(out_name or "merge", default="merge")
        show_progress(progress, 0.0, "checking models")
        run = self.run_job(request, lambda cancel: run_recipe(
            recipe_yaml, out, rename=lambda r: self.ref(ws, r), intermediate_dir=ws.tmp_dir / "intermediate",
            device=self.config.device, job=gradio_job(progress, cancel), **self.local_policy(ws)))
        result = run.result
        ws.register(out.name, kind="model", origin="merge",
                    details={"method": result.method, "tensors_changed": result.tensors_changed})
        rows = [("result", f"`ws:{out.name}`"), ("method", result.method),
                ("tensors changed", f"{result.tensors_changed} of {result.tensors_total}"),
                ("blocks", result.num_blocks), ("output", format_size(result.output_bytes)),
                ("weights", result.finite_check), ("time", f"{result.seconds:.1f} s")]
        if result.lines_alpha is not None:
            rows.append(("LiNeS", f"α = {result.lines_alpha:.4g}, β = {result.lines_beta:.4g}"))
        if run.stages:
            rows.append(("stages", ", ".join(f"{s.name} ({'reused' if s.reused else 'merged'})" for s in run.stages)))
        md = "### Merged\n" + md_table(rows) + "\n\nTry it in the **Playground** or download it from **Export**."
        return md, norms_plot(result.block_norms), f"ws:{out.name}"

    @endpoint
    def analyze(self, recipe_yaml: str, density, request: gr.Request, progress=gr.Progress()):
        """Task vectors of a recipe's models against its base, per block, before merging: norms, pairwise
        cosines, the TIES sign-conflict rate and the |τ| mass kept at ``density`` (empty: the recipe's own).

        Returns (summary Markdown with the table, the four plots, every number as JSON).
        """
        from merging.analysis import analyze_recipe
        from merging.analysis_plots import analysis_figure

        density = optional_number(density, "density", empty="the recipe's own", low=0, high=1)
        ws = self.workspace(request)
        resolved = self.session_recipe(ws, recipe_yaml)
        show_progress(progress, 0.0, "checking models")
        result = self.run_job(request, lambda cancel: analyze_recipe(
            resolved, density=density, device=self.config.device, job=gradio_job(progress, cancel),
            **self.local_policy(ws)))
        md = (f"### Task-vector analysis ({result.seconds:.1f} s)\n```text\n{result.table()}\n```\n"
              "conflict: kept parameters whose trimmed task-vector values disagree in sign (TIES drops them); "
              "kept: share of each model's |τ| mass that the density keeps.")
        return md, analysis_figure(result), result.to_dict()

    def session_recipe(self, ws, recipe_yaml: str):
        """The recipe YAML parsed and validated, its models renamed to what this session may read."""
        from merging.recipe import MergeRecipe

        recipe = MergeRecipe.from_dict(load_yaml(recipe_yaml, what="recipe"))
        return recipe.with_models_renamed(lambda r: self.ref(ws, r))

    @endpoint
    def merge_blocks(self, base: str, request: gr.Request):
        """Blocks of the chosen base model (the LiNeS plot's x axis); unchanged while it cannot be read."""
        try:
            return self.checkpoint(self.workspace(request), base, allow_hub=False).num_layers
        except WeightsmithError:
            return gr.skip()
