"""The Evolve tab: a SEARCH.yaml, a live plot of score against trial, the best recipe so far, and the trials."""

import gradio as gr

from checkpoints.demo_adapters import demo_adapter_refs

from .widgets import run_controls, wire_stop


def default_search() -> str:
    """The demo: the two demo adapters on the demo model, weights and LiNeS searched, scored on bundled tasks."""
    adapters = demo_adapter_refs()[:2] or ["demo-adapter:caps", "demo-adapter:pirate"]
    models = "\n".join(f"  - demo+{a}" for a in adapters)
    return f"""merge_method: task_arithmetic
base_model: demo
models:
{models}
search:
  weight: [0.0, 2.0]          # one dimension per model
  lines: {{alpha: [0.0, 1.0], beta: [0.0, 1.0]}}
tasks:
  - {{task: style-prompts, metric: caps}}
  - {{task: style-prompts, metric: pirate}}
  - {{task: capitals-mc, metric: acc}}
eval: {{limit: 8, max_new_tokens: 24}}
budget: {{trials: 16, minutes: 30}}
"""


def evolve_tab(wb, picker, heavy) -> dict:
    """Build the tab inside the open Blocks; returns the parts the page wires (see :func:`ui.layout.build_app`)."""
    with gr.Tab("Evolve", id="evolve", elem_id="tab-evolve"):
        gr.Markdown("Search merge parameters automatically: CMA-ES (optuna) proposes a recipe, Weightsmith merges "
                    "it and scores it on the tasks, and so on until the budget is spent; the best merge becomes a "
                    "workspace item whose card records the search. Ranges are `[low, high]`; "
                    "`{range: [a, b], gradient: 3}` searches a depth gradient; `shared: true` one value for all "
                    "models. Run the same search again after a Stop to resume it.")
        with gr.Row():
            with gr.Column(scale=2):
                search = gr.Code(value=default_search(), language="yaml", label="SEARCH.yaml", interactive=True,
                                 lines=20)
                out_name = gr.Textbox(label="Output name", value="evolved")
            with gr.Column(scale=3):
                plot = gr.Plot(label="Score against trial", show_label=False)
                best = gr.Code(language="yaml", label="Best recipe so far", interactive=False, lines=10)
        run, stop, result, result_ref = run_controls("Search")
        trials = gr.Dataframe(label="Trials (newest 50)", interactive=False)
    # Its own queue slot: a search runs for minutes to hours and must not hold the merges' slot meanwhile.
    ev = run.click(wb.evolve, [search, out_name], [plot, best, trials, result, result_ref], api_name="evolve",
                   concurrency_limit=1, concurrency_id="evolve")
    wire_stop(wb, stop, result, [ev])
    return {"creates_items": [ev], "result_ref": result_ref}
