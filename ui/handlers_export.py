"""Export tab handlers: zip download, GGUF size and export, model card preview, push to the Hub."""

import logging
from typing import Literal

import gradio as gr

from checkpoints.cards import load_card
from checkpoints.errors import WeightsmithError
from checkpoints.gguf_export import GGUF_TYPES
from checkpoints.sizes import format_size
from checkpoints.workspace import Workspace

from .endpoint import endpoint
from .progress import gradio_job

log = logging.getLogger(__name__)

GgufType = Literal[tuple(GGUF_TYPES)]  # type: ignore[valid-type] - the exporter's registry of types


class ExportHandlers:
    """Mixin of :class:`ui.workbench.Workbench`."""

    @endpoint
    def export(self, item: str, request: gr.Request) -> str:
        """Zip a workspace item for download; returns the zip's path (served as a file)."""
        ws = self.workspace(request)
        if not item:
            raise WeightsmithError("choose a workspace item to export")
        return str(ws.zip_item(item))

    @endpoint
    def gguf_estimate(self, item: str, qtype: GgufType, request: gr.Request) -> str:
        """Size of the item's GGUF export in ``qtype`` (Markdown), from the tensor headers alone."""
        from merging.gguf_item import estimate_folder_gguf

        ws = self.workspace(request)
        if not item:
            return "Choose a workspace item to see the size of its GGUF file."
        size = estimate_folder_gguf(ws.item_path(item), qtype, base=self._gguf_base(ws, item), policy=self.policy(ws))
        return f"{qtype}: about **{format_size(size)}** of weights (plus the tokenizer, a few MB)."

    @endpoint
    def export_gguf(self, item: str, qtype: GgufType, request: gr.Request, progress=gr.Progress()):
        """Write a workspace item (model or LoRA adapter) as GGUF into the item, so that Push publishes it in the
        same commit; returns (the file, Markdown with its size, type and read-back check)."""
        from merging.gguf_item import estimate_folder_gguf, export_folder_gguf

        ws = self.workspace(request)
        if not item:
            raise WeightsmithError("choose a workspace item to export")
        folder = ws.item_path(item)
        base, policy = self._gguf_base(ws, item), self.policy(ws)
        ws.check_quota(estimate_folder_gguf(folder, qtype, base=base, policy=policy))
        out = self.run_job(request, lambda cancel: export_folder_gguf(
            folder, qtype, base=base, policy=policy, job=gradio_job(progress, cancel)))
        return str(out.result.path), f"{out.result.summary()}\n\n{out.check}. **Push** now adds it to the same commit."

    def _gguf_base(self, ws: Workspace, item: str) -> str | None:
        """The base an adapter item was made on (as the resolver takes it), else None."""
        base = ws.item(item).details.get("base")
        return self.ref(ws, base) if base else None

    @endpoint
    def card_preview(self, item: str, request: gr.Request) -> str:
        """The item's model card as a visitor of its Hub page would meet it, or what is wrong with it, in a
        user's words (the library's line names the file and the fault)."""
        ws = self.workspace(request)
        if not item:
            return "Choose a workspace item to see its model card."
        if not (ws.item_path(item) / "README.md").is_file():
            return no_card_text(item)
        try:
            card = load_card(ws.item_path(item))
        except WeightsmithError as e:  # what Push would say
            return f"**The Hub would refuse this card**, so Push would stop here: {e}"
        # The metadata the Hub lists and searches (YAML), then the page text visitors read.
        return (f"**Listed on the Hub as** (base model, tags, licence: what search and filters use)\n"
                f"```yaml\n{card.data.to_yaml()}\n```\n**The model page**\n\n{card.text.lstrip()}")

    @endpoint
    def push(self, item: str, repo_id: str, private: bool, token: str, request: gr.Request,
             oauth_token: gr.OAuthToken | None = None, progress=gr.Progress()) -> str:
        """Push a workspace item to the Hub in one commit; returns the commit URL as Markdown."""
        from checkpoints import hub

        ws = self.workspace(request)
        if not item:
            raise WeightsmithError("choose a workspace item to push")
        if not (repo_id or "").strip():
            raise WeightsmithError("enter a Hub repo id (owner/name) to push to")
        folder = ws.item_path(item)
        if not folder.is_dir():
            raise WeightsmithError(f"{item}: no such item in this workspace")
        if hub_offline():
            # The visitor cannot change the server's settings: the operator's hint goes to the log.
            log.warning("push refused: HF_HUB_OFFLINE=1 is set on this server; unset it to allow pushing")
            raise WeightsmithError("this server has no access to the Hugging Face Hub, so it cannot push; "
                                   "download the zip (or the GGUF) here and upload it from your own machine")
        if not (folder / "README.md").is_file():
            raise WeightsmithError(no_card_text(item))
        tok = hub.token_for_push(oauth_token, token or None)
        # On a Space the server's own HF_TOKEN must never publish on a visitor's behalf.
        result = hub.push_folder(folder, repo_id.strip(), token=tok, private=bool(private),
                                 job=gradio_job(progress), allow_ambient_token=not hub.running_on_space())
        return f"Pushed to [{repo_id.strip()}]({result.commit_url})"


def hub_offline() -> bool:
    """Whether this server runs with ``HF_HUB_OFFLINE`` (huggingface_hub's own reading of it)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def no_card_text(item: str) -> str:
    """What a visitor reads for an item without a model card (an upload that brought none)."""
    return (f"{item} has no model card yet. The card is the page people read on the Hub: what the model is, "
            "what it was made from and how to use it. Merges, mixes and edits made here get one; for an upload, "
            "add a README.md to its files and import it again. Push needs a card.")
