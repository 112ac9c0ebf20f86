"""Adapter mixing: algebraic identities on tiny random models and random LoRA adapters.

Every identity is paired with a non-vacuity check (the adapter changes the
logits, the mix differs from its inputs), following PEFT's own tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoints.errors import WeightsmithError
from hub_fixtures import fake_hub, hub_env, no_internet  # noqa: F401
from merging.adapters import (
    ADAPTER_METHODS,
    AdapterEntry,
    AdapterMixRecipe,
    LinesConfig,
    lines_lambda,
    load_adapter,
    mix_adapters,
)

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj"]  # attn.c_proj and mlp.c_proj, both Conv1D


def make_adapter(base_dir: Path, out: Path, *, r: int, seed: int, targets, alpha: int | None = None,
                 use_rslora: bool = False) -> Path:
    """Random LoRA (init_lora_weights=False: A and B both random, so ΔW != 0), saved by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=list(targets), init_lora_weights=False,
                     use_rslora=use_rslora, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # keep ΔW small next to the base weights, like a real adapter
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.mul_(0.3)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama-adapters")
    return {
        "a": make_adapter(tiny_llama_dir, root / "a", r=4, seed=1, targets=LLAMA_TARGETS),
        "b": make_adapter(tiny_llama_dir, root / "b", r=4, seed=2, targets=["q_proj", "o_proj", "up_proj"]),
        "c": make_adapter(tiny_llama_dir, root / "c", r=2, seed=3, targets=LLAMA_TARGETS, use_rslora=True),
    }


@pytest.fixture(scope="module")
def gpt2_adapters(tmp_path_factory, tiny_gpt2_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt2-adapters")
    return {
        "a": make_adapter(tiny_gpt2_dir, root / "a", r=4, seed=4, targets=GPT2_TARGETS),
        "b": make_adapter(tiny_gpt2_dir, root / "b", r=3, seed=5, targets=["c_attn", "c_fc"]),
    }


def recipe(base, adapters, weights, method="cat", **kw) -> AdapterMixRecipe:
    return AdapterMixRecipe(str(base), [AdapterEntry(str(a), w) for a, w in zip(adapters, weights)], method, **kw)


def deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """module -> ΔW [out, in] of a saved adapter, through our loader's scaling (checked against PEFT below)."""
    ad = load_adapter(adapter_dir)
    return {m: ad.delta(m) for m in ad.factors}


def weighted_sum(parts: list[tuple[float, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for w, d in parts:
        for m, t in d.items():
            out[m] = out.get(m, torch.zeros_like(t)) + w * t
    return out


def peft_logits(base_dir: Path, adapter_dir: Path | None, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits


def logits_with_delta(base_dir: Path, delta: dict[str, torch.Tensor], ids: torch.Tensor, *, transposed: bool):
    """Base logits after adding ΔW [out, in] to each module's weight by hand."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for module, d in delta.items():
            w = model.get_submodule(module).weight
            w.add_(d.T if transposed else d)
        return model(ids).logits


IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 40, 3]])


# ---------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------


def test_loader_scaling_matches_peft(tiny_llama_dir, llama_adapters):
    """Our ΔW (incl. rsLoRA scaling) equals PEFT's get_delta_weight: the reference for every test below."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for key in ("a", "c"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), str(llama_adapters[key]))
        ours = deltas(llama_adapters[key])
        for module, d in ours.items():
            ref = model.base_model.model.get_submodule(module).get_delta_weight("default")
            torch.testing.assert_close(d, ref, rtol=0, atol=1e-6)


def test_cat_is_exact_weighted_sum(tmp_path, tiny_llama_dir, llama_adapters):
    a, b, c = llama_adapters["a"], llama_adapters["b"], llama_adapters["c"]
    res = mix_adapters(recipe(tiny_llama_dir, [a, b, c], [0.7, -0.4, 1.3]), tmp_path / "cat")
    assert res.rank == 4 + 4 + 2 and res.exact_in_delta_w
    got = deltas(tmp_path / "cat")
    want = weighted_sum([(0.7, deltas(a)), (-0.4, deltas(b)), (1.3, deltas(c))])
    assert set(got) == set(want)
    for m in want:
        torch.testing.assert_close(got[m], want[m], rtol=0, atol=2e-6)
        assert want[m].abs().max() > 1e-2  # non-vacuous: a real ΔW
    # modules that two adapters share differ from either input alone
    shared = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(got[shared], 0.7 * deltas(a)[shared], atol=1e-3)
    cfg = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert cfg["r"] == 10 and cfg["lora_alpha"] == 10 and cfg["use_rslora"] is False
    assert sorted(cfg["target_modules"]) == ["down_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_rslora_first_adapter_stays_exact(tmp_path, tiny_llama_dir, llama_adapters, method):
    """PEFT copies the first adapter's config (here rsLoRA) to the mix; the output must still be Σ wᵢ ΔWᵢ."""
    a, c = llama_adapters["a"], llama_adapters["c"]
    params = {"rank": 6} if method == "svd" else {}  # 6 = 2 + 4: the SVD keeps the whole sum
    mix_adapters(recipe(tiny_llama_dir, [c, a], [0.5, 1.5], method, parameters=params), tmp_path / "m")
    got, want = deltas(tmp_path / "m"), weighted_sum([(0.5, deltas(c)), (1.5, deltas(a))])
    for m in want:
        torch.testing.assert_close(got[m], want[m], rtol=0, atol=2e-5)


def test_svd_gives_requested_rank_and_best_approximation(tmp_path, tiny_llama_dir, llama_adapters):
    a, b = llama_adapters["a"], llama_adapters["b"]
    res = mix_adapters(recipe(tiny_llama_dir, [a, b], [1.0, 0.5], "svd", parameters={"rank": 3}), tmp_path / "svd")
    assert res.rank == 3
    got = deltas(tmp_path / "svd")
    exact = weighted_sum([(1.0, deltas(a)), (0.5, deltas(b))])
    ad = load_adapter(tmp_path / "svd")
    for m, d in exact.items():
        assert ad.factors[m][0].shape[0] == 3
        assert int(torch.linalg.matrix_rank(got[m], atol=1e-5)) <= 3
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        torch.testing.assert_close(got[m], best, rtol=0, atol=1e-5)
    q = "model.layers.1.self_attn.q_proj"
    assert int(torch.linalg.matrix_rank(exact[q], atol=1e-5)) == 8  # non-vacuous: truncation did something


def test_single_adapter_svd_truncates(tmp_path, tiny_llama_dir, llama_adapters):
    res = mix_adapters(recipe(tiny_llama_dir, [llama_adapters["a"]], [2.0], "svd", parameters={"rank": 2}),
                       tmp_path / "one")
    assert res.rank == 2 and not res.notes
    d = deltas(llama_adapters["a"])["model.layers.0.mlp.down_proj"] * 2.0
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    torch.testing.assert_close(deltas(tmp_path / "one")["model.layers.0.mlp.down_proj"],
                               u[:, :2] @ torch.diag(s[:2]) @ vh[:2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["cat", "linear", "svd", "ties_svd"])
def test_same_adapter_with_weights_one_minus_one_cancels(tmp_path, tiny_llama_dir, llama_adapters, method):
    a = llama_adapters["a"]
    params = {"density": 1.0} if method == "ties_svd" else {}
    mix_adapters(recipe(tiny_llama_dir, [a, a], [1.0, -1.0], method, parameters=params), tmp_path / "zero")
    got = deltas(tmp_path / "zero")
    assert got and max(float(d.abs().max()) for d in deltas(a).values()) > 1e-2  # non-vacuous input
    for d in got.values():
        assert float(d.abs().max()) < 1e-6


def test_linear_is_not_exact_but_cat_is(tmp_path, tiny_llama_dir, llama_adapters):
    """PEFT's linear mixes A and B separately: cross terms make it differ from Σ wᵢ ΔWᵢ (as documented)."""
    assert not ADAPTER_METHODS["linear"].exact_in_delta_w and ADAPTER_METHODS["cat"].exact_in_delta_w
    a, b = llama_adapters["a"], llama_adapters["b"]
    mix_adapters(recipe(tiny_llama_dir, [a, b], [0.5, 0.5], "linear"), tmp_path / "lin")
    q = "model.layers.0.self_attn.q_proj"
    exact = 0.5 * deltas(a)[q] + 0.5 * deltas(b)[q]
    assert not torch.allclose(deltas(tmp_path / "lin")[q], exact, atol=1e-3)


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.5}), ("dare_linear", {"density": 0.7, "seed": 3}),
                                           ("dare_ties", {"density": 0.7}), ("magnitude_prune", {"density": 0.5}),
                                           ("dare_linear_svd", {"density": 0.7, "rank": 2}),
                                           ("magnitude_prune_svd", {"rank": 2})])
def test_other_methods_run_and_load(tmp_path, tiny_llama_dir, llama_adapters, method, params):
    a, b = llama_adapters["a"], llama_adapters["b"]
    res = mix_adapters(recipe(tiny_llama_dir, [a, b], [0.6, 0.4], method, parameters=params), tmp_path / method)
    assert res.rank == (2 if method.endswith("svd") else 4)
    base = peft_logits(tiny_llama_dir, None, IDS)
    mixed = peft_logits(tiny_llama_dir, tmp_path / method, IDS)
    assert torch.isfinite(mixed).all() and not torch.allclose(base, mixed, atol=1e-4)


def test_dare_is_reproducible_by_seed(tmp_path, tiny_llama_dir, llama_adapters):
    a, b = llama_adapters["a"], llama_adapters["b"]
    for name, seed in (("s1", 1), ("s1bis", 1), ("s2", 2)):
        mix_adapters(recipe(tiny_llama_dir, [a, b], [0.5, 0.5], "dare_linear", parameters={"density": 0.5, "seed": seed}),
                     tmp_path / name)
    q = "model.layers.0.self_attn.q_proj"
    d1, d1b, d2 = (deltas(tmp_path / n)[q] for n in ("s1", "s1bis", "s2"))
    assert torch.equal(d1, d1b) and not torch.allclose(d1, d2)


# ---------------------------------------------------------------------------
# Outputs load in PEFT / transformers and match the hand-made ΔW sum
# ---------------------------------------------------------------------------


def test_llama_output_logits_equal_hand_sum(tmp_path, tiny_llama_dir, llama_adapters):
    a, b = llama_adapters["a"], llama_adapters["b"]
    mix_adapters(recipe(tiny_llama_dir, [a, b], [0.8, 0.6]), tmp_path / "mix")
    base = peft_logits(tiny_llama_dir, None, IDS)
    only_a = peft_logits(tiny_llama_dir, a, IDS)
    assert (only_a - base).abs().max() > 1e-3  # the adapters really change the model
    mixed = peft_logits(tiny_llama_dir, tmp_path / "mix", IDS)
    by_hand = logits_with_delta(tiny_llama_dir, weighted_sum([(0.8, deltas(a)), (0.6, deltas(b))]), IDS,
                                transposed=False)
    torch.testing.assert_close(mixed, by_hand, rtol=1e-4, atol=1e-4)
    assert (mixed - base).abs().max() > 1e-3


def test_gpt2_conv1d_output_logits_equal_hand_sum(tmp_path, tiny_gpt2_dir, gpt2_adapters):
    a, b = gpt2_adapters["a"], gpt2_adapters["b"]
    res = mix_adapters(recipe(tiny_gpt2_dir, [a, b], [1.0, -0.5]), tmp_path / "mix")
    assert res.rank == 7
    cfg = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    base = peft_logits(tiny_gpt2_dir, None, IDS)
    mixed = peft_logits(tiny_gpt2_dir, tmp_path / "mix", IDS)
    assert (mixed - base).abs().max() > 1e-3
    by_hand = logits_with_delta(tiny_gpt2_dir, weighted_sum([(1.0, deltas(a)), (-0.5, deltas(b))]), IDS,
                                transposed=True)  # Conv1D stores [in, out]
    torch.testing.assert_close(mixed, by_hand, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_into_base_equals_peft_merge_and_unload(tmp_path, request, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = request.getfixturevalue(f"tiny_{family}_dir")
    ads = request.getfixturevalue(f"{family}_adapters")
    r = recipe(base_dir, [ads["a"], ads["b"]], [0.9, 0.4], lines=LinesConfig(0.5, 0.5))
    res = mix_adapters(r, tmp_path / "adapter")
    assert res.block_scales == {0: 0.5, 1: 0.5 + 0.5 / 3, 2: 0.5 + 1.0 / 3, 3: 1.0}
    merged = mix_adapters(r, tmp_path / "full", merge_into_base=True)
    assert merged.kind == "model"
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(tmp_path / "adapter"))
    ref = ref.merge_and_unload().state_dict()
    ours = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full")).state_dict()
    base_sd = AutoModelForCausalLM.from_pretrained(str(base_dir)).state_dict()
    changed = 0
    for k, v in ref.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=1e-6)
        changed += not torch.equal(v, base_sd[k])
    assert changed >= 8  # non-vacuous: the merge changed the targeted weights
    card = (tmp_path / "full" / "README.md").read_text()
    # a local base is named in the body only (base_model takes Hub ids): see the demo test for the front matter
    assert "library_name: transformers" in card and "- merge" in card and "- lora" in card and "- lines" in card
    assert str(tmp_path) not in card and str(base_dir) not in card  # no local paths in cards


def test_lines_scales_each_block(tmp_path, tiny_llama_dir, llama_adapters):
    a = llama_adapters["a"]
    mix_adapters(recipe(tiny_llama_dir, [a, a], [1.0, 0.0]), tmp_path / "plain")
    mix_adapters(recipe(tiny_llama_dir, [a, a], [1.0, 0.0], lines=LinesConfig(1.0, 0.0)), tmp_path / "ident")
    mix_adapters(recipe(tiny_llama_dir, [a, a], [1.0, 0.0], lines=LinesConfig(0.2, 0.6)), tmp_path / "lines")
    plain, ident, scaled = (deltas(tmp_path / n) for n in ("plain", "ident", "lines"))
    for m, d in plain.items():
        torch.testing.assert_close(ident[m], d, rtol=0, atol=0)  # α=1, β=0 is the identity
        block = int(m.split(".")[2])
        torch.testing.assert_close(scaled[m], d * lines_lambda(block, 4, 0.2, 0.6), rtol=1e-6, atol=1e-7)
    assert lines_lambda(0, 4, 0.2, 0.6) == pytest.approx(0.2) and lines_lambda(3, 4, 0.2, 0.6) == pytest.approx(0.8)


def test_adapter_card_and_config(tmp_path, tiny_llama_dir, llama_adapters):
    mix_adapters(recipe(tiny_llama_dir, [llama_adapters["a"], llama_adapters["b"]], [0.5, 0.5]), tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert "library_name: peft" in card and tiny_llama_dir.name in card
    assert "- lora" in card and "- weightsmith" in card and "method: cat" in card
    assert str(tmp_path) not in card and str(tiny_llama_dir) not in card
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == tiny_llama_dir.name  # public name, not the path
    assert not list(tmp_path.glob(".*partial*"))


# ---------------------------------------------------------------------------
# Bad input: one clear line, nothing written
# ---------------------------------------------------------------------------


def test_mismatched_base_is_rejected(tmp_path, tiny_gpt2_dir, llama_adapters):
    with pytest.raises(WeightsmithError, match=r"adapter a was trained on .*not on the base"):
        mix_adapters(recipe(tiny_gpt2_dir, [llama_adapters["a"]], [1.0]), tmp_path / "x")
    r = recipe(tiny_gpt2_dir, [llama_adapters["a"]], [1.0], check_base_name=False)
    with pytest.raises(WeightsmithError, match=r"targets model\.layers\.0\..*which the base .* does not have"):
        mix_adapters(r, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_adapters_of_different_bases_rejected(tmp_path, tiny_llama_dir, llama_adapters, gpt2_adapters):
    with pytest.raises(WeightsmithError, match=r"adapter a was trained on"):
        mix_adapters(recipe(tiny_llama_dir, [llama_adapters["a"], gpt2_adapters["a"]], [1, 1]), tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_shape_mismatch_same_name_rejected(tmp_path, tiny_llama_dir):
    """An adapter that claims the right base but was made for another width fails the shape check."""
    from tests.conftest import save_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, num_hidden_layers=4)).eval()
    wide_dir = save_model(wide, tmp_path / "wide")
    ad = make_adapter(wide_dir, tmp_path / "wide-ad", r=2, seed=0, targets=["q_proj"])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_llama_dir)
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsmithError, match=r"does not fit base .*lora_A \[2, 48\].*\[out=32, in=32\]"):
        mix_adapters(recipe(tiny_llama_dir, [ad], [1.0]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_recipes(tmp_path, tiny_llama_dir, llama_adapters):
    a, c = llama_adapters["a"], llama_adapters["c"]
    with pytest.raises(WeightsmithError, match="unknown method 'slerp'"):
        AdapterMixRecipe.from_yaml(f"base_model: demo\nadapters: [{a}]\nmethod: slerp\n")
    with pytest.raises(WeightsmithError, match="method cat does not use density"):
        AdapterMixRecipe.from_yaml(f"base_model: demo\nadapters: [{a}]\nparameters: {{density: 0.5}}\n")
    with pytest.raises(WeightsmithError, match="density must be in"):
        AdapterMixRecipe.from_yaml(f"base_model: demo\nadapters: [{a}]\nmethod: ties\nparameters: {{density: 2}}\n")
    with pytest.raises(WeightsmithError, match="unknown key"):
        AdapterMixRecipe.from_yaml("base_model: demo\nadapters: [x]\nmethdo: cat\n")
    with pytest.raises(WeightsmithError, match="equal rank"):
        mix_adapters(recipe(tiny_llama_dir, [a, c], [1, 1], "linear"), tmp_path / "x")
    with pytest.raises(WeightsmithError, match="rank 40 is larger"):
        mix_adapters(recipe(tiny_llama_dir, [a, c], [1, 1], "svd", parameters={"rank": 40}), tmp_path / "x")
    with pytest.raises(WeightsmithError, match="not a PEFT adapter"):
        load_adapter(tiny_llama_dir)
    with pytest.raises(WeightsmithError, match="exactly one adapter_config.json"):
        load_adapter([a / "adapter_model.safetensors"])
    assert not (tmp_path / "x").exists()


def test_recipe_yaml_round_trip_and_relative_paths(tmp_path, tiny_llama_dir, llama_adapters):
    text = (f"base_model: {tiny_llama_dir}\nadapters:\n  - adapter: a\n    weight: 0.7\n  - adapter: b\n    weight: 0.3\n"
            "method: svd\nparameters: {rank: 2}\nlines: {alpha: 0.5, beta: 0.5}\nmerge_into_base: false\n")
    path = llama_adapters["a"].parent / "mix.yml"
    path.write_text(text)
    r = AdapterMixRecipe.from_yaml(path)
    assert r.lines == LinesConfig(0.5, 0.5) and r.parameters == {"rank": 2}
    assert AdapterMixRecipe.from_yaml(r.to_yaml()) == r
    res = mix_adapters(r, tmp_path / "rel")  # "a", "b" are found beside the recipe
    assert res.rank == 2 and res.adapters == ["a", "b"]


def test_uploaded_files_and_cancel(tmp_path, tiny_llama_dir, llama_adapters):
    a = llama_adapters["a"]
    files = [str(a / "adapter_config.json"), str(a / "adapter_model.safetensors")]
    r = AdapterMixRecipe(str(tiny_llama_dir), [AdapterEntry(files, 1.0)], "cat")
    res = mix_adapters(r, tmp_path / "up")
    torch.testing.assert_close(deltas(tmp_path / "up")["model.layers.2.self_attn.v_proj"],
                               deltas(a)["model.layers.2.self_attn.v_proj"], rtol=0, atol=1e-6)
    assert res.adapters == ["a"]
    with pytest.raises(WeightsmithError, match="cancelled"):
        mix_adapters(r, tmp_path / "c", cancel=lambda: True, merge_into_base=True)
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.*"))


def test_registry_is_plain_data():
    for name, m in ADAPTER_METHODS.items():
        assert m.name == name and m.label and m.rank and m.space in ("delta_w", "factors")
        assert m.exact_in_delta_w == (name in ("cat", "svd"))


def test_lines_auto_alpha_for_exact_sum_is_one_over_t(tmp_path, tiny_llama_dir, llama_adapters):
    """With cat and unit weights ΔW_mix = Σ ΔWᵢ, so LiNeS' auto α is 1/T, as for task arithmetic."""
    a, b = llama_adapters["a"], llama_adapters["b"]
    res = mix_adapters(recipe(tiny_llama_dir, [a, b], [1.0, 1.0], lines=LinesConfig("auto", 0.5)), tmp_path / "auto")
    assert res.lines_alpha == pytest.approx(0.5, rel=1e-5)
    assert res.block_scales[3] == pytest.approx(1.0, rel=1e-5)
    r = AdapterMixRecipe.from_yaml(f"base_model: demo\nadapters: [{a}]\nlines: {{beta: 0.3}}\n")
    assert r.lines == LinesConfig("auto", 0.3)


def test_cli_mix_adapters(tmp_path, tiny_llama_dir, llama_adapters, capsys):
    from cli import main

    a, b = llama_adapters["a"], llama_adapters["b"]
    path = tmp_path / "mix.yml"
    path.write_text(f"base_model: {tiny_llama_dir}\nadapters:\n  - {{adapter: {a}, weight: 0.7}}\n"
                    f"  - {{adapter: {b}, weight: 0.3}}\nmethod: svd\nparameters: {{rank: 3}}\n"
                    "lines: {alpha: 0.5, beta: 0.5}\n")
    assert main(["mix-adapters", str(path), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "wrote adapter" in out and "rank 3" in out and "exact in ΔW space" in out
    assert main(["mix-adapters", str(path), str(tmp_path / "full"), "--merge-into-base"]) == 0
    assert (tmp_path / "full" / "model.safetensors").exists() and (tmp_path / "full" / "config.json").exists()
    assert main(["mix-adapters", str(path), str(tmp_path / "out")]) == 2  # exists already
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one error line
    assert last.startswith("weightsmith: error:") and "already exists" in last
    path.write_text(f"base_model: {tiny_llama_dir}\nadapters: [{a}]\nmethod: nope\n")
    assert main(["mix-adapters", str(path), str(tmp_path / "o2")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_adapter_from_the_hub(tmp_path, tiny_llama_dir, llama_adapters, hub_env):
    """A Hub id downloads only the adapter files (no pickles, no code) and mixes like a folder."""
    a = llama_adapters["a"]
    files = {p.name: p.read_bytes() for p in a.iterdir() if p.is_file()}
    hub_env["hub"].seed("alice/lora-a", {**files, "evil.py": b"raise SystemExit", "adapter_model.bin": b"x"})
    r = AdapterMixRecipe(str(tiny_llama_dir), [AdapterEntry("alice/lora-a", 2.0)], "cat")
    res = mix_adapters(r, tmp_path / "hub")
    assert res.adapters == ["alice/lora-a"]
    q = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(deltas(tmp_path / "hub")[q], 2.0 * deltas(a)[q], rtol=0, atol=1e-6)
    fetched = [p for _, p, _ in hub_env["hub"].requests if "/resolve/" in p]
    assert fetched and not any(p.endswith(("evil.py", ".bin")) for p in fetched)


def test_merge_into_tied_base_keeps_the_tie(tmp_path, tiny_llama_tied_dir):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    ad = make_adapter(tiny_llama_tied_dir, tmp_path / "ad", r=2, seed=9, targets=["v_proj", "up_proj"])
    mix_adapters(recipe(tiny_llama_tied_dir, [ad], [1.5]), tmp_path / "full", merge_into_base=True)
    with safe_open(str(tmp_path / "full" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    ours = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full")).eval()
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    mix_adapters(recipe(tiny_llama_tied_dir, [ad], [1.5]), tmp_path / "adapter")
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_tied_dir)),
                                    str(tmp_path / "adapter")).merge_and_unload().eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_tied_dir)).eval()
    with torch.no_grad():
        got, want, plain = ours(IDS).logits, ref(IDS).logits, base(IDS).logits
    assert (want - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
