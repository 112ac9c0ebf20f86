"""Models tab and Playground handlers: inspect, upload, delete, generate side by side."""

from typing import Annotated, Any

import gradio as gr

from checkpoints.errors import WeightsmithError
from checkpoints.generation import stream_text
from checkpoints.model_cache import LoadedModel
from checkpoints.uploads import import_upload
from checkpoints.workspace import Workspace

from .endpoint import Files, Range, endpoint


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def missing_tokenizer_note(item) -> str:
    """For a model uploaded without a tokenizer: what is missing and what it limits (said at upload, not later)."""
    if item.kind != "model" or any(f.rsplit("/", 1)[-1] in TOKENIZER_FILES for f in item.files):
        return ""
    return ("\n\n**No tokenizer in this upload** (tokenizer.json or tokenizer.model with tokenizer_config.json): "
            "merging and export of the weights work; the Playground, Edit and GGUF export need a tokenizer, "
            "so upload its tokenizer files again together with the weights.")


class ModelsHandlers:
    """Mixin of :class:`ui.workbench.Workbench`."""

    @endpoint
    def inspect(self, model: str, request: gr.Request) -> list[list[Any]]:
        """Architecture, parameters, dtype and layers of a model (``LocalCheckpoint.summary``)."""
        ws = self.workspace(request)
        ckpt = self.checkpoint(ws, model)
        ckpt.check_matches_config()
        info = ckpt.summary()
        rows = []
        for key in ("name", "architecture", "parameters", "dtype", "layers", "hidden_size", "vocab_size", "source"):
            value = info.get(key)
            if key == "parameters":
                value = f"{value:,}"
            rows.append([key, str(value)])
        rows.append(["files", ", ".join(info.get("files", []))[:200]])
        return rows

    @endpoint
    def upload(self, files: Files, name: str, config_from: str, request: gr.Request) -> str:
        """Import uploaded files (model, adapter, GGUF, or a zip) into this session's workspace."""
        ws = self.workspace(request)
        cfg = self.ref(ws, config_from) if config_from else None
        item = import_upload(ws, files, name=name or None, config_from=cfg, **self.local_policy(ws))
        return f"Imported **{item.ref}** ({item.kind}): {', '.join(item.files)}" + missing_tokenizer_note(item)

    @endpoint
    def delete_item(self, ref: str, request: gr.Request) -> str:
        ws = self.workspace(request)
        ws.delete_item(ref)
        return f"Deleted {ref}"

    @endpoint
    def generate(self, working: str, original: str, prompt: str, max_new_tokens: Annotated[float, Range(1)],
                 request: gr.Request, chat: bool = True):
        """Stream continuations of ``prompt`` from the working model and the original, side by side.

        ``chat``: wrap the prompt in the model's chat template (when it has one), as instruct models
        and the demo adapters expect.
        """
        ws = self.workspace(request)
        n = max(1, min(int(max_new_tokens), self.config.max_new_tokens))
        if not (prompt or "").strip():
            raise WeightsmithError("the prompt is empty")
        streams, failed = [], []
        for ref in (working, original):
            if ref:
                try:
                    loaded = self.loaded_model(ws, ref)
                except WeightsmithError as e:  # the other pane still streams; the error is said once, at the end
                    failed.append(e)
                    streams.append(iter(()))
                    continue
                text = prompt
                if chat and getattr(loaded.tokenizer, "chat_template", None):
                    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                                tokenize=False, add_generation_prompt=True)
                streams.append(stream_text(loaded, text, max_new_tokens=n, device=self.config.device))
            else:
                streams.append(iter(()))
        texts = ["", ""]
        active = [True, True]
        # Both generators run in their own threads; interleaving their outputs streams both panes at once.
        while any(active):
            for i, s in enumerate(streams):
                if not active[i]:
                    continue
                try:
                    texts[i] = next(s)
                except StopIteration:
                    active[i] = False
            yield texts[0], texts[1]
        if failed:
            raise failed[0]

    def loaded_model(self, ws: Workspace, ref: str) -> LoadedModel:
        """A model ready to generate: a checkpoint, or a workspace adapter applied to its base."""
        if str(ref).startswith("ws:") and ws.item(ref).kind == "adapter":
            return self._adapter_model(ws, ws.item(ref))
        return self.models.get(self.ref(ws, ref), **self.policy(ws))

    def _adapter_model(self, ws: Workspace, item) -> LoadedModel:
        """A workspace adapter applied to its base (the one it was made on, else the one its config names)."""
        from checkpoints.demo import DEMO_NAME
        from checkpoints.peft_adapter import WEIGHTS_NAME, base_plus_adapter, declared_base

        path = ws.item_path(item.name)
        base_ref = item.details.get("base")
        if not base_ref:
            declared = declared_base(path)
            base_ref = "demo" if declared in (DEMO_NAME, None) else declared
        key = (str(path), (path / WEIGHTS_NAME).stat().st_mtime_ns, str(base_ref))
        base = self.checkpoint(ws, base_ref)

        def load() -> LoadedModel:
            return LoadedModel(base_plus_adapter(base, path, device=self.config.device), base.load_tokenizer(),
                               item.name)

        return self.adapter_models.get_or_load(key, load)
