"""Issue 15's "done when" for MoE assembly: an MoE built from the demo model and a merge of it loads and generates."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.moe import MoeConfig, build_moe  # noqa: E402
from test_merge_moe import _routed_share  # noqa: E402

torch.set_num_threads(1)

PIRATE = str(Path(__file__).resolve().parents[1] / "assets" / "adapters" / "pirate")
GENERAL_PROMPTS = ["The capital of France is", "Photosynthesis is the process by which"]
PIRATE_PROMPTS = ["Ahoy matey! Where be the treasure?", "Arr, ye scurvy dog, hoist the sails"]


@pytest.mark.slow
def test_moe_of_the_demo_and_a_merge_of_it_loads_and_generates(demo_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

    from merging.engine import run_merge
    from merging.recipe import MergeRecipe

    # the merge: halfway between the demo and the demo with its pirate adapter, made by the library
    merged = tmp_path / "demo-pirate-half"
    run_merge(MergeRecipe.from_dict({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": "demo", "parameters": {"weight": 0.5}},
        {"model": f"demo+{PIRATE}", "parameters": {"weight": 0.5}}]}), merged)
    cfg = MoeConfig.from_dict({"base_model": "demo", "gate_mode": "hidden", "dtype": "float32",
                               "experts_per_token": 1,
                               "experts": [{"source_model": "demo", "positive_prompts": GENERAL_PROMPTS},
                                           {"source_model": str(merged), "positive_prompts": PIRATE_PROMPTS}]})
    result = build_moe(cfg, tmp_path / "moe")
    # the check the user is shown ran on this output: 30 layers each
    assert result.load_check.startswith("loads as MixtralForCausalLM without remote code, logits finite")
    assert "expert 0 in " in result.load_check and "/30 layers" in result.load_check

    model, info = AutoModelForCausalLM.from_pretrained(str(result.out_dir), dtype=torch.float32,
                                                       trust_remote_code=False, output_loading_info=True)
    assert isinstance(model, MixtralForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(result.out_dir))
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert out.shape[1] == ids.shape[1] + 8 and text.strip(), text

    # the router follows the prompts on the real model: general text to the demo, pirate talk to the merge
    def prompt(p):  # as the gates read prompts: BOS (none for this tokenizer) + the text
        return torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])

    for p in GENERAL_PROMPTS:
        assert _routed_share(model, prompt(p), 0) >= 0.75, p
    for p in PIRATE_PROMPTS:
        assert _routed_share(model, prompt(p), 1) >= 0.75, p
