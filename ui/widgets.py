"""Widget groups more than one tab uses."""

import gradio as gr


def run_controls(label: str) -> tuple[gr.Button, gr.Button, gr.Markdown, gr.Textbox]:
    """The Run and Stop buttons of a job that makes a workspace item, and where its result shows:
    (run, stop, summary Markdown, ``ws:<name>`` of the result)."""
    with gr.Row():
        run = gr.Button(label, variant="primary")
        stop = gr.Button("Stop", variant="stop")
    with gr.Row():
        result = gr.Markdown()
        result_ref = gr.Textbox(label="Result", interactive=False)
    return run, stop, result, result_ref
