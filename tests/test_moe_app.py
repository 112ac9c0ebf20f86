"""The app's MoE tab: the form writes mergekit-moe's config, the handler assembles it into the session's workspace."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ui.config import AppConfig  # noqa: E402
from ui.handlers_moe import moe_yaml_from_form  # noqa: E402
from ui.workbench import Workbench  # noqa: E402
from test_merge_moe import PROMPTS_A, PROMPTS_B, load_mixtral  # noqa: E402

torch.set_num_threads(1)


def req(name: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=name)


@pytest.fixture
def wb(tmp_path, tiny_llama_family):
    fam = tiny_llama_family
    return Workbench(AppConfig(workspace_root=tmp_path / "ws", named_models={
        "tiny-base": str(fam["base"]), "tiny-ft1": str(fam["ft1"]), "tiny-ft2": str(fam["ft2"])}))


def form(*rows, shared=None, shared_prompts="", mode="cheap_embed", per_token=1, dtype=""):
    return ["tiny-base", mode, per_token, dtype, [list(r) for r in rows], shared, shared_prompts]


def test_the_form_writes_the_config(tiny_llama_family):
    import pandas as pd

    rows = [("tiny-ft1", "\n".join(PROMPTS_A), PROMPTS_B[0]), ("tiny-ft2", "\n".join(PROMPTS_B), ""), ("", "", "")]
    text, status = moe_yaml_from_form(*form(*rows, dtype="bfloat16"))
    assert status == "✓ config is valid"
    assert yaml.safe_load(text) == {
        "base_model": "tiny-base", "gate_mode": "cheap_embed", "experts_per_token": 1, "dtype": "bfloat16",
        "experts": [{"source_model": "tiny-ft1", "positive_prompts": PROMPTS_A, "negative_prompts": [PROMPTS_B[0]]},
                    {"source_model": "tiny-ft2", "positive_prompts": PROMPTS_B}]}
    # the page sends the table as a DataFrame; a shared expert adds shared_experts
    table = pd.DataFrame([list(r) for r in rows], columns=["model", "positive", "negative"])
    text, status = moe_yaml_from_form("tiny-base", "hidden", 2, "", table, "tiny-base", "Hello\n\n")
    assert status == "✓ config is valid" and yaml.safe_load(text)["shared_experts"] == [
        {"source_model": "tiny-base", "positive_prompts": ["Hello"]}]
    # what mergekit refuses is said on the status line, and the config is still shown
    text, status = moe_yaml_from_form(*form(("tiny-ft1", "a", ""), ("tiny-ft2", "", ""), mode="hidden"))
    assert status.startswith("⚠") and "experts[1] has no positive_prompts" in status and "tiny-ft2" in text


def test_assemble_into_the_workspace(wb, tiny_llama_family, tmp_path):
    r = req("a")
    text, _ = moe_yaml_from_form(*form(("tiny-ft1", "\n".join(PROMPTS_A), ""), ("tiny-ft2", "\n".join(PROMPTS_B), "")))
    md, ref = wb.moe(text, "mixture", r, None)
    assert ref == "ws:mixture" and "MixtralForCausalLM" in md and "loads as MixtralForCausalLM" in md
    assert "all 39 output tensors finite" in md
    ws = wb.workspace(r)
    (item,) = ws.items()
    assert (item.name, item.kind, item.origin) == ("mixture", "model", "moe")
    load_mixtral(ws.item_path("mixture"))  # transformers loads it: no missing or unexpected weights
    # a workspace item is an expert like any model; the second session cannot see the first one's
    text, _ = moe_yaml_from_form(*form(("ws:mixture", "x", ""), ("tiny-ft2", "y", "")))
    with pytest.raises(gr.Error, match="must share the architecture"):  # a Mixtral is no dense llama
        wb.moe(text, "nested", r, None)
    with pytest.raises(gr.Error, match="no such item"):
        wb.moe(text, "other", req("b"), None)
    # server paths stay off: a folder on this server is refused with one line and nothing is written
    text, _ = moe_yaml_from_form(*form((str(tiny_llama_family["ft1"]), "x", ""), ("tiny-ft2", "y", "")))
    with pytest.raises(gr.Error, match="server paths are off"):
        wb.moe(text, "paths", r, None)
    assert [i.name for i in ws.items()] == ["mixture"]


def test_the_page_has_the_moe_endpoint(tmp_path):
    from ui.layout import build_app

    page = build_app(config=AppConfig(workspace_root=tmp_path / "ws"))
    (fn,) = [f for f in page.fns.values() if f.api_name == "moe"]
    assert fn.fn.__name__ == "moe" and (fn.concurrency_id, fn.concurrency_limit) == ("heavy", 1)
    assert [b.label for b in fn.inputs] == ["mergekit-moe config (the form writes it; edit freely)", "Output name"]


def test_hostile_arguments_are_one_line(wb):
    from test_app_endpoints_hostile import HOSTILE, UNEXPECTED

    good, _ = moe_yaml_from_form(*form(("tiny-ft1", "\n".join(PROMPTS_A), ""), ("tiny-ft2", "\n".join(PROMPTS_B), "")))
    # every hostile config; of the output names, those refused before any work (the others would just assemble)
    cases = [(0, label) for label in HOSTILE] + [(1, label) for label in ("list", "dict", "huge", "bytes", "nul")]
    seen = []
    for i, label in cases:
        args = [good, "out"]
        args[i] = HOSTILE[label]
        with pytest.raises(gr.Error) as e:
            wb.moe(*args, req(f"{i}-{label}"), None)
        msg = str(e.value.message)
        assert "\n" not in msg and len(msg) <= 500 and UNEXPECTED not in msg, (i, label, msg)
        seen.append(msg)
    assert "config_yaml must be text, not a list" in seen and any(m.startswith("out_name") for m in seen), seen
    assert wb.workspace(req("0-list")).items() == []
