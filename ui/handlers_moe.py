"""Mixture-of-experts handlers: the form's fields as a mergekit-moe config, and its assembly into a workspace item
(the same library call as ``weightsmith moe``)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from checkpoints.errors import WeightsmithError

from .endpoint import endpoint
from .progress import gradio_job, show_progress
from .tables import md_table

EXPERT_COLUMNS = ["model", "positive prompts (one per line)", "negative prompts (one per line)"]
NO_SHARED = ""


def _lines(text: Any) -> list[str]:
    return [line.strip() for line in str(text or "").splitlines() if line.strip()]


def moe_form_to_dict(base: str, gate_mode: str, per_token: float, dtype: str, experts: Any,
                     shared_model: str | None, shared_prompts: str) -> dict[str, Any]:
    """The form as mergekit-moe's config: ``experts`` is the table's rows (model, positive, negative prompts)."""
    rows = experts.values.tolist() if hasattr(experts, "values") else (experts or [])
    listed = []
    for row in rows:
        model, positive, negative = (list(row) + ["", "", ""])[:3]
        if not str(model or "").strip():
            continue
        entry: dict[str, Any] = {"source_model": str(model).strip()}
        if _lines(positive):
            entry["positive_prompts"] = _lines(positive)
        if _lines(negative):
            entry["negative_prompts"] = _lines(negative)
        listed.append(entry)
    data: dict[str, Any] = {"base_model": str(base or "").strip(), "gate_mode": gate_mode,
                            "experts_per_token": int(per_token)}
    if dtype:
        data["dtype"] = dtype
    data["experts"] = listed
    if shared_model and str(shared_model).strip():
        shared: dict[str, Any] = {"source_model": str(shared_model).strip()}
        if _lines(shared_prompts):
            shared["positive_prompts"] = _lines(shared_prompts)
        data["shared_experts"] = [shared]
    return data


def moe_yaml_from_form(*form) -> tuple[str, str]:
    """(YAML text, status line): the config is shown even when it is not valid yet."""
    import yaml

    from merging.moe import MoeConfig

    data = moe_form_to_dict(*form)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    try:
        MoeConfig.from_dict(data).check()
        return text, "✓ config is valid"
    except WeightsmithError as e:
        return text, f"⚠ {e}"


class MoeHandlers:
    """Mixin of :class:`ui.workbench.Workbench`."""

    @endpoint
    def moe(self, config_yaml: str, out_name: str, request: gr.Request, progress=gr.Progress()):
        """Assemble the mixture of experts a mergekit-moe config describes into a new workspace item.

        Returns (summary Markdown with the output's checks, ``ws:<name>`` of the result).
        """
        from merging.lora_inputs import resolve_input
        from merging.moe import MoeConfig, build_moe

        ws = self.workspace(request)
        ws.check_quota()
        config = MoeConfig.from_yaml(config_yaml or "")
        # Every model the config names is read under this session's policy, as the Merge tab reads recipes.
        policy = self.local_policy(ws)
        out = ws.new_item_dir(out_name or "moe", default="moe")
        show_progress(progress, 0.0, "checking models")
        result = self.run_job(request, lambda cancel: build_moe(
            config, out, job=gradio_job(progress, cancel), device=self.config.device,
            resolver=lambda ref: resolve_input(self.ref(ws, ref), **policy)))
        ws.register(out.name, kind="model", origin="moe",
                    details={"architecture": result.architecture, "experts": result.num_experts})
        rows = [("result", f"`ws:{out.name}`"), ("architecture", result.architecture),
                ("experts", f"{result.num_experts} ({result.experts_per_token} per token"
                            + (f", {result.shared_experts} shared)" if result.shared_experts else ")")),
                ("gate mode", result.gate_mode), ("weights", result.finite_check), ("check", result.load_check),
                ("time", f"{result.seconds:.1f} s")]
        if result.degenerate_layers:
            rows.append(("router", f"layers {result.degenerate_layers} have nearly dependent rows "
                                   "(prompts too similar?)"))
        md = "### Assembled\n" + md_table(rows) + "\n\nTry it in the **Playground** or download it from **Export**."
        return md, f"ws:{out.name}"
