"""One browser test: Playwright drives Debian's Chromium through a small merge in the page.

``playwright install`` cannot download browsers here, so the test launches
``/usr/bin/chromium`` (``make browser`` installs it) and is skipped with a
clear reason when it is missing. It saves a screenshot of the result.

The journeys of a new user, and the README's screenshots, are in ``test_app_journeys.py``.
"""

from __future__ import annotations

from contextlib import contextmanager

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ui.config import AppConfig, launch_kwargs  # noqa: E402
from ui.layout import build_app  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.browser


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


@contextmanager
def _opened(url: str):
    """A fresh headless Chromium page at ``url`` (1280×1000), closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            # The suite shares the machine: a step may wait on the CPU far longer than Playwright's 30 s.
            page.set_default_timeout(120_000)
            page.goto(url)
            yield page
        finally:
            browser.close()


def set_dropdown(page, label: str, value: str, *, scope=None) -> None:
    """Type a value into a Gradio dropdown (custom values allowed) and commit it with Enter."""
    box = (scope or page).get_by_label(label, exact=True)
    box.click()
    box.fill(value)
    box.press("Enter")
    page.wait_for_timeout(300)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llama_family):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium) to enable the browser test")
    pytest.importorskip("playwright.sync_api")
    root = tmp_path_factory.mktemp("browser-ws")
    cfg = AppConfig(workspace_root=root, named_models={
        "tiny-base": str(tiny_llama_family["base"]), "tiny-ft1": str(tiny_llama_family["ft1"]),
        "tiny-ft2": str(tiny_llama_family["ft2"])}, stats_root=root / "stats", edit_stats_tokens=1000)
    demo = build_app(config=cfg)
    demo.queue().launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **launch_kwargs(cfg))
    try:
        yield demo
    finally:
        demo.close()


def test_merge_through_the_page(served, tmp_path):
    from playwright.sync_api import expect

    shot = tmp_path / "merge-result.png"
    with _opened(served.local_url) as page:
        page.get_by_role("tab", name="Merge").click()
        merge = page.locator("#tab-merge")
        expect(merge.get_by_text("Task Arithmetic", exact=False).first).to_be_visible(timeout=30_000)
        set_dropdown(page, "Base model", "tiny-base", scope=merge)
        for ref in ("tiny-ft1", "tiny-ft2"):
            set_dropdown(page, "Add a model", ref, scope=merge)
            merge.get_by_role("button", name="Add ▾").click()
            page.wait_for_timeout(500)
        recipe = merge.locator(".cm-content")
        expect(recipe).to_contain_text("tiny-ft2", timeout=15_000)
        expect(recipe).to_contain_text("base_model: tiny-base")
        expect(merge.get_by_text("✓ recipe is valid")).to_be_visible()
        merge.get_by_label("Output name").fill("ui-merge")
        merge.get_by_role("button", name="Merge", exact=True).click()
        expect(merge.get_by_text("tensors changed")).to_be_visible(timeout=60_000)
        expect(merge.get_by_text("ws:ui-merge").first).to_be_visible()
        page.screenshot(path=str(shot), full_page=True)
        # YAML -> form: typing a recipe updates the method, the models table and LiNeS.
        recipe.click()
        page.keyboard.press("Control+A")
        page.keyboard.insert_text("merge_method: ties\nbase_model: tiny-base\nmodels:\n"
                                  "  - model: tiny-ft2\n    parameters: {weight: 0.3, density: 0.6}\n"
                                  "lines: {alpha: 0.25, beta: 0.75}\n")
        expect(merge.get_by_text("form updated from YAML")).to_be_visible(timeout=15_000)
        expect(merge.get_by_role("combobox", name="Method")).to_have_value("TIES (ties)")
        expect(merge.get_by_label("LiNeS layer scaling")).to_be_checked()
        expect(merge.get_by_label("β", exact=True)).to_have_value("0.75")
        expect(merge.get_by_role("gridcell", name="0.6")).to_be_visible()
    assert shot.stat().st_size > 10_000
    # The merge really landed in that browser session's workspace, and nowhere else.
    wb = served.workbench
    found = [p for p in wb.workspaces.config.root.glob("*/items/ui-merge")]
    assert len(found) == 1 and (found[0] / "model.safetensors").exists()


def test_adapter_upload_in_the_adapters_tab(served, tmp_path, tiny_llama_family):
    from playwright.sync_api import expect

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_app import make_tiny_adapter

    ad = make_tiny_adapter(tiny_llama_family["base"], tmp_path / "browser-lora", seed=3)
    with _opened(served.local_url) as page:
        page.get_by_role("tab", name="Adapters").click()
        tab = page.locator("#tab-adapters")
        tab.locator("input[type=file]").first.set_input_files(
            [str(ad / "adapter_config.json"), str(ad / "adapter_model.safetensors")])
        expect(tab.get_by_text("Imported")).to_be_visible(timeout=30_000)
        expect(tab.locator(".cm-content")).to_contain_text("adapter: ws:", timeout=15_000)


def test_first_look_and_a_failed_playground_model(served, tmp_path, tiny_llama_family):
    """Issue 13's page behaviours: no warning before the user acts, an empty Layer field, and a working model
    without a tokenizer that fails in one message while the original model's answer stays in its pane."""
    from playwright.sync_api import expect

    folder = tiny_llama_family["ft1"]
    with _opened(served.local_url) as page:
        page.get_by_role("tab", name="Merge").click()
        merge = page.locator("#tab-merge")
        expect(merge.locator(".cm-content")).to_contain_text("merge_method: task_arithmetic", timeout=30_000)
        expect(merge.get_by_text("⚠")).to_have_count(0)  # nothing is wrong before the user has acted
        page.get_by_role("tab", name="Edit").click()
        edit = page.locator("#tab-edit")
        layer = edit.get_by_role("textbox", name="Layer empty: the method's default; Trace fills in its suggestion")
        expect(layer).to_have_value("")  # not 0
        expect(layer).to_have_attribute("placeholder", "default")
        edit.get_by_role("button", name="Undo edit").click()  # nothing to undo yet: one message
        expect(page.locator(".toast-body").first).to_contain_text("no edits yet", timeout=30_000)
        expect(page.locator("#edit-history").get_by_text("Error", exact=True)).to_have_count(0)
        page.locator(".toast-body").first.locator("..").get_by_role("button", name="Close").first.click()
        page.get_by_role("tab", name="Models").click()
        models = page.locator("#tab-models")
        models.locator("input[type=file][multiple]").first.set_input_files(
            [str(folder / "config.json"), str(folder / "model.safetensors")])
        page.wait_for_timeout(1_000)
        models.get_by_label("Name").fill("bare")
        models.get_by_role("button", name="Import").click()
        expect(models.get_by_text("No tokenizer in this upload")).to_be_visible(timeout=60_000)
        page.get_by_role("tab", name="Playground").click()
        play = page.locator("#tab-playground")
        for label, value in (("Working model", "ws:bare"), ("Original model", "tiny-base")):
            box = play.get_by_role("combobox", name=label)  # the pane below has the same label
            box.click()
            box.fill(value)
            box.press("Enter")
            page.wait_for_timeout(300)
        tokens = play.get_by_role("spinbutton", name="number input for Max new tokens")
        tokens.fill("4")
        tokens.press("Tab")
        play.get_by_role("button", name="Generate").click()
        expect(page.locator(".toast-body").first).to_contain_text("tokenizer", timeout=60_000)
        original = page.locator("#play-original textarea")
        expect(original).not_to_have_value("", timeout=10_000)
        expect(page.locator("#play-original").get_by_text("Error", exact=True)).to_have_count(0)
        page.screenshot(path=str(tmp_path / "playground-error.png"), full_page=True)
