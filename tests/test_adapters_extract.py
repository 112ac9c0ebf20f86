"""extract-lora: truncated SVD of fine-tune deltas, loaded back through PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoints.errors import WeightsmithError
from merging.lora_extract import choose_rank, extract_lora
from tests.conftest import build_tiny_llama, save_model

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 40, 3]])


@pytest.fixture(scope="module")
def llama_projection_ft(tmp_path_factory, tiny_llama_dir) -> Path:
    """A 'fine-tune' of the tiny llama that changes only block projection weights (what a LoRA can hold)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and name.endswith("proj.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return save_model(model, tmp_path_factory.mktemp("llama-proj-ft"))


def load(base_dir: Path, adapter: Path | None = None, merge: bool = False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
        if merge:
            model = model.merge_and_unload()
    return model


def test_full_rank_reproduces_the_finetune(tmp_path, tiny_llama_dir, llama_projection_ft):
    res = extract_lora(llama_projection_ft, tiny_llama_dir, tmp_path / "full", rank=64)
    assert len(res.layers) == 4 * 7 and not res.not_captured
    assert res.max_relative_error < 1e-5
    assert all(e.rank == e.full_rank and e.energy == pytest.approx(1.0) for e in res.layers)
    ft, base = load(llama_projection_ft), load(tiny_llama_dir)
    with torch.no_grad():
        ft_logits, base_logits = ft(IDS).logits, base(IDS).logits
        assert (ft_logits - base_logits).abs().max() > 1e-3  # non-vacuous: the fine-tune differs
        got = load(tiny_llama_dir, tmp_path / "full")(IDS).logits
    torch.testing.assert_close(got, ft_logits, rtol=1e-4, atol=1e-4)
    merged = load(tiny_llama_dir, tmp_path / "full", merge=True).state_dict()
    for k, v in ft.state_dict().items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-5)
    cfg = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert cfg["r"] == 32 and cfg["base_model_name_or_path"] == tiny_llama_dir.name
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"])
    assert cfg["rank_pattern"]  # k/v projections (16 x 32) have rank 16 < 32


def test_gpt2_conv1d_full_rank_and_not_captured(tmp_path, tiny_gpt2_family):
    base_dir, ft_dir = tiny_gpt2_family["base"], tiny_gpt2_family["ft1"]
    res = extract_lora(ft_dir, base_dir, tmp_path / "g", rank=1000)
    assert res.max_relative_error < 1e-5
    # the family's fine-tunes also move norms, biases and embeddings, which a LoRA cannot carry
    assert any("ln_" in n for n in res.not_captured) and any("wte" in n for n in res.not_captured)
    merged = load(base_dir, tmp_path / "g", merge=True).state_dict()
    ft = load(ft_dir).state_dict()
    base = load(base_dir).state_dict()
    checked = 0
    for k, v in ft.items():
        if ".h." in k and k.endswith(".weight") and v.ndim == 2:
            torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-5)  # Conv1D [in, out] layout round-trips
            assert not torch.equal(v, base[k])
            checked += 1
    assert checked == 4 * 4


def test_low_rank_and_energy(tmp_path, tiny_llama_dir, llama_projection_ft):
    res = extract_lora(llama_projection_ft, tiny_llama_dir, tmp_path / "r2", rank=2)
    assert res.rank == 2 and all(e.rank == 2 for e in res.layers)
    assert all(0.0 < e.relative_error < 1.0 for e in res.layers)
    # ‖Δ − Δ₂‖/‖Δ‖ = sqrt(1 − kept energy) (Eckart–Young)
    for e in res.layers:
        assert e.relative_error == pytest.approx((1 - e.energy) ** 0.5, rel=1e-3)
    res = extract_lora(llama_projection_ft, tiny_llama_dir, tmp_path / "e", energy=0.6)
    for e in res.layers:
        assert e.energy >= 0.6 - 1e-9 and e.rank < e.full_rank
    card = (tmp_path / "e" / "README.md").read_text()
    assert "max relative error" in card and "extracted" in card and str(tmp_path) not in card


def test_choose_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert choose_rank(s, 2, None) == 2 and choose_rank(s, 10, None) == 4
    assert choose_rank(s, None, 9 / 14) == 1 and choose_rank(s, None, 0.65) == 2 and choose_rank(s, None, 1.0) == 3
    assert choose_rank(s, 1, 1.0) == 1


def test_extract_bad_inputs(tmp_path, tiny_llama_dir, tiny_gpt2_dir, llama_projection_ft):
    with pytest.raises(WeightsmithError, match="needs --rank or --energy"):
        extract_lora(llama_projection_ft, tiny_llama_dir, tmp_path / "x")
    with pytest.raises(WeightsmithError, match="energy must be in"):
        extract_lora(llama_projection_ft, tiny_llama_dir, tmp_path / "x", energy=1.5)
    with pytest.raises(WeightsmithError, match="nothing to extract"):
        extract_lora(tiny_llama_dir, tiny_llama_dir, tmp_path / "x", rank=4)
    with pytest.raises(WeightsmithError, match="is a gpt2 model but the base"):
        extract_lora(tiny_gpt2_dir, tiny_llama_dir, tmp_path / "x", rank=4)
    wide = build_tiny_llama(0, layers=2)
    wide_dir = save_model(wide, tmp_path / "two-layers")
    with pytest.raises(WeightsmithError, match="lacks"):
        extract_lora(wide_dir, tiny_llama_dir, tmp_path / "x", rank=4)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_cli_extract_lora(tmp_path, tiny_llama_dir, llama_projection_ft, capsys):
    from cli import main

    assert main(["extract-lora", str(llama_projection_ft), str(tiny_llama_dir), str(tmp_path / "x"), "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.3.mlp.down_proj" in out and "max rank 4" in out
    assert (tmp_path / "x" / "adapter_model.safetensors").exists()
    assert main(["extract-lora", str(llama_projection_ft), str(tiny_llama_dir), str(tmp_path / "y")]) == 2
    assert "needs --rank or --energy" in capsys.readouterr().err
