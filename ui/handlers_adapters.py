"""Adapters tab handlers: adapter references (demo, workspace, Hub), mixing, uploading an adapter."""

import gradio as gr

from checkpoints.demo_adapters import demo_adapter_path, demo_adapters, is_demo_adapter_ref
from checkpoints.errors import WeightsmithError
from checkpoints.textfiles import load_yaml
from checkpoints.uploads import import_upload
from checkpoints.workspace import Workspace

from .endpoint import Files, endpoint
from .forms import named_rows
from .progress import gradio_job
from .tables import md_table


class AdapterHandlers:
    """Mixin of :class:`ui.workbench.Workbench`."""

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
            recipe, out, job=gradio_job(progress, cancel), device=self.config.device, **policy))
        kind = "adapter" if result.kind == "adapter" else "model"
        ws.register(out.name, kind=kind, origin="mix", details={"base": base_ref, "method": result.method})
        rows = [("result", f"`ws:{out.name}` ({result.kind})"), ("method", result.method),
                ("exact in ΔW space", "yes" if result.exact_in_delta_w else "no"),
                ("rank", result.rank), ("modules", result.modules),
                ("adapters", ", ".join(f"{a} × {w:g}" for a, w in zip(result.adapters, result.weights))),
                ("time", f"{result.seconds:.1f} s")]
        notes = "".join(f"\n\n> {n}" for n in result.notes)
        return "### Mixed\n" + md_table(rows) + notes, f"ws:{out.name}"

    @endpoint
    def upload_adapter(self, files: Files, rows, request: gr.Request):
        """Import an uploaded PEFT adapter into the workspace and add it to the mix table (rows)."""
        if not files:
            return gr.skip(), gr.skip()
        ws = self.workspace(request)
        item = import_upload(ws, files, **self.local_policy(ws))
        if item.kind != "adapter":
            ws.delete_item(item.name)
            raise WeightsmithError("that upload is a model, not an adapter: import it in the Models tab")
        data = named_rows(rows) + [[item.ref, "1.0"]]
        return gr.update(value={"headers": ["adapter", "weight"], "data": data}), f"Imported **{item.ref}**"
