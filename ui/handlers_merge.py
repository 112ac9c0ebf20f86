"""Merge tab handlers: run a recipe into a workspace item, and the block count its LiNeS plot previews."""

import gradio as gr

from checkpoints.errors import WeightsmithError
from checkpoints.sizes import format_size
from checkpoints.textfiles import load_yaml

from .endpoint import endpoint
from .plots import norms_plot
from .progress import gradio_job, show_progress
from .tables import md_table


class MergeHandlers:
    """Mixin of :class:`ui.workbench.Workbench`."""

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
        show_progress(progress, 0.0, "checking models")
        result = self.run_job(request, lambda cancel: run_merge(
            resolved, out, device=self.config.device, job=gradio_job(progress, cancel), **self.local_policy(ws)))
        ws.register(out.name, kind="model", origin="merge",
                    details={"method": result.method, "tensors_changed": result.tensors_changed})
        rows = [("result", f"`ws:{out.name}`"), ("method", result.method),
                ("tensors changed", f"{result.tensors_changed} of {result.tensors_total}"),
                ("blocks", result.num_blocks), ("output", format_size(result.output_bytes)),
                ("weights", result.finite_check), ("time", f"{result.seconds:.1f} s")]
        if result.lines_alpha is not None:
            rows.append(("LiNeS", f"α = {result.lines_alpha:.4g}, β = {result.lines_beta:.4g}"))
        md = "### Merged\n" + md_table(rows) + "\n\nTry it in the **Playground** or download it from **Export**."
        return md, norms_plot(result.block_norms), f"ws:{out.name}"

    @endpoint
    def merge_blocks(self, base: str, request: gr.Request):
        """Blocks of the chosen base model (the LiNeS plot's x axis); unchanged while it cannot be read."""
        try:
            return self.checkpoint(self.workspace(request), base, allow_hub=False).num_layers
        except WeightsmithError:
            return gr.skip()
