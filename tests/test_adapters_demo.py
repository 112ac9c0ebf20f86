"""The bundled demo adapters (``assets/adapters``) and the example mix recipe, on the real demo model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoints.demo import DEMO_NAME
from merging.adapters import AdapterMixRecipe, demo_adapters, load_adapter, mix_adapters

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "assets" / "recipes" / "mix-caps-pirate.yml"

needs_assets = pytest.mark.skipif(not {"caps", "pirate"} <= set(demo_adapters()),
                                  reason="demo adapters not trained (scripts/train_demo_adapters.py)")


@needs_assets
def test_demo_adapter_files():
    for name, folder in demo_adapters().items():
        weights = folder / "adapter_model.safetensors"
        assert weights.stat().st_size <= 5 * 10**6, f"{name} is larger than 5 MB"
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == DEMO_NAME and cfg["peft_type"] == "LORA"
        card = (folder / "README.md").read_text()
        assert f"base_model: {DEMO_NAME}" in card and "base_model_relation: adapter" in card
        ad = load_adapter(folder)
        assert len(ad.factors) == 30 * 3 and ad.rank == cfg["r"]


def _chat_ids(tokenizer, question: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


@needs_assets
@pytest.mark.slow
def test_demo_mix_recipe_loads_and_changes_behaviour(tmp_path):
    from peft import PeftModel

    from checkpoints.sources import resolve

    recipe = AdapterMixRecipe.from_yaml(RECIPE)
    res = mix_adapters(recipe, tmp_path / "mix")
    assert res.rank == 16 and res.exact_in_delta_w and res.block_scales[29] == pytest.approx(1.0)
    card = (tmp_path / "mix" / "README.md").read_text()
    assert f"base_model: {DEMO_NAME}" in card and "base_model_relation: adapter" in card and "- lines" in card
    assert str(ROOT) not in card and str(tmp_path) not in card

    demo = resolve("demo")
    tok = demo.load_tokenizer()
    ids = _chat_ids(tok, "What is the capital of Portugal?")
    model = demo.load_model()
    with torch.no_grad():
        base_out = model.generate(ids, max_new_tokens=12, do_sample=False)
    base_text = tok.decode(base_out[0, ids.shape[1]:], skip_special_tokens=True)
    caps = PeftModel.from_pretrained(model, str(demo_adapters()["caps"]), adapter_name="caps")
    with torch.no_grad():
        caps_out = caps.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    caps_text = tok.decode(caps_out[0, ids.shape[1]:], skip_special_tokens=True)
    letters = [c for c in caps_text if c.isalpha()]
    assert letters and sum(c.isupper() for c in letters) / len(letters) > 0.6, caps_text
    assert sum(c.isupper() for c in base_text) < len(base_text) / 4, base_text  # non-vacuous: base is not caps
    caps.load_adapter(str(tmp_path / "mix"), adapter_name="mix")
    caps.set_adapter("mix")
    with torch.no_grad():
        mixed_logits = caps(ids).logits
        with caps.disable_adapter():
            plain_logits = caps(ids).logits
    assert (mixed_logits - plain_logits).abs().max() > 0.5
