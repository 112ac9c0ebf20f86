"""The architecture map: declared block membership and weight layout."""

from __future__ import annotations

import logging

import pytest
import torch

from checkpoints.arch import ARCHITECTURES, Location, spec_for
from checkpoints.errors import WeightsmithError


@pytest.mark.parametrize(
    "model_type,name,expected",
    [
        ("llama", "model.layers.7.mlp.down_proj.weight", Location("block", 7)),
        ("llama", "model.embed_tokens.weight", Location("embedding")),
        ("llama", "model.norm.weight", Location("final_norm")),
        ("llama", "lm_head.weight", Location("head")),
        ("qwen2", "model.layers.0.self_attn.q_proj.bias", Location("block", 0)),
        ("mistral", "model.layers.31.input_layernorm.weight", Location("block", 31)),
        ("phi3", "model.layers.2.mlp.gate_up_proj.weight", Location("block", 2)),
        ("gpt2", "transformer.h.11.mlp.c_proj.weight", Location("block", 11)),
        ("gpt2", "h.11.mlp.c_proj.weight", Location("block", 11)),  # Hub gpt2 omits "transformer."
        ("gpt2", "transformer.wte.weight", Location("embedding")),
        ("gpt2", "wpe.weight", Location("embedding")),
        ("gpt2", "transformer.ln_f.bias", Location("final_norm")),
        ("gpt_neox", "gpt_neox.layers.5.mlp.dense_4h_to_h.weight", Location("block", 5)),
        ("gpt_neox", "gpt_neox.embed_in.weight", Location("embedding")),
        ("gpt_neox", "embed_out.weight", Location("head")),
    ],
)
def test_locate(model_type, name, expected):
    assert spec_for(model_type).locate(name) == expected


def test_every_parameter_of_tiny_models_is_placed(tiny_llama_dir, tiny_gpt2_dir):
    from checkpoints.sources import resolve

    for folder in (tiny_llama_dir, tiny_gpt2_dir):
        ckpt = resolve(folder)
        blocks = {ckpt.spec.block_of(n) for n in ckpt.reader().keys()} - {None}
        assert blocks == set(range(ckpt.num_layers))
        others = [n for n in ckpt.reader().keys() if ckpt.spec.locate(n).kind == "other"]
        assert others == []


def test_module_names_exist_in_loaded_models(tiny_llama_dir, tiny_gpt2_dir):
    from checkpoints.sources import resolve

    for folder in (tiny_llama_dir, tiny_gpt2_dir):
        ckpt = resolve(folder)
        modules = dict(ckpt.load_model().named_modules())
        for i in range(ckpt.num_layers):
            for role in ("mlp_out", "mlp", "attention"):
                assert ckpt.spec.module(role, i) in modules
            for name in ckpt.spec.mlp_in_modules(i):
                assert name in modules


def test_gpt2_layout_is_declared_transposed(tiny_gpt2_dir):
    """Conv1D stores [in, out]; the map says so, and as_out_in gives the Linear view."""
    from checkpoints.sources import resolve

    spec = spec_for("gpt2")
    assert spec.transposed and not spec_for("llama").transposed
    model = resolve(tiny_gpt2_dir).load_model()
    c_fc = model.transformer.h[0].mlp.c_fc  # in=32 -> out=128
    w = spec.as_out_in(c_fc.weight)
    assert w.shape == (128, 32)
    x = torch.randn(3, 32)
    torch.testing.assert_close(c_fc(x), x @ w.T + c_fc.bias)
    assert torch.equal(spec.from_out_in(w), c_fc.weight)


def test_unknown_architecture_warns_and_uses_generic_rule(caplog):
    with caplog.at_level(logging.WARNING):
        spec = spec_for("brand_new_arch")
    assert "brand_new_arch" in caplog.text and "generic" in caplog.text
    assert spec.locate("model.layers.3.ffn.w2.weight") == Location("block", 3)
    assert spec.locate("transformer.h.4.attn.weight") == Location("block", 4)
    assert spec.locate("model.embed_tokens.weight") == Location("embedding")
    assert spec.locate("lm_head.weight") == Location("head")


def test_strict_lookup_rejects_unknown():
    with pytest.raises(WeightsmithError, match="unsupported architecture 'mamba'"):
        spec_for("mamba", strict=True)


def test_required_architectures_are_declared():
    assert {"llama", "mistral", "qwen2", "gpt2", "gpt_neox", "phi3"} <= set(ARCHITECTURES)
