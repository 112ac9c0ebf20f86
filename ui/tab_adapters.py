"""The Adapters tab: adapters and weights, a method from the adapter registry, the mix recipe YAML, run."""

import gradio as gr

from checkpoints.demo_adapters import demo_adapter_refs
from checkpoints.errors import WeightsmithError

from .forms import (adapter_method_choices, adapter_method_md, adapter_param_rows, mix_form_from_yaml,
                    mix_form_to_yaml, named_rows)
from .widgets import run_controls, wire_stop


def adapters_tab(wb, picker, heavy) -> dict:
    """Build the tab inside the open Blocks; returns the parts the page wires (see :func:`ui.layout.build_app`)."""
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
        run, stop, result, result_ref = run_controls("Mix")
        gr.Markdown("The result becomes the Playground's working model: try it there against the base.")

    form = [base, table, method, params, lines_on, alpha, beta, output]
    private = dict(api_visibility="private", queue=False)

    def on_method(m):
        return adapter_param_rows(m), adapter_method_md(m)

    def on_add(rows, ref):
        if not ref:
            return gr.skip()
        data = named_rows(rows) + [[ref, "1.0"]]
        return gr.update(value={"headers": ["adapter", "weight"], "data": data})

    method.input(on_method, [method], [params, method_info], **private).then(
        mix_form_to_yaml, form, [recipe, status], **private)
    up_ev = up_files.upload(wb.upload_adapter, [up_files, table], [table, up_msg], api_visibility="private", **heavy)
    up_ev.then(mix_form_to_yaml, form, [recipe, status], **private)
    add_btn.click(on_add, [table, add_ref], table, **private).then(mix_form_to_yaml, form, [recipe, status], **private)
    for comp in (base, table, params, lines_on, alpha, beta, output):
        comp.input(mix_form_to_yaml, form, [recipe, status], **private)
    # Either side may be edited: the recipe box, edited by hand, sets the form (the table above all).
    recipe.input(mix_from_yaml, [recipe], [*form, method_info, status], **private, trigger_mode="always_last")
    run_ev = run.click(wb.mix_adapters, [recipe, out_name], [result, result_ref], api_name="mix_adapters", **heavy)
    wire_stop(wb, stop, result, [run_ev])
    return {"creates_items": [run_ev, up_ev], "result_ref": result_ref, "adapter_picker": add_ref,
            "demo_adapters": demo_refs, "init": (mix_form_to_yaml, form, [recipe, status])}


def mix_from_yaml(text: str) -> list:
    """The recipe box, edited by hand -> every form widget, the method's description and the status line
    (a recipe the form cannot show leaves the form as it was and says why)."""
    try:
        f = mix_form_from_yaml(text)
    except WeightsmithError as e:
        return [gr.skip()] * 9 + [f"⚠ {e}"]
    return [f["base"], gr.update(value=f["adapters"]), f["method"], f["params"], f["lines_on"], f["alpha"],
            f["beta"], f["output"], adapter_method_md(f["method"]), "✓ form updated from YAML"]
