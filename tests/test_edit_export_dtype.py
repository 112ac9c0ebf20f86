"""An edited model is saved in its checkpoint's own dtype, after a check that the edits survive the rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from checkpoints.errors import WeightsmithError
from checkpoints.sources import resolve
from editing.checks import target_check
from editing.prepare import open_session
from editing.request import EditRequest
from editing.stats import StatsCache
from test_edit import EIFFEL, FAST, _sharp, corpus_file  # noqa: F401  (corpus_file: a module fixture)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def stats(tmp_path_factory) -> StatsCache:
    return StatsCache(tmp_path_factory.mktemp("stats"))


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> Path:
    """The sharpened tiny llama stored in bfloat16, as most Hub checkpoints are."""
    from conftest import build_tiny_llama, save_model

    return save_model(_sharp(build_tiny_llama(0)).to(torch.bfloat16), tmp_path_factory.mktemp("bf16-llama"))


def stored(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def edited_session(folder: Path, corpus: Path, stats: StatsCache):
    s = open_session(resolve(str(folder)), stats=stats, corpus=corpus, method="r-rome")
    s.hparams = FAST
    s.apply(EditRequest(EIFFEL.prompt, EIFFEL.subject, "Rome", layer=1))
    return s


def test_stored_dtype_is_the_checkpoints_own(bf16_dir, tmp_path):
    from conftest import build_tiny_llama, save_model

    assert resolve(str(bf16_dir)).stored_dtype == torch.bfloat16
    f32 = save_model(build_tiny_llama(0), tmp_path / "f32")
    assert resolve(str(f32)).stored_dtype == torch.float32


def test_export_keeps_bfloat16_and_checks_the_edit(bf16_dir, corpus_file, stats, tmp_path):
    s = edited_session(bf16_dir, corpus_file, stats)
    assert s.store_dtype == torch.bfloat16 and next(s.model.parameters()).dtype == torch.float32
    edited = "model.layers.1.mlp.down_proj.weight"
    source, weight = stored(bf16_dir), s.model.get_parameter(edited).detach().clone()
    assert not torch.equal(weight, weight.bfloat16().float())  # the edit has bits bfloat16 cannot hold
    seen: list[tuple[float, str]] = []
    out = s.export_model(tmp_path / "edited", progress=lambda f, text: seen.append((f, text)))
    # Progress from the first fact: as computed (0), then rounded (0.5), in order.
    assert [f for f, _ in seen] == [0.0, 0.5] and "checking the edits in bfloat16: fact 1 of 1" in seen[0][1]
    saved = stored(out)
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.equal(saved[edited], weight.bfloat16())
    unedited = [k for k in saved if k != edited]
    assert unedited and all(torch.equal(saved[k], source[k]) for k in unedited)
    assert torch.equal(s.model.get_parameter(edited), weight)  # the check put the computed weights back
    report = s.precision_report
    takes = target_check(s.model, s.tokenizer, EIFFEL.text, "Rome")["generates_target"]
    assert takes  # non-vacuous: there is a fact to check
    assert report is not None and report.dtype == "bfloat16" and report.checked == 1
    assert report.held == report.checked and report.neutral_kl >= 0
    assert "Checked after rounding the edited weights for storage: stored in bfloat16" in (out / "README.md").read_text()


def test_a_fact_lost_to_rounding_refuses_the_export(bf16_dir, corpus_file, stats, tmp_path, monkeypatch):
    s = edited_session(bf16_dir, corpus_file, stats)
    edited = s.model.get_parameter("model.layers.1.mlp.down_proj.weight")
    before = edited.detach().clone()

    def fragile(model, tokenizer, text, target, **kw):
        # A fact held only by the bits bfloat16 drops: it takes at float32 and is lost when rounded.
        kept = not torch.equal(edited, edited.bfloat16().float())
        return {"generates_target": kept, "target_prob": 0.9 if kept else 0.1, "continuation": " Paris"}

    monkeypatch.setattr("editing.stored_precision.target_check", fragile)
    with pytest.raises(WeightsmithError, match=r"stored in bfloat16: 0 of 1 checked facts.*lost: 1.*float32 instead"):
        s.export_model(tmp_path / "edited")
    assert not (tmp_path / "edited").exists()
    assert torch.equal(edited, before)
    out = s.export_model(tmp_path / "f32", dtype=torch.float32)  # the way out the error names
    assert {t.dtype for t in stored(out).values()} == {torch.float32} and s.precision_report is None
    # The app's Save (no dtype choice) widens instead, and says so.
    out = s.export_model(tmp_path / "widened", widen=True)
    report = s.precision_report
    assert {t.dtype for t in stored(out).values()} == {torch.float32}
    assert report is not None and len(report.lost) == 1 and report.saved_in == "float32"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert "so the model was saved in float32" in (out / "README.md").read_text()


def test_cli_out_dtype(bf16_dir, corpus_file, tmp_path, monkeypatch, capsys):
    from cli import main

    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    args = ["edit", str(bf16_dir), "--prompt", EIFFEL.prompt, "--subject", EIFFEL.subject, "--target", "Rome",
            "--layer", "1", "--method", "r-rome", "--stats-corpus", str(corpus_file)]
    assert main([*args, "--out", str(tmp_path / "kept")]) == 0, capsys.readouterr().err
    assert "checked: stored in bfloat16:" in capsys.readouterr().out
    assert {t.dtype for t in stored(tmp_path / "kept").values()} == {torch.bfloat16}
    assert main([*args, "--out", str(tmp_path / "wide"), "--out-dtype", "float32"]) == 0
    assert "checked:" not in capsys.readouterr().out
    assert {t.dtype for t in stored(tmp_path / "wide").values()} == {torch.float32}
    code = main([*args, "--out", str(tmp_path / "a"), "--as-adapter", "--out-dtype", "float16"])
    assert code == 2 and "--out-dtype is for a saved model" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_app_save_keeps_bfloat16_and_shows_the_check(bf16_dir, tmp_path):
    from types import SimpleNamespace

    from ui.config import AppConfig
    from ui.workbench import Workbench

    wb = Workbench(AppConfig(workspace_root=tmp_path / "ws", named_models={"tiny-bf16": str(bf16_dir)},
                             edit_stats_tokens=1000, stats_root=tmp_path / "stats"))
    r = SimpleNamespace(session_hash="s")
    wb.edit("tiny-bf16", EIFFEL.prompt, EIFFEL.subject, "Rome", "Paris", None, r, None)
    msg = wb.save_edits("tiny-bf16", "model", "ed", r)
    assert "ws:ed" in msg and "Checked: stored in bfloat16:" in msg
    assert {t.dtype for t in stored(wb.workspace(r).item_path("ws:ed")).values()} == {torch.bfloat16}
