"""The Edit tab: causal trace, one edit or a batch file, scores, history with undo, save."""

import gradio as gr

from editing.methods import DEFAULT_METHOD, METHODS as EDIT_METHODS, MULTI_LAYER

from .widgets import wire_stop


def edit_tab(wb, picker, heavy) -> dict:
    """Build the tab inside the open Blocks; returns the parts the page wires (see :func:`ui.layout.build_app`)."""
    with gr.Tab("Edit", id="edit", elem_id="tab-edit"):
        with gr.Row():
            model = picker("Model to edit", info="loaded once per session; edits apply in memory until saved")
            # A Textbox, not a gr.Number: the page shows a Number's empty value as 0 and sends 0.
            layer = gr.Textbox(label="Layer", value="", placeholder="default", max_lines=1,
                               info="empty: the method's default; Trace fills in its suggestion")
            method = gr.Dropdown(list(EDIT_METHODS), value=DEFAULT_METHOD, label="Method",
                                 info="r-rome and alphaedit avoid ROME's disabling edits in long series; "
                                      "memit methods spread an edit over 4 layers; patch adds one neuron per "
                                      "fact that fires only on its subject")
        # Which layers the next edit changes, in numbers, before it runs (the result names them again).
        plan = gr.Markdown(f"Layer empty: **{DEFAULT_METHOD}** edits its default "
                           f"{'layers' if DEFAULT_METHOD in MULTI_LAYER else 'layer'} for the model.",
                           elem_id="edit-plan")
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
            suggested = gr.Number(visible=False, precision=0)  # the trace's layer, a number for API clients
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
                               interactive=False, column_count=7, elem_id="edit-history",
                               label="Edit history", show_label=False)
        with gr.Row():
            undo_id = gr.Dropdown(label="Edit to undo", choices=[], value=None, allow_custom_value=True,
                                  info="empty: the latest")
            undo_btn = gr.Button("Undo edit")
            batch_file = gr.File(label="Batch edits (JSON or CSV)", file_types=[".json", ".csv"])
            batch_btn = gr.Button("Apply batch")
        with gr.Row():
            # The default method's edits are new neurons, which only a full model holds.
            save_as = gr.Radio(["model", "adapter"], value="model", label="Save edits as",
                               info="adapter: rank-1 LoRA per edit, kilobytes (rome, r-rome, memit; not patch)")
            save_name = gr.Textbox(label="Name", value="edited")
            save_btn = gr.Button("Save to workspace", variant="primary")
        save_md = gr.Markdown()

    private = dict(api_visibility="private", queue=False)
    trace_ev = trace_btn.click(wb.trace, [model, prompt, subject, kind, samples],
                               [trace_fig, trace_md, suggested], api_name="trace", **heavy)
    trace_ev.success(lambda n: "" if n is None else str(int(n)), suggested, layer, **private)
    for comp in (model, method, layer):  # the trace's suggestion lands in the Layer field: a change too
        comp.change(wb.edit_plan, [model, method, layer], plan, **private)
    edit_ev = edit_btn.click(wb.edit, [model, prompt, subject, target, target_true, layer, method],
                             [before, after, edit_md, history], api_name="edit", **heavy)
    eval_ev = eval_btn.click(wb.evaluate, [model, prompt, subject, target, target_true, paraphrases, neighbours],
                             scores, api_name="evaluate", **heavy)
    # Status (and an error's badge) on the message only: a failed Undo leaves the history it did not change in view.
    undo_ev = undo_btn.click(wb.undo, [model, undo_id], [history, edit_md], api_name="undo", show_progress_on=edit_md,
                             **heavy)
    # The output of the undone edit and its scores no longer describe the model.
    undo_ev.success(lambda: ("", None), None, [after, scores], **private)
    batch_ev = batch_btn.click(wb.edit_batch, [model, batch_file, method], [history, edit_md], api_name="edit_batch", **heavy)
    for ev in (edit_ev, undo_ev, batch_ev):
        ev.success(wb.active_edits, [model], undo_id, **private)
    save_ev = save_btn.click(wb.save_edits, [model, save_as, save_name], save_md, api_name="save_edits", **heavy)
    wire_stop(wb, stop, edit_md, [trace_ev, edit_ev, eval_ev, batch_ev])
    return {"creates_items": [save_ev]}
