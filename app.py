"""Weightsmith web app (Gradio). A thin layer: widgets -> library calls.

Minimal foundation version: pick the bundled model and generate. The workbench
tabs (merge, adapters, edit, export) are added on top of the same library.
"""

from __future__ import annotations

import logging

import gradio as gr

from checkpoints.errors import WeightsmithError
from checkpoints.generation import ModelCache, generate_text

log = logging.getLogger(__name__)


def build_app(*, allow_paths: bool = False) -> gr.Blocks:
    models = ModelCache(max_models=2)

    def generate(model_ref: str, prompt: str, max_new_tokens: int) -> str:
        try:
            return generate_text(models, model_ref, prompt, max_new_tokens=int(max_new_tokens))
        except WeightsmithError as e:
            raise gr.Error(str(e)) from None

    with gr.Blocks(title="Weightsmith") as demo:
        gr.Markdown("# Weightsmith\nMerge checkpoints, mix LoRA adapters, edit facts, publish to the Hub.")
        with gr.Tab("Playground"):
            model = gr.Textbox(value="demo", label="Model", info="demo, or a Hub id")
            prompt = gr.Textbox(value="The capital of France is", label="Prompt")
            n = gr.Slider(1, 256, value=32, step=1, label="Max new tokens")
            out = gr.Textbox(label="Output", lines=6)
            gr.Button("Generate", variant="primary").click(generate, [model, prompt, n], out, api_name="generate")
    return demo


def serve(*, host: str = "127.0.0.1", port: int = 7860, allow_paths: bool = False, share: bool = False,
          max_file_size: str = "2gb", workspace_max_age: float = 3600.0) -> None:
    build_app(allow_paths=allow_paths).queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=share, max_file_size=max_file_size,
        delete_cache=(600, int(workspace_max_age)),
    )


if __name__ == "__main__":
    serve()
