"""The page: header, Models, Playground and Export tabs, and the wiring between tabs.

The Merge, Adapters and Edit tabs are built by ``ui.tab_merge``, ``ui.tab_adapters`` and
``ui.tab_edit`` from the libraries' registries. Every action is also an API endpoint with a
stable ``api_name`` (``merge``, ``mix_adapters``, ``trace``, ``edit``, ``evaluate``, ``eval``, ``generate``,
``export``, ``push``, ``moe``, ``evolve``, plus ``inspect`` and ``upload``), callable from ``gradio_client``.
Heavy jobs share queue concurrency groups so two merges never run at once.
"""

import os

import gradio as gr

from checkpoints.gguf_export import GGUF_TYPES
from checkpoints.hub_client import configure_hub_client
from checkpoints.secrets import install_redaction

from .config import MODEL_FILE_TYPES, AppConfig
from .endpoint import guard_preprocess
from .tab_adapters import adapters_tab
from .tab_edit import edit_tab
from .tab_eval import eval_tab
from .tab_evolve import evolve_tab
from .tab_merge import merge_tab
from .tab_moe import moe_tab
from .workbench import Workbench


def build_app(*, allow_paths: bool = False, config: AppConfig | None = None) -> gr.Blocks:
    """The Gradio Blocks app. ``config`` overrides ``allow_paths`` when given."""
    config = config or AppConfig(allow_paths=allow_paths)
    install_redaction()  # no token in any log line or traceback of this server, whichever logger writes it
    configure_hub_client()  # every Hub request of this server has a timeout
    wb = Workbench(config)
    heavy = dict(concurrency_limit=config.heavy_concurrency, concurrency_id="heavy")
    in_space = bool(os.environ.get("SPACE_ID"))

    # Gradio's own cache (copies of files sent to browsers) ages out with the workspaces.
    age = int(config.workspace_max_age)
    with gr.Blocks(title="Weightsmith", delete_cache=(max(60, min(600, age)), age)) as demo:
        demo.workbench = wb  # for tests and embedding
        with gr.Row():
            gr.Markdown("# Weightsmith\nMerge checkpoints, mix LoRA adapters, edit facts with ROME, "
                        "publish to the Hub. Your uploads and results live in a private workspace for this session.")
            if in_space:
                gr.LoginButton(scale=0)

        model_pickers: list[tuple[gr.Dropdown, str]] = []

        def picker(label: str, value: str = "demo", kind: str = "model", **kw) -> gr.Dropdown:
            """A model dropdown refreshed with the session's items; ``kind="any"`` also lists adapters."""
            d = gr.Dropdown(choices=["demo", *config.named_models], value=value, label=label,
                            allow_custom_value=True, **kw)
            model_pickers.append((d, kind))
            return d

        src_help = ("demo, a Hub id (owner/name), or a workspace item (ws:name)"
                    + (", or a folder on this server" if config.allow_paths else ""))

        # ---- Models -----------------------------------------------------------
        with gr.Tab("Models", id="models", elem_id="tab-models"):
            with gr.Row():
                with gr.Column(scale=1):
                    gr.Markdown("### Inspect a model")
                    m_ref = picker("Model", info=src_help)
                    m_btn = gr.Button("Inspect", variant="primary")
                    m_info = gr.Dataframe(headers=["property", "value"], label="Summary", interactive=False,
                                          column_count=2)
                with gr.Column(scale=1):
                    gr.Markdown("### Upload into your workspace\nsafetensors (+config.json, tokenizer; "
                                "sharded with its index), a PEFT adapter (adapter_config.json + "
                                "adapter_model.safetensors), a .gguf file, or a zip of them.")
                    u_files = gr.File(file_count="multiple", file_types=MODEL_FILE_TYPES, label="Files")
                    with gr.Row():
                        u_name = gr.Textbox(label="Name", placeholder="my-model")
                        u_cfg = picker("Config from (bare weights only)", value=None)
                    u_btn = gr.Button("Import", variant="primary")
                    u_msg = gr.Markdown()
            gr.Markdown("### Your workspace")
            ws_table = gr.Dataframe(headers=["item", "kind", "origin", "size"], interactive=False,
                                    column_count=4, label="Items (private to this session)")
            with gr.Row():
                ws_refresh = gr.Button("Refresh", size="sm")
                ws_del_item = gr.Dropdown(label="Item", choices=[], allow_custom_value=True, scale=2)
                ws_del = gr.Button("Delete item", size="sm", variant="stop")

        # ---- Merge / Adapters / Edit tabs are built from the libraries ------------
        merge_parts = merge_tab(wb, picker, heavy)
        adapter_parts = adapters_tab(wb, picker, heavy)
        edit_parts = edit_tab(wb, picker, heavy)
        eval_tab(wb, picker, heavy)
        moe_parts = moe_tab(wb, picker, heavy)
        evolve_parts = evolve_tab(wb, picker, heavy)

        # ---- Playground ----------------------------------------------------------
        with gr.Tab("Playground", id="playground", elem_id="tab-playground"):
            with gr.Row():
                p_work = picker("Working model", kind="any", info="e.g. your merge or mix result (ws:…)")
                p_orig = picker("Original model")
            p_prompt = gr.Textbox(value="What is the capital of France?", label="Prompt", lines=2)
            with gr.Row():
                p_n = gr.Slider(1, config.max_new_tokens, value=48, step=1, label="Max new tokens")
                p_chat = gr.Checkbox(value=True, label="Chat template", info="as a user message (instruct models)")
                p_btn = gr.Button("Generate", variant="primary")
                p_stop = gr.Button("Stop", variant="stop")
            with gr.Row():
                p_out_w = gr.Textbox(label="Working model", lines=8, elem_id="play-working")
                p_out_o = gr.Textbox(label="Original model", lines=8, elem_id="play-original")

        # ---- Export --------------------------------------------------------------
        with gr.Tab("Export", id="export", elem_id="tab-export"):
            with gr.Row():
                e_item = gr.Dropdown(label="Workspace item", choices=[], allow_custom_value=True)
                e_refresh = gr.Button("Refresh", size="sm", scale=0)
            with gr.Row():
                with gr.Column():
                    gr.Markdown("### Download")
                    e_zip_btn = gr.Button("Make zip", variant="primary")
                    e_file = gr.File(label="Zip", interactive=False)
                with gr.Column():
                    gr.Markdown("### Push to the Hugging Face Hub")
                    e_repo = gr.Textbox(label="Repo id", placeholder="your-name/my-merge")
                    e_private = gr.Checkbox(label="Private", value=True)
                    e_token = gr.Textbox(label="Token (write)", type="password",
                                         info=("Signed in? Leave empty. " if in_space else "")
                                         + "Or set HF_TOKEN on the server. Never stored or logged.")
                    e_push = gr.Button("Push", variant="primary")
                    e_push_msg = gr.Markdown()
            with gr.Row():
                with gr.Column():
                    gr.Markdown("### GGUF for llama.cpp, Ollama, LM Studio")
                    e_gguf_type = gr.Dropdown(list(GGUF_TYPES),
                                              value="q8_0", label="GGUF type",
                                              info="q8_0: near-lossless, half of f16; q4/q5: smaller, see README")
                    e_gguf_size = gr.Markdown()
                    e_gguf_btn = gr.Button("Export GGUF", variant="primary")
                    e_gguf_msg = gr.Markdown()
                    e_gguf_file = gr.File(label="GGUF", interactive=False)
            gr.Markdown("### Model card preview (what will be pushed)")
            e_card = gr.Markdown(container=True)

        # ---- wiring -------------------------------------------------------------------
        def refresh(request: gr.Request):
            models = wb.model_choices(request)
            adapters = wb.model_choices(request, "adapter")
            items = wb.all_item_choices(request)
            ups = [gr.update(choices=models + (adapters if kind == "any" else [])) for _, kind in model_pickers]
            adapters = adapter_parts.get("demo_adapters", []) + adapters
            return [*ups, gr.update(choices=adapters), gr.update(choices=items), gr.update(choices=items),
                    wb.workspace_table(request)]

        refresh_targets = [*(d for d, _ in model_pickers), adapter_parts.get("adapter_picker") or gr.State(), e_item,
                           ws_del_item, ws_table]
        refresh_kw = dict(fn=refresh, inputs=None, outputs=refresh_targets, api_visibility="private", queue=False)

        m_btn.click(wb.inspect, [m_ref], m_info, api_name="inspect")
        u_btn.click(wb.upload, [u_files, u_name, u_cfg], u_msg, api_name="upload", **heavy).then(**refresh_kw)
        ws_refresh.click(**refresh_kw)
        e_refresh.click(**refresh_kw)
        ws_del.click(wb.delete_item, [ws_del_item], u_msg, api_visibility="private").then(**refresh_kw)
        demo.load(**refresh_kw)

        # Progress (and an error's badge) on the working pane only: when the working model fails, the
        # original model's answer stays readable beside the one error message.
        gen_ev = p_btn.click(wb.generate, [p_work, p_orig, p_prompt, p_n, p_chat], [p_out_w, p_out_o], api_name="generate",
                             concurrency_limit=config.generate_concurrency, concurrency_id="generate",
                             show_progress_on=p_out_w)
        p_stop.click(None, None, None, cancels=[gen_ev], api_visibility="private", queue=False)

        e_zip_btn.click(wb.export, [e_item], e_file, api_name="export", concurrency_limit=2,
                        concurrency_id="export")
        e_item.change(wb.card_preview, [e_item], e_card, api_visibility="private", queue=False)
        for trigger in (e_item.change, e_gguf_type.change):
            trigger(wb.gguf_estimate, [e_item, e_gguf_type], e_gguf_size, api_visibility="private")
        e_gguf_btn.click(wb.export_gguf, [e_item, e_gguf_type], [e_gguf_file, e_gguf_msg], api_name="export_gguf",
                         **heavy).then(wb.card_preview, [e_item], e_card, api_visibility="private")
        e_push.click(wb.push, [e_item, e_repo, e_private, e_token], e_push_msg, api_name="push",
                     concurrency_limit=2, concurrency_id="push")

        demo.unload(wb.end_session)

        for parts in (merge_parts, adapter_parts, edit_parts, moe_parts, evolve_parts):
            for ev in parts.get("creates_items", []):
                ev.then(**refresh_kw)
            if "result_ref" in parts:
                # A fresh result becomes the Playground's working model, ready to try.
                parts["result_ref"].change(lambda r: gr.update(value=r) if r else gr.skip(), parts["result_ref"],
                                           p_work, api_visibility="private", queue=False)
            if "init" in parts:
                fn, ins, outs = parts["init"]
                demo.load(fn, ins, outs, api_visibility="private", queue=False)

    guard_preprocess(demo)
    return demo
