"""The Merge tab: a form generated from the method registry, the recipe YAML beside it, LiNeS preview,
the task-vector analysis (Analyze), run."""

import gradio as gr

from checkpoints.errors import WeightsmithError
from merging.methods import REGISTRY

from .forms import (merge_columns, merge_default_row, merge_form_from_yaml, merge_method_md, merge_shared_rows,
                    merge_yaml_from_form, merge_yaml_untouched, named_rows, takes_base)
from .plots import lines_plot
from .widgets import run_controls, wire_stop


def merge_tab(wb, picker, heavy) -> dict:
    """Build the tab inside the open Blocks; returns the parts the page wires (see :func:`ui.layout.build_app`)."""
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
            analyze = gr.Button("Analyze", scale=0, min_width=120)
            # A Textbox, not a gr.Number: the page shows a Number's empty value as 0 and sends 0.
            density = gr.Textbox(label="Density for the TIES trim", value="", placeholder="the recipe's own",
                                 max_lines=1, info="empty: the recipe's own (0.2 for methods without one)")
            gr.Markdown("Before merging: each model's task vector per block, how alike they are, how often "
                        "their signs clash after TIES's trim, and how much of |τ| the density keeps.")
        analysis = gr.Markdown()
        analysis_fig = gr.Plot(label="Task-vector analysis")
        with gr.Accordion("Analysis numbers (JSON)", open=False):
            analysis_json = gr.JSON(label="analysis")
        run, stop, result, result_ref = run_controls("Merge")
        norms_fig = gr.Plot(label="Task-vector norms per block")

    form = [method, base, models, shared, lines_on, alpha_auto, alpha, beta, out_dtype, seed]
    form_and_recipe = [*form, recipe]  # the recipe keys without a widget (tokenizer, chat_template...) are kept
    private = dict(api_visibility="private", queue=False)

    def on_method(m, rows):
        # Keep the models, reset the columns to this method's per-model parameters.
        keep = [r[0] for r in named_rows(rows)]
        cols = merge_columns(m)
        data = [merge_default_row(m, ref) for ref in keep] or [[""] * len(cols)]
        return (gr.update(value={"headers": cols, "data": data}, headers=cols), merge_shared_rows(m),
                merge_method_md(m), base_update(m))

    def on_add(m, rows, ref):
        if not ref:
            return gr.skip()
        cols = merge_columns(m)
        data = named_rows(rows)
        data.append(merge_default_row(m, ref))
        return gr.update(value={"headers": cols, "data": data})

    def plot(on, auto, a, b, L, rows):
        n = len(named_rows(rows))
        return lines_plot(on, auto, a, b, L, max(1, n))

    method.input(on_method, [method, models], [models, shared, method_info, base], **private).then(
        merge_yaml_from_form, form_and_recipe, [recipe, recipe_status], **private)
    add_btn.click(on_add, [method, models, add_ref], models, **private).then(
        merge_yaml_from_form, form_and_recipe, [recipe, recipe_status], **private)
    for comp in (base, models, shared, lines_on, alpha_auto, alpha, beta, out_dtype, seed):
        comp.input(merge_yaml_from_form, form_and_recipe, [recipe, recipe_status], **private)
    recipe.input(form_from_yaml, [recipe], [*form, method_info, recipe_status], **private,
                 trigger_mode="always_last")
    base.change(wb.merge_blocks, [base], num_blocks, api_visibility="private")
    for comp in (lines_on, alpha_auto, alpha, beta, num_blocks, models):
        comp.change(plot, [lines_on, alpha_auto, alpha, beta, num_blocks, models], lines_fig, **private)

    # The previous summary goes first: beside a failure it would read as this run's result.
    run_ev = run.click(lambda: ("", None), None, [result, norms_fig], **private).then(
        wb.merge, [recipe, out_name], [result, norms_fig, result_ref], api_name="merge", **heavy)
    analysis_out = [analysis, analysis_fig, analysis_json]
    analyze_ev = analyze.click(lambda: ("", None, None), None, analysis_out, **private).then(
        wb.analyze, [recipe, density], analysis_out, api_name="analyze", **heavy)
    wire_stop(wb, stop, result, [run_ev, analyze_ev])
    return {"creates_items": [run_ev], "result_ref": result_ref,
            "init": (merge_yaml_untouched, form, [recipe, recipe_status])}


def base_update(method: str):
    """The base picker for ``method``: off (and left out of the recipe) when the method takes no base."""
    if takes_base(method):
        return gr.update(interactive=True, info="the model the task vectors are taken against")
    return gr.update(interactive=False, info=f"{method} takes no base model: list every model below")


def form_from_yaml(text: str) -> list:
    """The recipe box, edited by hand -> every form widget, the method's description and the status line."""
    try:
        f = merge_form_from_yaml(text)
    except WeightsmithError as e:
        return [gr.skip()] * 11 + [f"⚠ {e}"]
    base = gr.update(value=f["base"], **{k: v for k, v in base_update(f["method"]).items() if k != "__type__"})
    return [f["method"], base, gr.update(value=f["models"], headers=f["models"]["headers"]), f["shared"],
            f["lines_on"], f["alpha_auto"], f["alpha"], f["beta"], f["out_dtype"], f["seed"],
            merge_method_md(f["method"]), "✓ form updated from YAML"]
