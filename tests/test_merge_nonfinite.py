"""Non-finite inputs and outputs of a merge (issue 11): one error naming the model and tensor,
an explicit escape hatch, and the check reported in the summary."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from checkpoints.errors import WeightsmithError
from merging.engine import run_merge
from checkpoints.finite import all_finite
from merging.recipe import MergeRecipe

VICTIM = "model.layers.1.mlp.up_proj.weight"


def _poisoned(src: Path, dst: Path, value: float, name: str = VICTIM) -> Path:
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    state[name].view(-1)[17] = value
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _recipe(base: Path, models: list[Path], weight: float = 1.0, extra: dict | None = None) -> MergeRecipe:
    return MergeRecipe.from_yaml(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": weight}} for m in models], **(extra or {})}))


def _nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists() and not list(tmp_path.glob(f".{out.name}.partial-*"))


def test_all_finite_is_exact():
    assert all_finite(torch.randn(100)) and all_finite(torch.zeros(0)) and all_finite(torch.arange(5))
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(1000)
        t[617] = bad
        assert not all_finite(t) and not all_finite(t.to(torch.bfloat16)) and not all_finite(t.double())
    # finite values whose sum overflows are still finite (the sum is only a fast path)
    assert all_finite(torch.full((4,), 3e38)) and all_finite(torch.full((4,), 6e4, dtype=torch.float16))
    assert all_finite(torch.full((4,), 1e308, dtype=torch.float64))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_input_names_model_and_tensor(tmp_path, tiny_llama_family, value):
    """Before: the merge succeeded and its output was full of NaN/Inf."""
    f = tiny_llama_family
    bad = _poisoned(f["ft1"], tmp_path / "nan-ft", value)
    out = tmp_path / "out"
    with pytest.raises(WeightsmithError) as e:
        run_merge(_recipe(f["base"], [bad, f["ft2"]]), out)
    assert str(e.value) == (f"model nan-ft: tensor {VICTIM} holds NaN or Inf values; "
                            "pass --allow-nonfinite (allow_nonfinite=True) to merge anyway")
    _nothing_written(tmp_path, out)


def test_nonfinite_base_is_caught_too(tmp_path, tiny_llama_family):
    f = tiny_llama_family
    bad = _poisoned(f["base"], tmp_path / "bad-base", float("-inf"), "model.norm.weight")
    with pytest.raises(WeightsmithError, match="model bad-base: tensor model.norm.weight holds NaN or Inf"):
        run_merge(_recipe(bad, [f["ft1"]]), tmp_path / "out")
    _nothing_written(tmp_path, tmp_path / "out")


def test_allow_nonfinite_merges_and_reports(tmp_path, tiny_llama_family):
    f = tiny_llama_family
    bad = _poisoned(f["ft1"], tmp_path / "nan-ft", float("nan"))
    res = run_merge(_recipe(f["base"], [bad, f["ft2"]]), tmp_path / "out", allow_nonfinite=True)
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert math.isnan(merged[VICTIM].view(-1)[17]) and torch.isfinite(merged[VICTIM].view(-1)[18:]).all()
    assert res.finite_check == (f"1 of {res.tensors_total} output tensors hold NaN/Inf (1 input tensors did); "
                                "allowed by allow_nonfinite")


def test_clean_merge_reports_all_finite(tmp_path, tiny_llama_family):
    f = tiny_llama_family
    res = run_merge(_recipe(f["base"], [f["ft1"], f["ft2"]]), tmp_path / "out")
    assert res.finite_check == f"all {res.tensors_total} output tensors finite (inputs checked too)"
    assert res.tensors_total > 10


def test_overflowing_weight_is_an_error_not_inf(tmp_path, tiny_llama_family):
    """Before: a huge weight (3e38, finite in float32) times a finite delta of ~50 wrote Inf and reported success."""
    f = tiny_llama_family
    big = _poisoned(f["ft1"], tmp_path / "big-ft", 50.0)  # finite input: the input check lets it through
    out = tmp_path / "out"
    with pytest.raises(WeightsmithError) as e:
        run_merge(_recipe(f["base"], [big], weight=3e38), out)
    assert str(e.value) == (f"merged tensor {VICTIM} is not finite in float32 (NaN or Inf: check the recipe's "
                            "weights and the output dtype); nothing was written")
    _nothing_written(tmp_path, out)
    # non-vacuity: a large but representable weight merges
    assert run_merge(_recipe(f["base"], [f["ft1"]], weight=1e3), tmp_path / "ok").tensors_changed > 0


def test_overflow_when_cast_to_the_output_dtype(tmp_path, tiny_llama_family):
    """Finite in float32, Inf in float16: the check runs on what is written."""
    f = tiny_llama_family
    recipe = _recipe(f["base"], [f["ft1"]], weight=1e7, extra={"out_dtype": "float16"})
    with pytest.raises(WeightsmithError, match="is not finite in float16"):
        run_merge(recipe, tmp_path / "out")
    _nothing_written(tmp_path, tmp_path / "out")


def test_cli_flag_and_summary(tmp_path, tiny_llama_family, capsys):
    from cli import main

    f = tiny_llama_family
    bad = _poisoned(f["ft1"], tmp_path / "nan-ft", float("nan"))
    recipe = tmp_path / "r.yml"
    recipe.write_text(_recipe(f["base"], [bad]).to_yaml())
    assert main(["merge", str(recipe), str(tmp_path / "o1")]) == 2
    assert f"tensor {VICTIM} holds NaN or Inf" in capsys.readouterr().err
    assert main(["merge", str(recipe), str(tmp_path / "o2"), "--allow-nonfinite"]) == 0
    assert "output tensors hold NaN/Inf" in capsys.readouterr().out
    recipe.write_text(_recipe(f["base"], [f["ft1"]]).to_yaml())
    assert main(["merge", str(recipe), str(tmp_path / "o3")]) == 0
    assert "output tensors finite (inputs checked too)" in capsys.readouterr().out
