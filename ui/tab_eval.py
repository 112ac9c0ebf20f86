"""The Evaluate tab: pick models and tasks, get a table and a bar plot of the models side by side."""

import gradio as gr

from checkpoints.demo_adapters import demo_adapter_refs
from evaluation.tasks import bundled_tasks

from .widgets import wire_stop

DEFAULT_TASKS = ["capitals-mc", "style-prompts"]


def eval_tab(wb, picker, heavy) -> dict:
    """Build the tab inside the open Blocks; returns the parts the page wires (see :func:`ui.layout.build_app`)."""
    tasks = list(bundled_tasks())
    with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate"):
        gr.Markdown("Score several models on the same tasks: perplexity on a text, multiple choice by "
                    "log-likelihood (acc, acc_norm as lm-eval scores them), exact match of greedy answers, and the "
                    "demo adapters' style scores. Results are cached by model content, task and settings.")
        with gr.Row():
            models = picker("Models", value=["demo", *demo_adapter_refs()], kind="any", multiselect=True,
                            info="demo, your workspace items (models and adapters), demo-adapter:NAME, Hub ids",
                            scale=3)
            chosen = gr.Dropdown(tasks, value=[t for t in DEFAULT_TASKS if t in tasks], multiselect=True,
                                 label="Bundled tasks", scale=2)
        with gr.Row():
            task_file = gr.File(label="…and/or your task file (.jsonl questions or .txt text)", type="filepath",
                                file_types=[".jsonl", ".txt"], height=120)
            # A Textbox, not a gr.Number: the page shows a Number's empty value as 0 and sends 0.
            limit = gr.Textbox(label="Questions per task (empty: all)", value="", placeholder="all", max_lines=1)
            new_tokens = gr.Slider(1, 256, value=48, step=1, label="Answer tokens (generation tasks)")
        with gr.Row():
            run = gr.Button("Evaluate", variant="primary")
            stop = gr.Button("Stop", variant="stop")
        table = gr.Dataframe(label="Scores (a column per model)", interactive=False)
        plot = gr.Plot(label="Models side by side", show_label=False)
        notes = gr.Markdown()
    run_ev = run.click(wb.eval_models, [models, chosen, task_file, limit, new_tokens], [table, plot, notes],
                       api_name="eval", **heavy)
    wire_stop(wb, stop, notes, [run_ev])
    return {}
