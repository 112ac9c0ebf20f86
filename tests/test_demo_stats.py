"""`weightsmith demo-model` prepares the editing statistics the app's first edit looks up, and the app
keeps one loaded model and session per browser session (issue 13, item 1). Tiny model as "demo"."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import checkpoints.demo
import checkpoints.sources
import editing.stats
from checkpoints.sources import LocalCheckpoint
from cli import main
from ui.config import AppConfig
from ui.workbench import Workbench

FACT = ("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


def req(name: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=name)


@pytest.fixture
def tiny_demo(tmp_path, monkeypatch, tiny_llama_family):
    """``demo`` is the tiny llama, under a fresh WEIGHTSMITH_HOME; counts statistics computations."""
    folder = tiny_llama_family["base"]
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WEIGHTSMITH_EDIT_CORPUS", raising=False)
    monkeypatch.setattr(checkpoints.demo, "demo_model_path", lambda: folder)
    monkeypatch.setattr(checkpoints.sources, "demo_model_path", lambda: folder)
    computed: list[list[int]] = []
    real = editing.stats.compute_second_moments

    def counting(model, tokenizer, spec, layers, *args, **kwargs):
        computed.append(list(layers))
        return real(model, tokenizer, spec, layers, *args, **kwargs)

    monkeypatch.setattr(editing.stats, "compute_second_moments", counting)
    return SimpleNamespace(folder=folder, home=tmp_path / "home", computed=computed)


def test_demo_model_prepares_the_statistics_the_app_finds(tiny_demo, tmp_path, capsys):
    assert main(["demo-model"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_demo.folder)
    # One pass over the model-sampled corpus for the default method's MLP inputs (patch, kind M) at the
    # default layer (round(0.16 * 3) = 0 of 4 layers), one for ROME's layer and MEMIT's span (four layers
    # ending one above it, cut at 0: layers 0 and 1), which the default falls back to.
    assert tiny_demo.computed == [[0], [0, 1]]
    files = sorted(p.name for p in (tiny_demo.home / "stats").glob("*.safetensors"))
    assert len(files) == 3 and all("-sampled-seed0-10000" in f for f in files)
    assert sum(f.endswith("-M.safetensors") for f in files) == 1

    wb = Workbench(AppConfig(workspace_root=tmp_path / "ws"))  # stats_root None: the library's default cache
    r = req("first-visitor")
    wb.edit("demo", *FACT, None, r, None)
    assert wb.stats.last_missing == []  # the app's first edit found them: no sampling
    assert tiny_demo.computed == [[0], [0, 1]]
    assert len(wb.edit_session(wb.workspace(r), "demo").history) == 1

    # Run again, demo-model finds them too (nothing recomputed).
    assert main(["demo-model"]) == 0
    assert tiny_demo.computed == [[0], [0, 1]]


def test_demo_model_no_stats_leaves_the_first_edit_to_compute(tiny_demo, tmp_path, capsys):
    assert main(["demo-model", "--no-stats"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_demo.folder)
    assert tiny_demo.computed == [] and not (tiny_demo.home / "stats").exists()
    wb = Workbench(AppConfig(workspace_root=tmp_path / "ws"))
    wb.edit("demo", *FACT, None, req("v"), None)
    # The default's check (patch needs the MLP inputs' statistics) finds this random model unable to hold a
    # patch, so the edit falls back to MEMIT and computes its statistics too.
    assert tiny_demo.computed == [[0], [0, 1]] and wb.stats.last_missing == [0, 1]
    assert wb.edit_session(wb.workspace(req("v")), "demo").edits[0].method == "memit"


def test_app_edit_reuses_its_loaded_model_and_session(tiny_demo, tmp_path, monkeypatch):
    loads: list[str] = []
    real = LocalCheckpoint.load_model

    def counting(self, **kwargs):
        loads.append(self.name)
        return real(self, **kwargs)

    monkeypatch.setattr(LocalCheckpoint, "load_model", counting)
    wb = Workbench(AppConfig(workspace_root=tmp_path / "ws", edit_stats_tokens=500))
    a = req("a")
    wb.edit("demo", *FACT, None, a, None)
    session = wb.edit_session(wb.workspace(a), "demo")
    prefixes = session.prefixes()
    wb.edit("demo", "{} plays the sport of", "LeBron James", "football", "basketball", None, a, None)
    wb.trace("demo", "The Eiffel Tower is located in the city of", "The Eiffel Tower", "mlp", 1, a, None)
    assert len(loads) == 1
    assert wb.edit_session(wb.workspace(a), "demo") is session and session.prefixes() is prefixes
    assert len(session.history) == 2
    # Statistics once (the default's check, then MEMIT's, which it falls back to), reused by the second edit.
    assert tiny_demo.computed == [[0], [0, 1]]
    # Non-vacuous: another browser session loads its own copy.
    wb.edit("demo", *FACT, None, req("b"), None)
    assert len(loads) == 2


def test_the_app_freezes_its_startup_heap(tmp_path):
    """Collections in the server (each job's release_memory, the automatic ones during an edit) walk only
    what requests allocate, not the ~0.4 M objects of the imported libraries."""
    import gc

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    Workbench(AppConfig(workspace_root=tmp_path / "ws"))
    assert gc.get_freeze_count() > 100_000
