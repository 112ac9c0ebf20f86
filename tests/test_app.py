"""The app's handlers called directly (no server): sessions, errors, playground, export, push."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ui import forms, plots  # noqa: E402
from ui.config import AppConfig  # noqa: E402
from ui.handlers_edit import MAX_BATCH_EDITS, load_edit_requests  # noqa: E402
from ui.workbench import Workbench  # noqa: E402
from checkpoints.errors import WeightsmithError  # noqa: E402
from checkpoints.generation import ModelCache, generate_text  # noqa: E402
from hub_fixtures import GOOD_TOKEN, fake_hub, hub_env, no_internet  # noqa: E402,F401


def req(name: str) -> SimpleNamespace:
    """Stand-in for gr.Request: handlers only read ``session_hash``."""
    return SimpleNamespace(session_hash=name)


@pytest.fixture
def wb(tmp_path, tiny_llama_family):
    cfg = AppConfig(workspace_root=tmp_path / "ws", named_models={
        "tiny-base": str(tiny_llama_family["base"]), "tiny-ft1": str(tiny_llama_family["ft1"]),
        "tiny-ft2": str(tiny_llama_family["ft2"])})
    return Workbench(cfg)


def _upload_tiny(wb, session, folder: Path, name: str) -> str:
    files = [str(p) for p in folder.iterdir() if p.is_file()]
    msg = wb.upload(files, name, "", req(session))
    assert f"ws:{name}" in msg
    return f"ws:{name}"


def test_sessions_get_distinct_private_workspaces(wb):
    a, b = wb.workspace(req("a")), wb.workspace(req("b"))
    assert a.id != b.id
    assert wb.workspace(req("a")).id == a.id  # stable within a session
    with pytest.raises(Exception, match="no session"):
        wb.workspace(SimpleNamespace(session_hash=None))


def test_inspect_named_model_and_path_policy(wb, tiny_llama_family):
    rows = dict(wb.inspect("tiny-base", req("a")))
    assert rows["architecture"] == "llama" and rows["layers"] == "4" and rows["dtype"] == "float32"
    assert int(rows["parameters"].replace(",", "")) > 0
    # Server paths are off by default: naming a folder is refused with one clear line.
    with pytest.raises(gr.Error, match="server paths are off"):
        wb.inspect(str(tiny_llama_family["base"]), req("a"))
    wb.config.allow_paths = True
    assert dict(wb.inspect(str(tiny_llama_family["base"]), req("a")))["layers"] == "4"


def test_errors_are_one_line_gr_errors(wb):
    with pytest.raises(gr.Error) as e:
        wb.inspect("ws:../../etc", req("a"))
    assert "\n" not in str(e.value) and "not a valid workspace item name" in str(e.value)
    with pytest.raises(gr.Error, match="no such item"):
        wb.export("ws:nothing", req("a"))


def test_upload_is_private_to_its_session(wb, tiny_llama_family):
    ref = _upload_tiny(wb, "a", tiny_llama_family["ft1"], "mine")
    assert ref in wb.model_choices(req("a"))
    assert ref not in wb.model_choices(req("b"))
    assert wb.workspace_table(req("b")) == []
    with pytest.raises(gr.Error, match="no such item"):
        wb.inspect(ref, req("b"))
    with pytest.raises(gr.Error, match="no such item"):
        wb.export(ref, req("b"))
    assert dict(wb.inspect(ref, req("a")))["layers"] == "4"


def test_generate_streams_both_sides(wb, tiny_llama_family):
    steps = list(wb.generate("tiny-ft1", "tiny-base", "The capital of France is", 6, req("a")))
    assert len(steps) >= 2
    work, orig = steps[-1]
    cache = ModelCache()
    assert work == generate_text(cache, str(tiny_llama_family["ft1"]), "The capital of France is", max_new_tokens=6)
    assert orig == generate_text(cache, str(tiny_llama_family["base"]), "The capital of France is", max_new_tokens=6)
    assert work != orig  # non-vacuous: the two panes really show two models
    # The text grows as tokens stream in.
    assert len(steps[0][0]) <= len(work)
    with pytest.raises(gr.Error, match="prompt is empty"):
        list(wb.generate("tiny-ft1", "tiny-base", "  ", 6, req("a")))


def test_export_zip_holds_the_item(wb, tiny_llama_family):
    ref = _upload_tiny(wb, "a", tiny_llama_family["ft2"], "zipme")
    path = Path(wb.export(ref, req("a")))
    assert path.suffix == ".zip" and wb.workspace(req("a")).path in path.parents
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
    assert "zipme/config.json" in names and "zipme/model.safetensors" in names
    assert not any(".weightsmith-item" in n for n in names)


def test_card_preview(wb, tiny_llama_family):
    ref = _upload_tiny(wb, "a", tiny_llama_family["ft2"], "nocard")
    assert "no model card" in wb.card_preview(ref, req("a"))
    (wb.workspace(req("a")).item_path(ref) / "README.md").write_text("---\ntags: [x]\n---\n# Hello card")
    preview = wb.card_preview(ref, req("a"))
    assert "# Hello card" in preview and "```yaml\ntags:\n- x\n```" in preview
    # A card the Hub would refuse shows the line Push would give (checkpoints.cards.load_card).
    (wb.workspace(req("a")).item_path(ref) / "README.md").write_text("---\nbase_model: ./mine\n---\n# Hello")
    assert "base_model './mine' is not a Hub id" in wb.card_preview(ref, req("a"))


def test_push_through_the_hub_library(wb, tiny_llama_family, hub_env, fake_hub):
    ref = _upload_tiny(wb, "a", tiny_llama_family["ft2"], "pushme")
    folder = wb.workspace(req("a")).item_path(ref)
    (folder / "README.md").write_text("---\ntags:\n- weightsmith\n---\n# pushme\n")
    msg = wb.push(ref, "alice/pushme", False, GOOD_TOKEN, req("a"), None, None)
    assert "alice/pushme" in msg and "commit" in msg
    with pytest.raises(gr.Error, match="repo id"):
        wb.push(ref, " ", False, GOOD_TOKEN, req("a"), None, None)
    with pytest.raises(gr.Error) as e:
        wb.push(ref, "alice/pushme", False, "hf_definitelyWrongToken123456", req("a"), None, None)
    assert "hf_definitelyWrongToken123456" not in str(e.value)


def test_stop_sets_the_running_jobs_cancel_flag(wb):
    seen = {}

    def job(cancel):
        assert wb.stop(req("a")) == "Stopping…"
        seen["cancelled"] = cancel.is_set()
        return 1

    assert wb.run_job(req("a"), job) == 1
    assert seen["cancelled"] is True
    assert wb.stop(req("a")) == "Nothing to stop."


def test_workspace_cleanup_forgets_expired_sessions(wb):
    ws = wb.workspace(req("old"))
    (ws.path / ".last-used").write_text("0")
    wb._last_cleanup = 0
    wb.config.cleanup_every = 0
    fresh = wb.workspace(req("old"))  # cleanup ran, the session got a new workspace
    assert fresh.id != ws.id and not ws.path.exists()


# ---- merge, adapters, edit through the handlers ------------------------------------------------

def make_tiny_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A PEFT LoRA adapter on the tiny llama with non-zero B (so it changes the logits)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory, tiny_llama_family):
    root = tmp_path_factory.mktemp("tiny-adapters")
    return [make_tiny_adapter(tiny_llama_family["base"], root / f"ad{i}", seed=i) for i in (1, 2)]


def _merge_form(method="task_arithmetic", models=None, lines=(False, True, 0.5, 0.5)):
    cols = forms.merge_columns(method)
    rows = [["tiny-ft1", "0.5", "1.0"], ["tiny-ft2", "0.5", "1.0"]] if models is None else models
    rows = [r[:len(cols)] for r in rows]
    return [method, "tiny-base", rows, forms.merge_shared_rows(method), *lines, "", ""]


def test_merge_form_yaml_round_trip():
    form = _merge_form("ties", [["tiny-ft1", "0.7", "0.5"], ["tiny-ft2", "[0, 1]", "0.5"]], (True, False, 0.2, 0.8))
    text, status = forms.merge_yaml_from_form(*form)
    assert status.startswith("✓"), status
    assert "merge_method: ties" in text and "lines:" in text
    back = forms.merge_form_from_yaml(text)
    assert back["method"] == "ties" and back["base"] == "tiny-base"
    assert back["models"]["data"] == [["tiny-ft1", "0.7", "0.5"], ["tiny-ft2", "[0, 1]", "0.5"]]
    assert (back["lines_on"], back["alpha_auto"], back["alpha"], back["beta"]) == (True, False, 0.2, 0.8)
    # YAML -> form -> YAML is stable.
    again, _ = forms.merge_yaml_from_form(back["method"], back["base"], back["models"]["data"], back["shared"],
                                        back["lines_on"], back["alpha_auto"], back["alpha"], back["beta"],
                                        back["out_dtype"], back["seed"])
    assert again == text
    # A bad recipe gives one line and leaves the form alone.
    with pytest.raises(Exception, match="unknown merge method"):
        forms.merge_form_from_yaml("merge_method: nope\nmodels: [{model: a}]\n")
    _, status = forms.merge_yaml_from_form(*_merge_form(models=[]))
    assert status.startswith("⚠")


def test_lines_plot_and_norms_plot_build():
    fig = plots.lines_plot(True, False, 0.2, 0.8, 4)
    ys = list(fig.axes[0].lines[0].get_ydata())
    assert ys == pytest.approx([0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0])
    fig = plots.norms_plot({"a": [1.0, 2.0], "b": [0.5, 0.1]})
    assert len(fig.axes[0].lines) == 2


def test_merge_handler_writes_private_item_without_leaking_paths(wb, tiny_llama_family):
    from safetensors.torch import load_file

    text, _ = forms.merge_yaml_from_form(*_merge_form())
    md, fig, ref = wb.merge(text, "m", req("a"), None)
    ws = wb.workspace(req("a"))
    out = ws.item_path(ref)
    assert ref == "ws:m" and "tensors changed" in md and (out / "model.safetensors").exists()
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(tiny_llama_family["base"] / "model.safetensors"))
    ft1 = load_file(str(tiny_llama_family["ft1"] / "model.safetensors"))
    ft2 = load_file(str(tiny_llama_family["ft2"] / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    expected = base[name] + 0.5 * (ft1[name] - base[name]) + 0.5 * (ft2[name] - base[name])
    assert (merged[name] - expected).abs().max() < 1e-6
    assert (merged[name] - base[name]).abs().max() > 1e-4  # non-vacuous
    card = (out / "README.md").read_text()
    assert ws.id not in card and str(ws.path) not in card and "/tmp" not in card
    assert len(fig.axes[0].lines) == 2  # one norms line per fine-tune
    assert ref not in wb.model_choices(req("b"))
    with pytest.raises(gr.Error, match="unknown merge method"):
        wb.merge("merge_method: nope\nmodels: [{model: tiny-ft1}]\n", "bad", req("a"), None)
    with pytest.raises(gr.Error, match="server paths are off"):
        wb.merge(text.replace("tiny-ft1", "/etc"), "bad", req("a"), None)
    assert [i.name for i in ws.items()] == ["m"]  # failed runs left nothing


MIX_RECIPE = ("base_model: tiny-base\nadapters:\n  - {adapter: ws:ad1, weight: 0.7}\n"
              "  - {adapter: ws:ad2, weight: 0.3}\nmethod: cat\n")


def _upload_adapters(wb, tiny_adapters, session: str) -> None:
    """The two tiny adapters as ws:ad1 and ws:ad2 of ``session``."""
    for i, folder in enumerate(tiny_adapters, 1):
        wb.upload([str(p) for p in folder.iterdir() if p.suffix in (".json", ".safetensors")], f"ad{i}", "",
                  req(session))


def test_mix_adapters_handler_and_playground(wb, tiny_adapters):
    _upload_adapters(wb, tiny_adapters, "a")
    recipe = MIX_RECIPE
    md, ref = wb.mix_adapters(recipe, "mix", req("a"), None)
    assert ref == "ws:mix" and "**exact in ΔW space**: yes" in md
    assert wb.workspace(req("a")).item("mix").kind == "adapter"
    md2, ref2 = wb.mix_adapters(recipe + "merge_into_base: true\n", "mixm", req("a"), None)
    assert wb.workspace(req("a")).item("mixm").kind == "model"
    # The adapter (applied on its base) and the merged model generate the same text; the base does not.
    prompt = "The capital of France is"
    as_adapter, base = list(wb.generate(ref, "tiny-base", prompt, 6, req("a")))[-1]
    merged, _ = list(wb.generate(ref2, "tiny-base", prompt, 6, req("a")))[-1]
    assert as_adapter == merged
    logits = [wb.loaded_model(wb.workspace(req("a")), r).model(
        **wb.loaded_model(wb.workspace(req("a")), r).tokenizer(prompt, return_tensors="pt")).logits
        for r in (ref, ref2, "tiny-base")]
    assert (logits[0] - logits[1]).abs().max() < 1e-4
    assert (logits[0] - logits[2]).abs().max() > 1e-3  # non-vacuous
    with pytest.raises(gr.Error, match="unknown method"):
        wb.mix_adapters(recipe.replace("cat", "nope"), "bad", req("a"), None)


def test_demo_adapter_references(wb):
    from checkpoints.demo_adapters import demo_adapter_refs, demo_adapters

    ws = wb.workspace(req("a"))
    for name, folder in demo_adapters().items():
        assert (folder / "adapter_config.json").is_file()
        assert wb.adapter_ref(ws, f"demo-adapter:{name}") == str(folder)
    assert demo_adapter_refs() == [f"demo-adapter:{n}" for n in demo_adapters()]
    with pytest.raises(WeightsmithError, match=r"demo-adapter:nope: no such demo adapter \(have: "):
        wb.adapter_ref(ws, "demo-adapter:nope")


def test_mix_form_yaml_marks_exactness():
    text, status = forms.mix_form_to_yaml("demo", [["demo-adapter:x", "0.5"]], "cat", [], True, 0.5, 0.5, "merged model")
    assert "merge_into_base: true" in text and "lines:" in text and status.startswith("✓")
    labels = dict((v, k) for k, v in forms.adapter_method_choices())
    assert "exact" in labels["cat"] and "exact" not in labels["linear"]
    assert "not exact" in forms.adapter_method_md("linear")


@pytest.fixture(scope="module")
def stats_root(tmp_path_factory):
    """ROME/MEMIT statistics shared by this module's edit tests (computed once per layer)."""
    return tmp_path_factory.mktemp("rome-stats")


@pytest.fixture
def edit_wb(tmp_path, tiny_llama_family, stats_root):
    cfg = AppConfig(workspace_root=tmp_path / "ws", named_models={"tiny-base": str(tiny_llama_family["base"])},
                        edit_stats_tokens=1000, stats_root=stats_root)
    return Workbench(cfg)


def test_edit_undo_save_and_scores(edit_wb, tiny_llama_family):
    import torch

    wb = edit_wb
    r = req("e")
    session = wb.edit_session(wb.workspace(r), "tiny-base")
    before_w = {k: v.clone() for k, v in session.model.state_dict().items()}
    eval_args = ("tiny-base", "{} is located in the city of", "The Eiffel Tower", "Rome", "Paris",
                 "The Eiffel Tower is in the city of", "The Louvre is located in the city of", r, None)
    unedited = dict(wb.evaluate(*eval_args))
    b, a, md, hist = wb.edit("tiny-base", "{} is located in the city of", "The Eiffel Tower", "Rome", "Paris", None,
                             r, None)
    assert b.startswith("The Eiffel Tower is located in the city of") and "Edit **1**" in md
    assert len(hist) == 1 and hist[0][0] == 1 and hist[0][4] == "Rome"
    changed = [k for k, v in session.model.state_dict().items() if not torch.equal(v, before_w[k])]
    # non-vacuous: the MLP weights of the edit's layers moved (the default, MEMIT, spreads it over several)
    assert len(changed) == len(session.edits[0].layers) >= 1 and all("mlp.down_proj" in k for k in changed)
    scores = dict(wb.evaluate(*eval_args))
    assert {"efficacy", "paraphrase", "neighborhood", "score"} <= set(scores) and scores["active edits"] == "1"
    # The scores are computed on the edited weights (the edit's quality is the editing library's to test).
    assert scores["efficacy_magnitude"] != unedited["efficacy_magnitude"]
    # The checks by generation are shown beside them (editing.generation_checks).
    assert {"gen_efficacy", "gen_paraphrase", "gen_neighborhood", "fluency"} <= set(scores)
    msg = wb.save_edits("tiny-base", "adapter", "ed", r)
    assert "ws:ed" in msg and wb.workspace(r).item("ed").kind == "adapter"
    # The Playground applies the saved adapter to its base: the same logits as the edited model.
    ids = session.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        edited = session.model(**ids).logits
        replayed = wb.loaded_model(wb.workspace(r), "ws:ed").model(**ids).logits
        base = wb.loaded_model(wb.workspace(r), "tiny-base").model(**ids).logits
    assert (replayed - edited).abs().max() < 1e-4
    assert (base - edited).abs().max() > 1e-4  # non-vacuous: the edit changed the logits
    assert wb.active_edits("tiny-base", r)["choices"] == [1]  # Undo offers the active edit
    hist, msg = wb.undo("tiny-base", None, r)  # empty: the latest, never a failing first Undo
    assert hist == [] and "Undid edit 1" in msg
    assert all(torch.equal(v, before_w[k]) for k, v in session.model.state_dict().items())  # bit-exact
    with pytest.raises(gr.Error, match="no active edit"):
        wb.undo("tiny-base", 1, r)
    with pytest.raises(gr.Error, match="does not occur in the prompt"):
        wb.edit("tiny-base", "Paris is in", "Berlin", "Rome", "", None, r, None)
    # Another session has its own (empty) edit session.
    with pytest.raises(gr.Error, match="no edits yet"):
        wb.save_edits("tiny-base", "adapter", "x", req("other"))


def test_edit_method_choice_reaches_the_library(edit_wb):
    """The Method dropdown: r-ROME makes its update exact at the mean key, ROME at the prompt's key."""
    import torch

    from editing.methods import DEFAULT_METHOD

    wb = edit_wb
    r = req("m")
    fact = ("tiny-base", "{} is located in the city of", "The Eiffel Tower", "Rome", "Paris", None, r, None)
    session = wb.edit_session(wb.workspace(r), "tiny-base")
    pristine = {k: v.clone() for k, v in session.model.state_dict().items()}

    def moved() -> dict:
        return {k: v.clone() for k, v in session.model.state_dict().items() if not torch.equal(v, pristine[k])}

    _, _, md, hist = wb.edit(*fact, method="rome")
    assert "(rome)" in md and hist[0][1] == "rome" and session.history[0]["method"] == "rome"
    rome = moved()
    assert len(rome) == 1  # non-vacuity: one weight moved
    wb.undo("tiny-base", 1, r)
    # No method: the library's default, patch, which this random model cannot hold (its MLP inputs have no
    # near-constant direction), so the session falls back to memit and the result says so.
    _, _, md, hist = wb.edit(*fact)
    assert DEFAULT_METHOD == "patch" and "(memit)" in md and hist[0][1] == "memit"
    default = moved()
    wb.undo("tiny-base", 2, r)
    _, _, md, hist = wb.edit(*fact, method="r-rome")
    assert "(r-rome)" in md and hist[0][1] == "r-rome"
    r_rome = moved()
    wb.undo("tiny-base", 3, r)
    _, _, md, hist = wb.edit(*fact, method="memit")
    assert "(memit)" in md and hist[0][1] == "memit"
    memit = moved()
    name = next(iter(rome))
    assert set(r_rome) == {name} and not torch.equal(r_rome[name], rome[name])  # the choice reached the library
    assert len(memit) > 1 and name in memit  # MEMIT spreads the fact over several layers' down projections
    assert set(default) == set(memit) and all(torch.equal(default[k], memit[k]) for k in memit)
    with pytest.raises(gr.Error, match="[Mm]ethod"):
        wb.edit(*fact, method="memitt")


def test_batch_edit_file_limit(tmp_path):
    """The app reads edit files with editing.batch_file (tested there) and takes at most MAX_BATCH_EDITS."""
    csv_file = tmp_path / "edits.csv"
    row = "{} is located in,The Eiffel Tower,Rome,Paris\n"
    csv_file.write_text("prompt,subject,target_new,ground_truth\n" + row * MAX_BATCH_EDITS)
    assert len(load_edit_requests(csv_file)) == MAX_BATCH_EDITS
    csv_file.write_text("prompt,subject,target_new,ground_truth\n" + row * (MAX_BATCH_EDITS + 1))
    with pytest.raises(WeightsmithError, match="at most 200 .*weightsmith edit --batch"):
        load_edit_requests(csv_file)


def test_trace_suggests_a_layer(edit_wb):
    fig, md, layer = edit_wb.trace("tiny-base", "{} is located in the city of", "The Eiffel Tower", "mlp", 1,
                                   req("t"), None)
    assert 0 <= layer < 4 and f"layer **{layer}**" in md
    assert fig.axes  # a heatmap figure
    with pytest.raises(gr.Error, match="subject is empty"):
        edit_wb.trace("tiny-base", "{} is in", " ", "mlp", 1, req("t"), None)


def test_stop_cancels_a_running_merge_and_leaves_nothing(wb):
    text, _ = forms.merge_yaml_from_form(*_merge_form())
    r = req("s")

    def press_stop(*args, **kwargs):  # the Stop button, pressed while the first tensors are merged
        wb.stop(r)

    with pytest.raises(gr.Error, match="(?i)cancel|stop"):
        wb.merge(text, "stopped", r, press_stop)
    ws = wb.workspace(r)
    assert ws.items() == [] and not ws.item_path("stopped").exists()
    assert not ws.items_dir.exists() or not any(ws.items_dir.iterdir())  # no staging left behind either
    # The session is usable again right after.
    md, _, ref = wb.merge(text, "after-stop", r, None)
    assert ref == "ws:after-stop"


def test_end_session_frees_the_edit_model(edit_wb):
    r = req("bye")
    edit_wb.edit_session(edit_wb.workspace(r), "tiny-base")
    assert len(edit_wb._edit_sessions) == 1
    edit_wb.end_session(r)
    assert edit_wb._edit_sessions == {}


def test_batch_edit_from_csv_is_one_history_entry(edit_wb, tmp_path):
    import torch

    csv_file = tmp_path / "facts.csv"
    csv_file.write_text("prompt,subject,target_new,ground_truth\n"
                        "{} is located in the city of,The Eiffel Tower,Rome,Paris\n"
                        "The capital of {} is,Germany,Madrid,Berlin\n")
    r = req("batch")
    session = edit_wb.edit_session(edit_wb.workspace(r), "tiny-base")
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    hist, msg = edit_wb.edit_batch("tiny-base", str(csv_file), r, None)
    assert "2 facts" in msg
    assert len(hist) == 2 and {row[0] for row in hist} == {1} and {row[1] for row in hist} == {"memit"}
    assert any(not torch.equal(v, before[k]) for k, v in session.model.state_dict().items())
    edit_wb.undo("tiny-base", 1, r)
    assert all(torch.equal(v, before[k]) for k, v in session.model.state_dict().items())
    with pytest.raises(gr.Error, match="upload a JSON or CSV"):
        edit_wb.edit_batch("tiny-base", None, r, None)


# ---- issue 13: no silent waits, and the rough edges a new user hit -------------------------------------------

def test_sizes_under_a_tenth_of_a_megabyte_are_kilobytes(wb, tiny_adapters):
    from checkpoints.sizes import format_size, parse_size

    assert format_size(12_288) == "12.3 KB" and format_size(512) == "512 B"
    assert format_size(4_200_000) == "4.2 MB" and format_size(1.5e9) == "1.50 GB"
    for n in (12_288, 99_999, 4_200_000):
        assert abs(parse_size(format_size(n)) - n) <= 0.05 * n  # the parser reads the formatter back
    wb.upload([str(p) for p in tiny_adapters[0].iterdir() if p.suffix in (".json", ".safetensors")], "small", "",
              req("kb"))
    (size,) = [row[3] for row in wb.workspace_table(req("kb")) if row[0] == "ws:small"]
    assert size.endswith(" KB") and float(size.split()[0]) > 0, size


def test_push_refusal_speaks_to_the_visitor(wb, tiny_llama_family, monkeypatch, caplog):
    from huggingface_hub import constants

    ref = _upload_tiny(wb, "p", tiny_llama_family["ft2"], "offline")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with caplog.at_level("WARNING"), pytest.raises(gr.Error) as e:
        wb.push(ref, "alice/offline", False, GOOD_TOKEN, req("p"), None, None)
    assert "cannot push" in str(e.value) and "download" in str(e.value)
    assert "unset" not in str(e.value) and "HF_HUB_OFFLINE" not in str(e.value)
    assert "unset it" in caplog.text  # the operator's hint is in the server log


def test_upload_without_tokenizer_says_what_it_limits(wb, tiny_llama_family):
    folder = tiny_llama_family["ft1"]
    weights_only = [str(p) for p in folder.iterdir() if p.name in ("config.json", "model.safetensors")]
    msg = wb.upload(weights_only, "bare", "", req("u"))
    assert "ws:bare" in msg and "No tokenizer" in msg and "Playground" in msg
    full = wb.upload([str(p) for p in folder.iterdir() if p.is_file()], "full", "", req("u"))
    assert "No tokenizer" not in full  # non-vacuity: with its tokenizer nothing is said


def test_mix_progress_moves_through_the_mix(wb, tiny_adapters):
    _upload_adapters(wb, tiny_adapters, "mx")
    recipe = MIX_RECIPE
    for extra in ("", "merge_into_base: true\n"):
        seen = []
        wb.mix_adapters(recipe + extra, "mix", req("mx"), lambda frac, desc=None: seen.append((frac, desc)))
        fractions = [f for f, _ in seen]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
        assert max(b - a for a, b in zip(fractions, fractions[1:])) <= 0.35, seen  # no long jump after a long sit
        assert any("mixing with cat" in d for _, d in seen) and any("attaching" in d for _, d in seen)
        wb.workspace(req("mx")).delete_item("mix")


def test_merge_form_offers_only_what_the_method_takes():
    assert forms.merge_columns("task_arithmetic") == ["model", "weight"]  # no density column
    assert forms.merge_columns("ties") == ["model", "weight", "density"]  # non-vacuity: TIES trims
    text, status = forms.merge_yaml_from_form(
        "task_arithmetic", "tiny-base", [forms.merge_default_row("task_arithmetic", "tiny-ft1"),
                                         forms.merge_default_row("task_arithmetic", "tiny-ft2")],
        forms.merge_shared_rows("task_arithmetic"), False, True, 0.5, 0.5, "", "")
    assert status.startswith("✓") and "density" not in text and "weight: 1.0" in text
    assert forms.merge_default_row("ties", "m") == ["m", "1.0", ""]  # a default the user never chose stays empty
    # Linear takes no base model: switching to it leaves base_model out and turns the picker off.
    text, status = forms.merge_yaml_from_form(*_merge_form("linear"))
    assert status.startswith("✓"), status
    assert "base_model" not in text
    from ui.tab_merge import base_update

    assert base_update("linear")["interactive"] is False and base_update("ties")["interactive"] is True


def test_merge_tab_says_nothing_before_the_user_acts():
    form = ["task_arithmetic", "demo", [["", ""]], forms.merge_shared_rows("task_arithmetic"), False, True, 0.5,
            0.5, "", ""]
    assert forms.merge_yaml_from_form(*form)[1].startswith("⚠")  # non-vacuity: the empty form is not valid yet
    text, status = forms.merge_yaml_untouched(*form)
    assert status == "" and "merge_method: task_arithmetic" in text


def test_yaml_edit_updates_the_method_and_its_description():
    from ui.tab_merge import form_from_yaml

    text, _ = forms.merge_yaml_from_form(*_merge_form("task_arithmetic"))
    out = form_from_yaml(text.replace("task_arithmetic", "ties"))
    assert out[0] == "ties" and out[10] == forms.merge_method_md("ties") and out[-1].startswith("✓")
    assert out[10] != forms.merge_method_md("task_arithmetic")
    linear = form_from_yaml("merge_method: linear\nmodels:\n  - {model: tiny-ft1, parameters: {weight: 1.0}}\n")
    assert linear[1]["interactive"] is False  # the base picker is off for a method without one


def test_edit_layer_field_is_empty_and_sends_none():
    from ui.handlers_edit import layer_value

    assert layer_value("") is None and layer_value(None) is None and layer_value(" 3 ") == 3
    assert layer_value(3) == 3 and layer_value(0) == 0  # an API client's number
    for bad, line in (("seven", "whole number"), ("1.5", "whole number"), (-1, "at least 0"), ("nan", "whole number"),
                      ([2], "whole number or empty")):
        with pytest.raises(WeightsmithError, match=line):
            layer_value(bad)


def test_failed_working_model_keeps_the_original_pane(wb, tiny_llama_family):
    folder = tiny_llama_family["ft1"]
    wb.upload([str(p) for p in folder.iterdir() if p.name in ("config.json", "model.safetensors")], "bare", "",
              req("g"))
    shown = []
    with pytest.raises(gr.Error) as e:
        for panes in wb.generate("ws:bare", "tiny-base", "The capital of France is", 4, req("g")):
            shown.append(panes)
    assert "\n" not in str(e.value) and "tokenizer" in str(e.value).lower()  # one message, naming what is missing
    assert shown and shown[-1][0] == "" and shown[-1][1]  # the original model's answer is still shown
    # non-vacuity: the same original alone streams the same text
    alone = list(wb.generate("", "tiny-base", "The capital of France is", 4, req("g")))[-1]
    assert alone[1] == shown[-1][1]
