"""An MoE expert given as ``model+adapter`` (mergekit-moe's model references): the model with the LoRA folded in."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.moe import MoeConfig, build_moe  # noqa: E402
from test_merge_lora_inputs import llama_lora, peft_merged  # noqa: E402,F401 - the fixture
from test_merge_moe import PROMPTS_A, PROMPTS_B  # noqa: E402

torch.set_num_threads(1)


def test_an_expert_with_a_lora_is_the_peft_merge(tiny_llama_family, llama_lora, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    fam = tiny_llama_family
    cfg = MoeConfig.from_dict({"base_model": str(fam["base"]), "gate_mode": "cheap_embed", "experts": [
        {"source_model": str(fam["base"]), "positive_prompts": PROMPTS_A},
        {"source_model": f"{fam['base']}+{llama_lora}", "positive_prompts": PROMPTS_B}]})
    out = build_moe(cfg, tmp_path / "moe").out_dir
    got = load_file(out / "model.safetensors")
    want = peft_merged(fam["base"], llama_lora)
    base = load_file(fam["base"] / "model.safetensors")
    for layer in range(4):
        down = got[f"model.layers.{layer}.mlp.experts.down_proj"]
        torch.testing.assert_close(down[1], want[f"model.layers.{layer}.mlp.down_proj.weight"], rtol=1e-6, atol=1e-6)
        assert torch.equal(down[0], base[f"model.layers.{layer}.mlp.down_proj.weight"])
        assert not torch.allclose(down[0], down[1], atol=1e-4)  # the adapter changed expert 1's down_proj
    # the adapter's attention changes are not the MoE's: attention comes from the base model
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert "+" in (out / "weightsmith_moe.yml").read_text()  # recorded as model+adapter, by public names
