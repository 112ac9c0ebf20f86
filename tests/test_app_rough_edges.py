"""Issue 13's leftover rough edges, at the handlers and in the built page (no server, no browser):

* a number field whose hint says "empty: ..." is a text box parsed by one helper (a gr.Number shows
  and sends 0 when empty): the Edit tab's Layer, the Merge tab's TIES density, the Evaluate tab's limit;
* the Edit tab says which layers the next edit changes, and that is what the edit then changes;
* the Export tab's card preview speaks to a user;
* the Adapters tab's recipe box and its form (the table above all) agree whichever side is edited.

Each test fails on the code before its fix (checked by reverting it).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoints.errors import WeightsmithError  # noqa: E402
from ui import forms  # noqa: E402
from ui.config import AppConfig  # noqa: E402
from ui.workbench import Workbench  # noqa: E402


def req(name: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=name)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from ui.layout import build_app

    return build_app(config=AppConfig(workspace_root=tmp_path_factory.mktemp("edges-page")))


@pytest.fixture(scope="module")
def wb(tmp_path_factory, tiny_llama_family):
    root = tmp_path_factory.mktemp("edges")
    cfg = AppConfig(workspace_root=root / "ws", named_models={
        "tiny-base": str(tiny_llama_family["base"]), "tiny-ft1": str(tiny_llama_family["ft1"]),
        "tiny-ft2": str(tiny_llama_family["ft2"])}, edit_stats_tokens=1000, stats_root=root / "stats")
    return Workbench(cfg)


def _labelled(page, label):
    (found,) = [b for b in page.blocks.values() if getattr(b, "label", None) == label]
    return found


# ---- (a) "empty means default" fields ----------------------------------------------------------------
def test_no_number_field_promises_an_empty_value(page):
    numbers = [b for b in page.blocks.values() if isinstance(b, gr.Number) and b.visible is not False]
    promising = [b.label for b in numbers if "empty" in f"{b.label} {b.info or ''}".lower()]
    assert promising == []  # a gr.Number cannot be empty on the page: it shows and sends 0
    assert numbers  # non-vacuity: the page does have visible number fields (LiNeS α, β)
    for label in ("Layer", "Density for the TIES trim", "Questions per task (empty: all)"):
        box = _labelled(page, label)
        assert isinstance(box, gr.Textbox) and box.value == "", label


def test_one_parser_for_optional_numbers():
    parse = forms.optional_number
    assert parse("", "density", empty="x") is None and parse(None, "density", empty="x") is None
    assert parse(" 0.25 ", "density", empty="x", low=0, high=1) == 0.25 and parse(0.5, "d", empty="x") == 0.5
    assert parse("3", "layer", empty="x", integer=True) == 3 and isinstance(parse("3", "l", empty="x", integer=True), int)
    for bad, line in (("half", r"density must be a number \(empty: the recipe's own\), not 'half'"),
                      ("2", "density must be at most 1, not 2"), (-0.5, "density must be at least 0, not -0.5"),
                      ("inf", "density must be a number, not inf"), ([1], "density must be a number or empty"),
                      (True, "density must be a number or empty")):
        with pytest.raises(WeightsmithError, match=line):
            parse(bad, "density", empty="the recipe's own", low=0, high=1)
    with pytest.raises(WeightsmithError, match=r"not '\\udce9'"):  # shown escaped, never passed on raw
        parse("\udce9", "density", empty="x")


def test_analyze_takes_the_density_field_as_text(wb, tiny_llama_family):
    recipe = ("merge_method: ties\nbase_model: tiny-base\nmodels:\n"
              "  - {model: tiny-ft1, parameters: {weight: 0.5, density: 0.5}}\n"
              "  - {model: tiny-ft2, parameters: {weight: 0.5, density: 0.5}}\n")
    _, _, own = wb.analyze(recipe, "", req("a"), progress=None)  # the page's empty field
    assert own["density_range"] == [[0.5, 0.5]] * 2  # the recipe's own
    _, _, typed = wb.analyze(recipe, "0.3", req("a"), progress=None)
    assert typed["density"] == 0.3 and typed["density_range"] == [[0.3, 0.3]] * 2
    assert typed["total"]["kept_fraction"][0] < own["total"]["kept_fraction"][0]  # non-vacuity: it was used
    with pytest.raises(gr.Error, match="density must be a number"):
        wb.analyze(recipe, "lots", req("a"), progress=None)


def test_eval_limit_field_empty_means_all(wb, monkeypatch):
    import evaluation.run as run

    seen = []
    monkeypatch.setattr(run, "evaluate_models", lambda specs, tasks, settings, **kw: seen.append(settings.limit)
                        or (_ for _ in ()).throw(WeightsmithError("stop here")))
    for value, limit in (("", None), (" 12 ", 12), (None, None)):
        with pytest.raises(gr.Error, match="stop here"):
            wb.eval_models(["tiny-base"], ["capitals-mc"], None, value, 8, req("e"), progress=None)
        assert seen[-1] == limit
    with pytest.raises(gr.Error, match="limit must be at least 1, not 0"):
        wb.eval_models(["tiny-base"], ["capitals-mc"], None, "0", 8, req("e"), progress=None)


# ---- (b) the layers an edit changes --------------------------------------------------------------------
FACT = ("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


def _shown_layers(text: str) -> list[int]:
    """The layers a line of the page names ("layer 4", "layers 2–5", "layers 1, 3")."""
    m = re.search(r"layers? \**([\d–, ]*\d)", text)
    a, dash, b = m.group(1).partition("–")
    return list(range(int(a), int(b) + 1)) if dash else [int(x) for x in m.group(1).split(",")]


@pytest.mark.parametrize("method", ["r-rome", "memit"])
def test_the_layers_shown_are_the_layers_edited(wb, method):
    r = req(f"plan-{method}")
    for field in ("", "2"):
        plan = wb.edit_plan("tiny-base", method, field, r)
        planned = _shown_layers(plan)
        _, _, md, hist = wb.edit("tiny-base", *FACT, field, r, None, method=method)
        applied = wb.edit_session(wb.workspace(r), "tiny-base").edits[-1].layers
        assert planned == applied == _shown_layers(md.split("→")[1]), (method, field, plan, md)
        assert hist[-1][2] == ",".join(map(str, applied))  # the history's layer column
        if method == "memit":
            assert len(applied) > 1  # non-vacuity: a multi-layer method shows all its layers
    assert "(this model's default)" in wb.edit_plan("tiny-base", "r-rome", "", r)
    assert wb.edit_plan("tiny-base", "memit", "2", r) == "**memit** will edit **layers 0–3** (the four around layer 2)."
    assert wb.edit_plan("tiny-base", "r-rome", "9", r).startswith("⚠ layer 9 is out of range")
    assert wb.edit_plan("tiny-base", "r-rome", "x", r).startswith("⚠ layer must be a whole number")


def test_trace_suggestion_is_the_layer_edited(wb, page):
    r = req("traced")
    _, md, suggested = wb.trace("tiny-base", FACT[0], FACT[1], "mlp", 1, r, None)
    (copy,) = [f for f in page.fns.values() if f.trigger_after is not None
               and page.fns[f.trigger_after].api_name == "trace" and f.trigger_only_on_success]
    field = copy.fn(suggested)  # what the page puts into the Layer field
    _, _, edit_md, _ = wb.edit("tiny-base", *FACT, field, r, None, method="r-rome")
    assert f"layer **{suggested}**" in md and f"at layer {suggested} " in edit_md
    plans = [f for f in page.fns.values() if getattr(f.fn, "__name__", "") == "edit_plan"]
    layer = _labelled(page, "Layer")
    assert any(layer._id in {t[0] for t in f.targets} for f in plans)  # the field's change re-plans


# ---- (c) the card preview ---------------------------------------------------------------------------------
def test_card_preview_speaks_to_a_user(wb, tiny_llama_family, monkeypatch):
    from huggingface_hub import constants

    files = [str(p) for p in tiny_llama_family["ft2"].iterdir() if p.is_file()]
    wb.upload(files, "nocard", "", req("c"))
    preview = wb.card_preview("ws:nocard", req("c"))
    assert "no model card" in preview and "README.md" in preview
    for dev in ("checkpoints", "write_card", "front matter"):
        assert dev not in preview.lower(), preview
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(gr.Error) as e:  # Push says the same, before any token or network
        wb.push("ws:nocard", "alice/nocard", False, "", req("c"), None, None)
    assert "no model card" in str(e.value) and "write_card" not in str(e.value)
    (wb.workspace(req("c")).item_path("ws:nocard") / "README.md").write_text("---\ntags: [x]\n---\n# Hello card")
    preview = wb.card_preview("ws:nocard", req("c"))
    assert "# Hello card" in preview and "```yaml\ntags:\n- x\n```" in preview
    assert "front matter" not in preview.lower() and "Listed on the Hub as" in preview


# ---- (d) the Adapters tab's recipe box and table --------------------------------------------------------
def test_adapter_recipe_box_sets_the_table():
    from ui.tab_adapters import mix_from_yaml

    form = ["tiny-base", [["ws:a", "0.7"], ["ws:b", "0.3"]], "ties", forms.adapter_param_rows("ties", {"density": 0.4}),
            True, 0.2, 0.6, "merged model"]
    text, status = forms.mix_form_to_yaml(*form)
    assert status.startswith("✓"), status
    edited = text.replace("weight: 0.3", "weight: 0.9").replace("adapter: ws:a", "adapter: ws:c")
    out = mix_from_yaml(edited)
    assert out[-1] == "✓ form updated from YAML"
    assert out[1]["value"]["data"] == [["ws:c", "0.7"], ["ws:b", "0.9"]]  # the table follows the box
    assert out[0] == "tiny-base" and out[2] == "ties" and out[7] == "merged model"
    assert out[4:7] == [True, 0.2, 0.6] and dict(map(tuple, out[3]))["density"] == "0.4"
    assert out[8] == forms.adapter_method_md("ties")
    # The round trip: the form the box set writes the same recipe back.
    back = forms.mix_form_to_yaml(out[0], out[1]["value"]["data"], *out[2:8])
    assert back == (edited, "✓ recipe is valid")
    # A recipe the form cannot show leaves the form alone and says why.
    bad = mix_from_yaml("base_model: tiny-base\nadapters: []\n")
    assert all(isinstance(v, dict) and v.get("__type__") == "update" and len(v) == 1 for v in bad[:-1])
    assert bad[-1].startswith("⚠") and "adapters" in bad[-1]


def test_adapter_recipe_box_is_wired_to_the_table(page):
    table, recipe = _labelled(page, "Adapters and weights"), _labelled(page, "Mix recipe (YAML)")
    fed = [f for f in page.fns.values() if getattr(f.fn, "__name__", "") == "mix_from_yaml"]
    assert len(fed) == 1 and (recipe._id, "input") in fed[0].targets
    assert table._id in {o._id for o in fed[0].outputs}
    back = [f for f in page.fns.values() if getattr(f.fn, "__name__", "") == "mix_form_to_yaml"
            and (table._id, "input") in f.targets]
    assert len(back) == 1 and recipe._id in {o._id for o in back[0].outputs}  # and the reverse
