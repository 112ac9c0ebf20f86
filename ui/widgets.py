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


STOP_WAIT_SECONDS = 600  # a stopped job ends at its next step; past this the page keeps "Stopping…"


def wire_stop(wb, stop: gr.Button, message: gr.Markdown, events: list) -> None:
    """Stop cancels ``events``' job: ``message`` says "Stopping…" at once, then "Stopped" when the job has ended."""
    def stopped(request: gr.Request):
        from .workbench_base import session_key

        ended = wb.jobs.wait_stopped(session_key(request), STOP_WAIT_SECONDS)
        return "Stopped; nothing was written." if ended else gr.skip()

    stop.click(wb.stop, None, message, cancels=events, api_visibility="private", queue=False).then(
        stopped, None, message, api_visibility="private", concurrency_limit=None, concurrency_id="stop")
