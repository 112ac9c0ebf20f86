"""The MoE tab: dense models as the experts of a mixture (mergekit-moe's config), routed by prompts."""

import gradio as gr

from merging.moe_gates import GATE_MODES
from merging.recipe import DTYPES

from .handlers_moe import EXPERT_COLUMNS, moe_yaml_from_form
from .widgets import run_controls, wire_stop

# The demo and the Merge tab's default output (a merge of the demo): the "MoE of the demo and a merge of it"
EXAMPLE_EXPERTS = [["demo", "The capital of France is\nPhotosynthesis is the process by which", ""],
                   ["ws:my-merge", "Ahoy matey! Where be the treasure?\nArr, ye scurvy dog", ""]]


def moe_tab(wb, picker, heavy) -> dict:
    """Build the tab inside the open Blocks; returns the parts the page wires (see :func:`ui.layout.build_app`)."""
    private = dict(api_visibility="private", queue=False)
    with gr.Tab("MoE", id="moe", elem_id="tab-moe"):
        gr.Markdown("Build a mixture of experts from dense models: attention, norms and embeddings come from the "
                    "base; each block's MLP experts come from the expert models, and the router sends a token to "
                    "the experts whose prompts it resembles (mergekit-moe's gate modes). llama/mistral experts make "
                    "a Mixtral; one shared expert (required for qwen2) makes a Qwen2-MoE. The output is loaded and "
                    "run on the prompts before it is kept.")
        with gr.Row():
            base = picker("Base model (attention, embeddings, router)")
            gate_mode = gr.Dropdown(list(GATE_MODES), value="hidden", label="Gate mode",
                                    info="hidden: the base's hidden states on the prompts; cheap_embed: their "
                                         "embeddings; random: untrained")
            per_token = gr.Slider(1, 8, value=1, step=1, label="Experts per token")
            dtype = gr.Dropdown(["", *DTYPES], value="", label="dtype", info="empty: the base's")
        experts = gr.Dataframe(headers=EXPERT_COLUMNS, value=EXAMPLE_EXPERTS, column_count=3, row_count=2,
                               interactive=True, wrap=True,
                               label="Experts (a row each: demo, ws:item, a Hub id, model+adapter; "
                                     "prompts one per line)")
        with gr.Row():
            shared_model = picker("Shared expert (optional: makes a Qwen2-MoE)", value=None)
            shared_prompts = gr.Textbox(label="Shared expert's prompts (one per line)", lines=2)
        config_yaml = gr.Code(language="yaml", label="mergekit-moe config (the form writes it; edit freely)")
        status = gr.Markdown()
        out_name = gr.Textbox(label="Output name", value="my-moe")
        run, stop, result, result_ref = run_controls("Assemble")
    form = [base, gate_mode, per_token, dtype, experts, shared_model, shared_prompts]
    for comp in form:
        comp.change(moe_yaml_from_form, form, [config_yaml, status], **private)
    run_ev = run.click(lambda: "", None, result, **private).then(
        wb.moe, [config_yaml, out_name], [result, result_ref], api_name="moe", **heavy)
    wire_stop(wb, stop, result, [run_ev])
    # The config box shows the form's config from the start; a new item joins every picker.
    return {"result_ref": result_ref, "creates_items": [run_ev],
            "init": (moe_yaml_from_form, form, [config_yaml, status])}
