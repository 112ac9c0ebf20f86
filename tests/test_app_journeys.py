"""The six journeys of a new user (issue 13, item 5), driven in Debian's Chromium as a user would.

Models, Merge, Adapters, Edit, Playground and Export: each test opens the page, clicks, types and
uploads (``set_input_files``), waits for the result, asserts what the user sees, and saves a
screenshot of the journey's end state. The tests run on tiny models (one server for the module,
``served`` from :mod:`test_app_browser`); the same journey functions, run on the demo model, remake
the README's screenshots:

    .venv/bin/python tests/test_app_journeys.py assets/screenshots
"""

from __future__ import annotations

import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_app_browser import _browser, _opened, served, set_dropdown  # noqa: E402,F401 - served: the fixture

pytestmark = pytest.mark.browser

FACT = ("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
UPLOAD_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja")


@dataclass
class Cast:
    """What the journeys use: tiny models in the tests, the demo model for the README's screenshots."""

    base: str
    finetunes: tuple[str, ...]  # merged into ``base`` by task arithmetic
    upload: list[Path]  # files the Models journey imports (a model or an adapter)
    inspect_ref: str  # the model the Models journey inspects ("ws:<upload>" for its own upload)
    parameters: int  # the parameter count Inspect shows for it
    adapters: tuple[list[Path], list[Path]]  # two PEFT adapters' files on ``base``
    fact: tuple[str, str, str, str] = FACT  # prompt, subject, new target, true answer
    edit_layer: str | None = None  # None: the trace's suggestion; "": the default layer (statistics prepared)
    edit_method: str | None = None  # None: the menu's default (patch)
    playground: str | None = None  # the Playground's working model (default: the first fine-tune)
    export_item: str = "ws:my-merge"  # the Merge journey's result
    new_tokens: int = 8
    timeout: float = 60_000  # ms for one job
    upload_name: str = "my-model"
    made: dict[str, str] = field(default_factory=dict)  # refs the journeys created, by journey


def folder_files(folder: Path) -> list[Path]:
    """The files of a model or adapter folder a user would upload."""
    return sorted(p for p in folder.iterdir() if p.suffix in UPLOAD_SUFFIXES)


def tab(page, name: str):
    page.get_by_role("tab", name=name).click()
    return page.locator(f"#tab-{name.lower()}")


def imported_ref(scope, timeout: float, *, not_: list[str] = ()) -> str:
    """The ``ws:<name>`` an upload message ("Imported **ws:name** ...") names, once it names none of ``not_``
    (the earlier uploads' message stays until the next upload's answer replaces it)."""
    from playwright.sync_api import expect

    others = "".join(rf"(?!{re.escape(r[3:])}(?![\w.-]))" for r in not_)
    msg = scope.get_by_text(re.compile(rf"Imported ws:{others}[\w.-]+")).first
    expect(msg).to_be_visible(timeout=timeout)
    return re.search(r"ws:[\w.-]+", msg.inner_text()).group(0)


def settled(page, selectors: list[str], timeout: float, quiet: float = 1.5) -> None:
    """Wait until the text areas at ``selectors`` hold text that has stopped changing (a stream has ended)."""
    import time

    deadline, last, since = time.monotonic() + timeout / 1000, None, time.monotonic()
    while time.monotonic() < deadline:
        now = [page.locator(f"{s} textarea").input_value() for s in selectors]
        if now != last:
            last, since = now, time.monotonic()
        elif all(v.strip() for v in now) and time.monotonic() - since >= quiet:
            return
        page.wait_for_timeout(250)
    raise AssertionError(f"{selectors} did not settle on text: {last}")


# ---- the journeys ----------------------------------------------------------------------------------
def models_journey(page, cast: Cast, shot: Callable[[str], None]) -> None:
    """Upload files into the workspace, see them listed with their size, inspect a model."""
    from playwright.sync_api import expect

    t = tab(page, "Models")
    t.locator("input[type=file][multiple]").first.set_input_files([str(p) for p in cast.upload])
    weights = next(p.name for p in cast.upload if p.suffix == ".safetensors")
    expect(t.get_by_text(weights).first).to_be_visible(timeout=cast.timeout)  # uploaded
    t.get_by_label("Name").fill(cast.upload_name)
    t.get_by_role("button", name="Import").click()
    ref = f"ws:{cast.upload_name}"
    expect(t.get_by_text(f"Imported {ref}")).to_be_visible(timeout=cast.timeout)
    table = page.get_by_label("Items (private to this session)")
    expect(table.get_by_role("gridcell", name=ref, exact=True)).to_be_visible(timeout=cast.timeout)
    expect(table.get_by_role("gridcell", name=re.compile(r"^[\d.]+ [KMG]B$"))).to_be_visible()
    set_dropdown(page, "Model", cast.inspect_ref, scope=t)
    t.get_by_role("button", name="Inspect").click()
    summary = t.get_by_label("Summary")
    expect(summary.get_by_role("gridcell", name=f"{cast.parameters:,}", exact=True)).to_be_visible(
        timeout=cast.timeout)
    cast.made["models"] = ref
    shot("models")


def merge_journey(page, cast: Cast, shot: Callable[[str], None]) -> None:
    """Base and two fine-tunes into task arithmetic, merged: the summary says the weights are finite."""
    from playwright.sync_api import expect

    t = tab(page, "Merge")
    expect(t.locator(".cm-content")).to_contain_text("merge_method: task_arithmetic", timeout=cast.timeout)
    set_dropdown(page, "Base model", cast.base, scope=t)
    for ref in cast.finetunes:
        set_dropdown(page, "Add a model", ref, scope=t)
        t.get_by_role("button", name="Add ▾").click()
        expect(t.locator(".cm-content")).to_contain_text(f"model: {ref}", timeout=cast.timeout)
    expect(t.get_by_text("✓ recipe is valid")).to_be_visible()
    t.get_by_label("Output name").fill("my-merge")
    t.get_by_role("button", name="Merge", exact=True).click()
    expect(t.get_by_text("tensors changed")).to_be_visible(timeout=cast.timeout)
    # The finite check of every output tensor, as the user reads it.
    expect(t.get_by_text(re.compile(r"weights: all \d+ output tensors finite"))).to_be_visible()
    expect(t.get_by_label("Result")).to_have_value("ws:my-merge")
    cast.made["merge"] = "ws:my-merge"
    shot("merge")


def adapters_journey(page, cast: Cast, shot: Callable[[str], None]) -> None:
    """Upload two adapters, write the mix recipe, mix them into the base: the summary shows the exact mix."""
    from playwright.sync_api import expect

    t = tab(page, "Adapters")
    refs = []
    for files in cast.adapters:
        box = t.locator("input[type=file]").first
        box.set_input_files([str(p) for p in files])
        refs.append(imported_ref(t, cast.timeout, not_=refs))
        t.get_by_role("button", name="Clear").first.click()  # the box again, for the next adapter
    assert len(set(refs)) == 2, refs
    table = t.get_by_label("Adapters and weights")
    for ref in refs:  # each upload joined the mix table
        expect(table.get_by_role("gridcell", name=ref, exact=True)).to_be_visible()
    t.get_by_label("merged model").check()
    recipe = t.locator(".cm-content")
    expect(recipe).to_contain_text("merge_into_base: true")
    recipe.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(f"base_model: {cast.base}\nadapters:\n"
                              + "".join(f"- adapter: {r}\n  weight: 0.5\n" for r in refs)
                              + "method: cat\nmerge_into_base: true\n")
    # The table follows the recipe typed into the box: these two adapters, each at 0.5 (the uploads said 1.0).
    expect(table.get_by_role("gridcell", name="0.5", exact=True)).to_have_count(2, timeout=cast.timeout)
    expect(table.get_by_role("gridcell", name="1.0", exact=True)).to_have_count(0)
    for ref in refs:
        expect(table.get_by_role("gridcell", name=ref, exact=True)).to_be_visible()
    t.get_by_label("Output name").fill("my-mix")
    t.get_by_role("button", name="Mix", exact=True).click()
    expect(t.get_by_text("Mixed", exact=True)).to_be_visible(timeout=cast.timeout)
    expect(t.get_by_text("exact in ΔW space: yes")).to_be_visible()
    expect(t.get_by_text(f"adapters: {refs[0][3:]} × 0.5, {refs[1][3:]} × 0.5")).to_be_visible()
    expect(t.get_by_label("Result")).to_have_value("ws:my-mix")
    cast.made["adapters"] = "ws:my-mix"
    shot("adapters")


def edit_journey(page, cast: Cast, shot: Callable[[str], None]) -> None:
    """Trace the fact, apply the edit: before/after text, the history row with its check; undo it."""
    from playwright.sync_api import expect

    prompt, subject, target, true = cast.fact
    t = tab(page, "Edit")
    set_dropdown(page, "Model to edit", cast.base, scope=t)
    for label, value in (("Prompt", prompt), ("Subject", subject), ("New target", target),
                         ("True answer (optional)", true)):
        t.get_by_role("textbox", name=re.compile("^" + re.escape(label))).fill(value)  # its name goes on with the info
    t.get_by_role("button", name="Trace", exact=True).click()
    expect(t.get_by_text("set as the edit layer")).to_be_visible(timeout=cast.timeout)
    suggested = re.search(r"Suggested edit layer (\d+)", t.get_by_text("set as the edit layer").inner_text())
    layer = t.get_by_role("textbox", name=re.compile("^Layer"))
    expect(layer).to_have_value(suggested.group(1))  # the trace's layer landed in the field
    plan = page.locator("#edit-plan")  # the layers the edit will change, named before it runs
    if cast.edit_method is not None:
        set_dropdown(page, "Method", cast.edit_method, scope=t)
    expect(plan).to_contain_text(re.compile(rf"will edit layers? (?:.*layer )?{suggested.group(1)}\b"),
                                 timeout=cast.timeout)
    if cast.edit_layer is not None:
        layer.fill(cast.edit_layer)
        expect(plan).to_contain_text("default" if cast.edit_layer == "" else f"layer {cast.edit_layer}",
                                     timeout=cast.timeout)
    shown = re.search(r"will edit (layers? [\d–, ]*\d)", plan.inner_text()).group(1)
    t.get_by_role("button", name="Apply edit").click()
    expect(t.get_by_text("Undo it below")).to_be_visible(timeout=cast.timeout)
    expect(t.get_by_text(f"at {shown} in ")).to_be_visible()  # and the result names the same layers
    cast.made["edit layers"] = shown
    text = prompt.replace("{}", subject)
    expect(t.get_by_label("Before the edit")).to_have_value(re.compile("^" + re.escape(text) + ".+"))
    expect(t.get_by_label("After the edit")).to_have_value(re.compile("^" + re.escape(text) + ".+"))
    history = page.locator("#edit-history")
    expect(history.get_by_role("gridcell", name=target, exact=True)).to_be_visible()
    # The check column: the checks' warning, or ok with the update's relative norm and the drift so far.
    check = history.get_by_role("gridcell", name=re.compile(
        r"^ok \(‖ΔW‖\/‖W‖ [\d.e+-]+, drift KL [\d.e+-]+\)$|did not take|disabling|moved the model away"))
    expect(check).to_be_visible()
    t.get_by_role("button", name="Evaluate").click()
    expect(t.get_by_label("Scores").get_by_role("gridcell", name="efficacy", exact=True)).to_be_visible(
        timeout=cast.timeout)
    cast.made["edit"] = check.inner_text()
    shot("edit")
    t.get_by_role("button", name="Undo edit").click()  # empty: the latest
    expect(t.get_by_text(re.compile(r"Undid edit \d+; the weights are exactly as without it"))).to_be_visible(
        timeout=cast.timeout)
    expect(history.get_by_role("gridcell", name=target, exact=True)).to_have_count(0)
    expect(t.get_by_label("After the edit")).to_have_value("")  # no stale text after the undo


def playground_journey(page, cast: Cast, shot: Callable[[str], None]) -> None:
    """Generate from the working model and the original side by side."""
    from playwright.sync_api import expect

    t = tab(page, "Playground")
    for label, value in (("Working model", cast.playground or cast.finetunes[0]), ("Original model", cast.base)):
        box = t.get_by_role("combobox", name=label)  # the output pane below has the same label
        box.click()
        box.fill(value)
        box.press("Enter")
    t.get_by_label("Prompt").fill("The capital of France is")
    tokens = t.get_by_role("spinbutton", name="number input for Max new tokens")
    tokens.fill(str(cast.new_tokens))
    tokens.press("Tab")
    t.get_by_role("button", name="Generate").click()
    settled(page, ["#play-working", "#play-original"], cast.timeout)  # both panes streamed their answer
    expect(page.locator(".toast-body")).to_have_count(0)  # and no error
    shot("playground")


def export_journey(page, cast: Cast, shot: Callable[[str], None]) -> list[str]:
    """Pick a workspace item, read its card, make the zip and download it; returns the zip's file names."""
    from playwright.sync_api import expect

    t = tab(page, "Export")
    t.get_by_role("button", name="Refresh").click()
    set_dropdown(page, "Workspace item", cast.export_item, scope=t)
    expect(t.get_by_text(re.compile(r"q8_0: about [\d.]+ [KMG]B of weights"))).to_be_visible(timeout=cast.timeout)
    expect(t.get_by_text("Listed on the Hub as")).to_be_visible(timeout=cast.timeout)  # the card Push would publish
    t.get_by_role("button", name="Make zip").click()
    expect(t.get_by_label(f"{cast.export_item[3:]}.zip", exact=True)).to_be_visible(timeout=cast.timeout)
    link = t.get_by_test_id("download-link")  # "<size> ⇣"
    expect(link).to_have_attribute("download", f"{cast.export_item[3:]}.zip")
    expect(link).to_have_text(re.compile(r"[\d.]+\s[KMG]B"))
    with page.expect_download(timeout=cast.timeout) as download:
        link.click()
    names = zipfile.ZipFile(download.value.path()).namelist()  # read before the browser (and it) goes
    folder = cast.export_item[3:]  # the zip holds the item's folder
    assert f"{folder}/config.json" in names and any(n.endswith(".safetensors") for n in names), names
    shot("export")
    return names


JOURNEYS = {"models": models_journey, "merge": merge_journey, "adapters": adapters_journey,
            "edit": edit_journey, "playground": playground_journey, "export": export_journey}


# ---- the tests, on tiny models -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cast(tiny_llama_family, tmp_path_factory):
    from safetensors.torch import load_file
    from test_app import make_tiny_adapter

    root = tmp_path_factory.mktemp("journey-adapters")
    ads = [folder_files(make_tiny_adapter(tiny_llama_family["base"], root / f"style-{i}", seed=i)) for i in (1, 2)]
    upload = folder_files(tiny_llama_family["ft3"])
    count = sum(t.numel() for t in load_file(str(tiny_llama_family["ft3"] / "model.safetensors")).values())
    # A random model's MLP inputs have no near-constant direction, so it cannot hold patch neurons: its edit
    # would fall back to memit, which the plan line cannot know before the statistics. Chosen outright here.
    return Cast(base="tiny-base", finetunes=("tiny-ft1", "tiny-ft2"), upload=upload, inspect_ref="ws:my-model",
                parameters=count, adapters=(ads[0], ads[1]), edit_method="memit")


def run(served, cast: Cast, name: str, tmp_path: Path, *before: str, at_shot: Callable[[], None] = lambda: None):
    """Open a fresh page (a new session), run the journeys ``before`` it, then journey ``name``
    (``at_shot`` runs when its end state is shot); returns (its result, its screenshot)."""
    shots: dict[str, Path] = {}

    def shot(n: str) -> None:
        shots[n] = tmp_path / f"{n}.png"
        page.screenshot(path=str(shots[n]), full_page=True)
        at_shot()

    with _opened(served.local_url) as page:
        for b in before:
            JOURNEYS[b](page, cast, lambda n: None)
        out = JOURNEYS[name](page, cast, shot)
    assert shots[name].stat().st_size > 10_000  # a rendered page, not a blank one
    return out, shots[name]


def session_items(served) -> set[str]:
    return {p.name for p in served.workbench.workspaces.config.root.glob("*/items/*")}


def test_models_journey(served, cast, tmp_path):
    run(served, cast, "models", tmp_path)
    found = list(served.workbench.workspaces.config.root.glob("*/items/my-model/model.safetensors"))
    assert len(found) >= 1


def test_merge_journey(served, cast, tmp_path):
    run(served, cast, "merge", tmp_path)
    assert "my-merge" in session_items(served)


def test_adapters_journey(served, cast, tmp_path):
    run(served, cast, "adapters", tmp_path)
    assert "my-mix" in session_items(served)


def test_edit_journey(served, cast, tmp_path):
    from ui.tables import history_rows

    wb, before, seen = served.workbench, set(served.workbench._edit_sessions), []

    def library_rows():  # the history as the library holds it when the page shows the edit
        (ws_id,) = set(wb._edit_sessions) - before
        seen.append((wb._edit_sessions[ws_id][1], history_rows(wb._edit_sessions[ws_id][1].history)))

    run(served, cast, "edit", tmp_path, at_shot=library_rows)
    (session, rows), = seen
    assert len(rows) == 1 and rows[0][4] == "Rome"
    assert cast.made["edit"] == rows[0][6] != ""  # the page's check column is the library's check of that edit
    layers = [int(x) for x in re.findall(r"\d+", cast.made["edit layers"])]
    if "–" in cast.made["edit layers"]:
        layers = list(range(layers[0], layers[1] + 1))
    assert rows[0][2] == ",".join(map(str, layers))  # the layers the page named are those the library edited
    assert session.history == []  # then undone from the page


def test_playground_journey(served, cast, tmp_path):
    run(served, cast, "playground", tmp_path)


def test_export_journey(served, cast, tmp_path):
    names, _ = run(served, cast, "export", tmp_path, "merge")
    assert "my-merge/README.md" in names  # the card the preview showed travels with the weights


# ---- the README's screenshots, on the demo model ------------------------------------------------------
def make_screenshots(out_dir: Path, *, port: int = 7870) -> list[Path]:
    """Serve the app on the demo model and run every journey in one page (each uses the ones before it:
    the mix is merged, the merge exported); one screenshot per journey into ``out_dir``."""
    from checkpoints.demo_adapters import demo_adapters
    from editing.prepare import configured_corpus
    from playwright.sync_api import sync_playwright
    from ui.config import AppConfig, launch_kwargs
    from ui.layout import build_app

    out_dir.mkdir(parents=True, exist_ok=True)
    ads = demo_adapters()
    cast = Cast(base="demo", finetunes=("ws:my-mix",), upload=folder_files(ads["caps"]),
                upload_name="my-caps-adapter", inspect_ref="demo", parameters=134_515_008,
                adapters=(folder_files(ads["caps"]), folder_files(ads["pirate"])),
                edit_layer="",  # the default layer, whose statistics `weightsmith demo-model` prepared
                playground="ws:my-mix", new_tokens=48, timeout=1_800_000)
    # The statistics `weightsmith demo-model` prepared (``make run``): the same corpus as `weightsmith serve`.
    cfg = AppConfig(edit_corpus=configured_corpus())
    demo = build_app(config=cfg)
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        **launch_kwargs(cfg))
    saved: list[Path] = []
    try:
        with sync_playwright() as p:
            browser = _browser(p)
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            page.set_default_timeout(cast.timeout)
            page.goto(demo.local_url)

            def shot(name: str) -> None:
                page.wait_for_timeout(1_000)  # plots finish drawing
                saved.append(out_dir / f"{name}.png")
                page.screenshot(path=str(saved[-1]), full_page=True)

            for name in ("models", "adapters", "merge", "edit", "playground", "export"):
                JOURNEYS[name](page, cast, shot)
            browser.close()
    finally:
        demo.close()
    return saved


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO)
    for path in make_screenshots(Path(sys.argv[1] if len(sys.argv) > 1 else "assets/screenshots")):
        print(path)
