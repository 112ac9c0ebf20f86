"""The built page's wiring (no server): which events chain after which, what each shows its progress on."""

from __future__ import annotations

import sys
from pathlib import Path

import gradio as gr
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ui.config import AppConfig  # noqa: E402


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from ui.layout import build_app

    return build_app(config=AppConfig(workspace_root=tmp_path_factory.mktemp("page-ws")))


def _component(page, label):
    (found,) = [b for b in page.blocks.values() if getattr(b, "label", None) == label]
    return found


def _chained(page, api_name):
    """The page's events that run after the event ``api_name`` (with whether only on success)."""
    (fid,) = [i for i, f in page.fns.items() if f.api_name == api_name]
    return [f for f in page.fns.values() if f.trigger_after == fid]


def test_page_edit_fields_start_empty_and_undo_clears_stale_outputs(page):
    layer = _component(page, "Layer")
    assert isinstance(layer, gr.Textbox) and layer.value == ""  # a gr.Number would show and send 0
    (copy,) = [f for f in _chained(page, "trace") if layer._id in {o._id for o in f.outputs}]
    assert copy.fn(7) == "7" and copy.fn(None) == ""  # the suggested layer lands in the field as text
    undo = _component(page, "Edit to undo")
    assert isinstance(undo, gr.Dropdown) and undo.value is None
    after, scores = _component(page, "After the edit"), _component(page, "Scores")
    cleared = [f for f in _chained(page, "undo") if f.trigger_only_on_success
               and {after._id, scores._id} <= {o._id for o in f.outputs}]
    assert len(cleared) == 1 and cleared[0].fn() == ("", None)
    (undo_fn,) = [f for f in page.fns.values() if f.api_name == "undo"]
    history = _component(page, "Edit history")
    shown_on = {getattr(c, "_id", c) for c in undo_fn.show_progress_on}
    assert history._id not in shown_on and shown_on  # a failed Undo leaves the history it did not change in view
    offered = [f for f in _chained(page, "edit") if undo._id in {o._id for o in f.outputs}]
    assert len(offered) == 1  # a new edit refreshes the Undo choices


def test_page_merge_clears_the_previous_summary_first(page):
    (fid,) = [i for i, f in page.fns.items() if f.api_name == "merge"]
    before = page.fns[page.fns[fid].trigger_after]
    assert before.fn() == ("", None) and len(before.outputs) == 2
    assert {o._id for o in before.outputs} <= {o._id for o in page.fns[fid].outputs}


def test_page_every_stop_button_reports_stopped(page):
    stop_fns = [f for f in page.fns.values() if getattr(f.fn, "__name__", "") == "stop"]
    after = [f for f in page.fns.values() if getattr(f.fn, "__name__", "") == "stopped"]
    assert len(stop_fns) == 6 and len(after) == 6  # Merge, Adapters, Edit, Evaluate, MoE, Evolve
    assert {page.fns[f.trigger_after].fn.__name__ for f in after} == {"stop"}


def test_page_playground_error_stays_off_the_original_pane(page):
    (gen,) = [f for f in page.fns.values() if f.api_name == "generate"]
    (original,) = [o for o in gen.outputs if o.label == "Original model"]  # the pane (a picker has that label too)
    shown_on = {getattr(c, "_id", c) for c in gen.show_progress_on}
    assert shown_on and original._id not in shown_on  # its answer stays readable when the working model fails
