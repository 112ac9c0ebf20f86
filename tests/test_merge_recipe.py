"""Recipes: round trip, and one clear error per bad recipe with nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpoints.errors import WeightsmithError
from merging.engine import run_merge
from merging.lines import LinesConfig
from merging.recipe import MergeRecipe


def test_round_trip_preserves_everything():
    text = """
merge_method: ties
base_model: org/base
models:
  - model: org/a
    parameters:
      weight: [0.2, 0.8]
      density: 0.5
  - model: ./local-b
    parameters:
      weight:
        - filter: mlp
          value: 0.7
        - value: 0.3
      density: 0.6
parameters:
  normalize: false
  lambda: 1.2
dtype: bfloat16
out_dtype: float16
tokenizer_source: base
lines: {alpha: auto, beta: 0.5}
seed: 3
"""
    recipe = MergeRecipe.from_yaml(text)
    again = MergeRecipe.from_yaml(recipe.to_yaml())
    assert again == recipe
    assert recipe.lines == LinesConfig("auto", 0.5)
    assert recipe.models[1].parameters["weight"][0] == {"filter": "mlp", "value": 0.7}
    assert [m.model for m in recipe.non_base_models()] == ["org/a", "./local-b"]
    # mergekit's keys come out unchanged
    data = recipe.to_dict()
    assert data["merge_method"] == "ties" and data["base_model"] == "org/base" and data["dtype"] == "bfloat16"


def test_round_trip_slices():
    text = """
merge_method: passthrough
slices:
  - sources:
      - model: a/b
        layer_range: [0, 3]
  - sources:
      - model: c/d
        layer_range: [1, 4]
"""
    recipe = MergeRecipe.from_yaml(text)
    assert MergeRecipe.from_yaml(recipe.to_yaml()) == recipe
    assert recipe.slices[1].sources[0].layer_range == (1, 4)


def test_recipe_file_path(tmp_path):
    p = tmp_path / "r.yml"
    p.write_text("merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {weight: 1}\n")
    assert MergeRecipe.from_yaml(p).models[0].model == "a/b"


@pytest.mark.parametrize("text, message", [
    ("merge_method: frobnicate\nmodels:\n  - model: a/b\n", "unknown merge method 'frobnicate'"),
    ("merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {weight: heavy}\n", "weight must be a number, got 'heavy'"),
    ("merge_method: ties\nbase_model: a/b\nmodels:\n  - model: c/d\n    parameters: {weight: 1, density: 0}\n",
     "density must be in (0.0, 1.0], got 0"),
    ("merge_method: ties\nbase_model: a/b\nmodels:\n  - model: c/d\n    parameters: {weight: 1, density: 1.5}\n",
     "density must be in (0.0, 1.0], got 1.5"),
    ("merge_method: ties\nmodels:\n  - model: c/d\n    parameters: {weight: 1}\n", "ties needs a base_model"),
    ("merge_method: task_arithmetic\nbase_model: a/b\nmodels:\n  - model: c/d\n", "model c/d has no weight"),
    ("merge_method: slerp\nbase_model: a/b\nmodels:\n  - model: c/d\n", "slerp needs parameter t"),
    ("merge_method: slerp\nbase_model: a/b\nmodels:\n  - model: c/d\n  - model: e/f\nparameters: {t: 0.5}\n",
     "slerp takes exactly 1 models besides the base, got 2"),
    ("merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {weight: 1}\nlines: {alpha: 0.5, beta: 0.5}\n",
     "lines scales a task vector, but linear has none"),
    ("merge_method: task_arithmetic\nbase_model: a/b\nmodels:\n  - model: c/d\n    parameters: {weight: 1}\nlines: {alpha: x}\n",
     "lines.alpha must be a number"),
    ("merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {weight: 1}\nmodules: {}\n", "unsupported key(s) modules"),
    ("merge_method: linear\nmodels: [\n", "recipe is not valid YAML"),
    ("merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {weight: 1}\ndtype: float8\n", "dtype 'float8'"),
])
def test_bad_recipes_give_one_clear_error(text, message):
    with pytest.raises(WeightsmithError) as e:
        MergeRecipe.from_yaml(text)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def _no_output(tmp_path: Path) -> None:
    assert [p.name for p in tmp_path.iterdir() if p.name != "recipe.yml"] == []


def test_missing_model_is_one_error_and_writes_nothing(tmp_path, tiny_llama_dir):
    recipe = MergeRecipe.from_yaml(f"""
merge_method: task_arithmetic
base_model: {tiny_llama_dir}
models:
  - model: {tmp_path / 'nope'}
    parameters: {{weight: 1}}
""")
    out = tmp_path / "out"
    with pytest.raises(WeightsmithError, match="model .*nope.* of the recipe: .*no such file or folder"):
        run_merge(recipe, out)
    _no_output(tmp_path)


def test_different_architectures_name_both_models(tmp_path, tiny_llama_dir, tiny_gpt2_dir):
    recipe = MergeRecipe.from_yaml(f"""
merge_method: linear
models:
  - model: {tiny_llama_dir}
    parameters: {{weight: 1}}
  - model: {tiny_gpt2_dir}
    parameters: {{weight: 1}}
""")
    with pytest.raises(WeightsmithError) as e:
        run_merge(recipe, tmp_path / "out")
    msg = str(e.value)
    assert "different architectures" in msg and tiny_llama_dir.name in msg and tiny_gpt2_dir.name in msg
    assert "llama" in msg and "gpt2" in msg
    _no_output(tmp_path)


def test_shape_mismatch_names_both_models_and_the_tensor(tmp_path, tiny_llama_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import save_model

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=4, max_position_embeddings=128)
    other = save_model(LlamaForCausalLM(cfg), tmp_path / "wide")
    recipe = MergeRecipe.from_yaml(f"""
merge_method: task_arithmetic
base_model: {tiny_llama_dir}
models:
  - model: {other}
    parameters: {{weight: 1}}
""")
    with pytest.raises(WeightsmithError) as e:
        run_merge(recipe, tmp_path / "out")
    msg = str(e.value)
    assert "shape mismatch in tensor model.layers.0.mlp" in msg
    assert tiny_llama_dir.name in msg and "wide" in msg and "[32, 48]" in msg and "[32, 40]" in msg
    assert not (tmp_path / "out").exists()


def test_layer_and_vocab_mismatch(tmp_path, tiny_llama_dir):
    from conftest import build_tiny_llama, save_model

    deeper = save_model(build_tiny_llama(0, layers=6), tmp_path / "deeper")
    recipe = MergeRecipe.from_yaml(f"merge_method: task_arithmetic\nbase_model: {tiny_llama_dir}\nmodels:\n"
                                   f"  - model: {deeper}\n    parameters: {{weight: 1}}\n")
    with pytest.raises(WeightsmithError, match="different layer counts: .* has 4 layers but deeper has 6"):
        run_merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_example_recipes_parse_and_round_trip():
    folder = Path(__file__).resolve().parents[1] / "assets" / "recipes"
    found = 0
    for path in sorted(folder.glob("*.yml")):
        if "merge_method:" not in path.read_text():
            continue  # adapter-mix recipes live here too
        recipe = MergeRecipe.from_yaml(path)
        assert MergeRecipe.from_yaml(recipe.to_yaml()) == recipe, path.name
        found += 1
    assert found >= 5
