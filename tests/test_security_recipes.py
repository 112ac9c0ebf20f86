"""Recipes and text files: YAML bombs, non-UTF-8 files, non-finite or wrong-type parameters each give one line.

Issue 11, "Bad input that is not caught": a YAML alias bomb gave no answer
after 60 s with memory growing; ``weight: .inf`` merged into an output full of
NaN/Inf; a non-UTF-8 recipe or edit file gave a traceback.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints.errors import WeightsmithError
from merging.adapters import AdapterMixRecipe, load_adapter
from merging.recipe import MergeRecipe

ROOT = Path(__file__).resolve().parents[1]


def _bomb(levels: int = 9) -> str:
    """The billion laughs: each anchor is a list of ten aliases of the previous one (10**levels leaves)."""
    lines = ['l0: &l0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def _merge_recipe(params: str) -> str:
    return f"merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: ft\n    parameters: {params}\n"


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


def _refused(parse, text: str, expected: str) -> str:
    """``parse(text)`` raises one WeightsmithError line matching ``expected``; returns it."""
    with pytest.raises(WeightsmithError, match=expected) as err:
        parse(text)
    return _one_line(err)


# ---------------------------------------------------------------------------------------------
# YAML bombs
# ---------------------------------------------------------------------------------------------
def test_billion_laughs_merge_recipe_is_refused(tmp_path):
    # The bomb sits where validation walks it (a parameter schedule): before the fix this never returned.
    levels = ["&l0 [1.0]"] + [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]
    path = tmp_path / "bomb.yml"
    path.write_text(_merge_recipe("{weight: [" + ", ".join(levels) + "]}"))
    with pytest.raises(WeightsmithError) as err:
        MergeRecipe.from_yaml(path)
    assert _one_line(err).startswith("recipe expands to more than 100000 values through aliases")


def test_billion_laughs_adapter_recipe_and_loader(tmp_path):
    from checkpoints.textfiles import load_yaml

    with pytest.raises(WeightsmithError, match=r"^adapter mix recipe expands to more than"):
        AdapterMixRecipe.from_yaml(_bomb() + "base_model: demo\nadapters: [a]\n")
    with pytest.raises(WeightsmithError, match=r"^notes expands to more than"):
        load_yaml(_bomb(), what="notes")
    # Non-vacuity: aliases within the bound are fine and expand as YAML says.
    small = load_yaml(_bomb(3) + "use: *l3\n")
    assert len(small["use"]) == 10 and small["use"][0][0][0] == ["lol"]
    assert sum(1 for a in small["use"] for b in a for c in b) == 1000


def test_recursive_alias_and_deep_nesting_are_one_line():
    from checkpoints.textfiles import load_yaml

    with pytest.raises(WeightsmithError, match=r"^recipe holds a recursive alias"):
        load_yaml("a: &a [1, *a]\n", what="recipe")
    with pytest.raises(WeightsmithError, match=r"^recipe is nested too deeply"):
        load_yaml("[" * 50_000 + "]" * 50_000, what="recipe")
    with pytest.raises(WeightsmithError, match=r"^recipe is not valid YAML at line 2") as err:
        MergeRecipe.from_yaml("merge_method: [\n")
    # A caller may fall back to plain text on bad syntax (a table cell), never on a bomb: the types differ.
    from checkpoints.textfiles import UnsafeYaml

    assert not isinstance(err.value, UnsafeYaml)
    with pytest.raises(UnsafeYaml, match=r"^cell expands to more than"):
        load_yaml(_bomb(), what="cell")


# ---------------------------------------------------------------------------------------------
# non-UTF-8 files
# ---------------------------------------------------------------------------------------------
def test_non_utf8_recipe_files_name_the_file(tmp_path):
    bad = tmp_path / "latin1.yml"
    bad.write_bytes("merge_method: linear\n# café\n".encode("latin-1"))
    with pytest.raises(WeightsmithError) as err:
        MergeRecipe.from_yaml(bad)
    assert _one_line(err) == "recipe latin1.yml: not UTF-8 text (byte 0xe9 at offset 26); save it as UTF-8"
    mix = tmp_path / "mix.yml"
    mix.write_bytes(b"base_model: demo\nadapters: [\xff]\n")
    with pytest.raises(WeightsmithError, match=r"^adapter mix recipe mix\.yml: not UTF-8 text \(byte 0xff"):
        AdapterMixRecipe.from_yaml(mix)
    # Non-vacuity: the same recipe in UTF-8 (with a BOM, as Windows editors write it) reads.
    good = tmp_path / "utf8.yml"
    good.write_bytes("\ufeffmerge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
                     "  - model: b\n    parameters: {weight: 1}\n# café\n".encode("utf-8"))
    assert MergeRecipe.from_yaml(good).merge_method == "linear"


def test_text_reader_for_edit_files(tmp_path):
    from checkpoints.textfiles import read_text

    edits = tmp_path / "edits.json"
    edits.write_bytes(b'[{"prompt": "\x93quoted\x94"}]')
    with pytest.raises(WeightsmithError, match=r"^edit requests edits\.json: not UTF-8 text \(byte 0x93 at offset 13\)"):
        read_text(edits, what="edit requests")
    with pytest.raises(WeightsmithError, match=r"^edit requests edits\.json: larger than 0 MiB"):
        read_text(edits, what="edit requests", max_bytes=10)
    with pytest.raises(WeightsmithError, match=r"^recipe missing\.yml: cannot read \(No such file"):
        read_text(tmp_path / "missing.yml", what="recipe")
    with pytest.raises(WeightsmithError, match=r"is a folder"):
        read_text(tmp_path, what="recipe")
    edits.write_text('[{"prompt": "“quoted”"}]', encoding="utf-8")
    assert json.loads(read_text(edits))[0]["prompt"] == "“quoted”"


def test_edit_records_loader_reads_through_the_text_reader(tmp_path):
    """``eval-edits``' loader: other bytes are one line naming the file (was a UnicodeDecodeError)."""
    from editing.evaluate import load_records

    edits = tmp_path / "edits.json"
    edits.write_bytes(b'[{"prompt": "\x93{} quoted\x94", "subject": "x", "target_new": "a", "ground_truth": "b"}]')
    with pytest.raises(WeightsmithError, match=r"^edit file edits\.json: not UTF-8 text"):
        load_records(edits)
    edits.write_text('[{"prompt": "“{}” quoted", "subject": "x", "target_new": "a", "ground_truth": "b"}]',
                     encoding="utf-8")
    assert load_records(edits)[0].subject == "x"  # non-vacuity: the same record in UTF-8 loads


# ---------------------------------------------------------------------------------------------
# non-finite and wrong-type parameters
# ---------------------------------------------------------------------------------------------
_SLERP = "merge_method: slerp\nbase_model: b\nmodels: [{model: a}, {model: b}]\n"


@pytest.mark.parametrize("params, expected", [
    ("{weight: .inf}", r"weight must be a finite number, got inf"),
    ("{weight: -.inf}", r"weight must be a finite number, got -inf"),
    ("{weight: .nan}", r"weight must be a finite number, got nan"),
    ("{weight: 'inf'}", r"weight must be a finite number, got inf"),
    ("{weight: [{filter: mlp, value: .inf}, {value: 1}]}", r"weight must be a finite number, got inf"),
    ("{weight: [1, .nan]}", r"weight must be a finite number, got nan"),
    ("{weight: 1, density: abc}", r"models\[ft\]\.parameters: density must be a number, got 'abc'"),  # ties: it trims
    ("[1, 2]", r"models\[0\]\.parameters must be a mapping"),
    ("{weight: {a: 1}}", r"parameters\.weight must be a number, a list, or \{filter, value\}"),
    ("{weight: null}", r"weight must be a number, got None"),
    # finite as a Python float but not as float32: torch raised "value cannot be converted ... overflow"
    ("{weight: 1.0e+39}", r"weight must be at most 3\.4e\+38 in magnitude \(float32\), got 1e\+39"),
])
def test_bad_merge_parameters_name_the_parameter(params, expected):
    # density is a parameter of the trimming methods only (plain task arithmetic keeps every entry)
    text = _merge_recipe(params)
    if "density" in params:
        text = text.replace("merge_method: task_arithmetic", "merge_method: ties")
    _refused(MergeRecipe.from_yaml, text, expected)


@pytest.mark.parametrize("text, expected", [
    (_SLERP + "parameters: {t: [1, .nan]}\n", r"parameters: t must be a finite number, got nan"),
    (_SLERP + "parameters: {t: [0, .inf, 1]}\n", r"parameters: t must be a finite number, got inf"),
    (_merge_recipe("{weight: 1}") + "lines: {alpha: .inf, beta: 0.5}\n", r"lines\.alpha must be a finite number"),
    (_merge_recipe("{weight: 1}") + "lines: {alpha: auto, beta: .nan}\n", r"lines\.beta must be a finite number"),
    (_merge_recipe("{weight: 1}") + "lines: {alpha: 1.0e+40, beta: 1}\n", r"lines\.alpha must be at most 3\.4e\+38"),
    ("merge_method: linear\nmodels: {a: 1}\n", r"recipe: models must be a list"),
])
def test_bad_shared_parameters_and_shapes(text, expected):
    _refused(MergeRecipe.from_yaml, text, expected)


def test_finite_parameters_still_pass():
    recipe = MergeRecipe.from_yaml(_merge_recipe("{weight: [0, 0.5, 3.0e+38]}") + "lines: {alpha: 0.5, beta: 1}\n")
    assert recipe.models[0].parameters["weight"][-1] == 3e38


@pytest.mark.parametrize("adapter, expected", [
    ("{adapter: a, weight: .inf}", r"adapters\[0\]\.weight must be a finite number, got inf"),
    ("{adapter: a, weight: .nan}", r"adapters\[0\]\.weight must be a finite number, got nan"),
    ("{adapter: a, weight: abc}", r"adapters\[0\]\.weight must be a number, got 'abc'"),
    ("{adapter: a, weight: [1]}", r"adapters\[0\]\.weight must be a number, got \[1\]"),
    ("{adapter: a, weight: true}", r"adapters\[0\]\.weight must be a number, got True"),
    ("{adapter: a, weight: -1.0e+39}", r"adapters\[0\]\.weight must be at most 3\.4e\+38 in magnitude"),
])
def test_bad_adapter_weights_name_the_adapter(adapter, expected):
    _refused(AdapterMixRecipe.from_yaml, f"base_model: demo\nadapters:\n  - {adapter}\n", expected)


def test_bad_adapter_mix_parameters():
    base = "base_model: demo\nadapters: [{adapter: a, weight: 0.5}]\n"
    with pytest.raises(WeightsmithError, match=r"lines\.beta must be a finite number"):
        AdapterMixRecipe.from_yaml(base + "lines: {alpha: 1, beta: .nan}\n")
    with pytest.raises(WeightsmithError, match=r"density must be in \(0, 1\], got nan"):
        AdapterMixRecipe.from_yaml(base + "method: ties\nparameters: {density: .nan}\n")
    with pytest.raises(WeightsmithError, match=r"parameters must be a mapping"):
        AdapterMixRecipe.from_yaml(base + "parameters: [1]\n")
    assert AdapterMixRecipe.from_yaml(base).adapters[0].weight == 0.5


def _adapter(folder: Path, poison: float | None) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "base_model_name_or_path": "x"}))
    a = torch.randn(2, 8)
    b = torch.randn(8, 2)
    if poison is not None:
        b[3, 1] = poison
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_non_finite_adapter_tensor_names_adapter_and_tensor(tmp_path, poison):
    bad = _adapter(tmp_path / "bad-adapter", poison)
    with pytest.raises(WeightsmithError) as err:
        load_adapter(bad)
    assert _one_line(err) == ("adapter bad-adapter: tensor base_model.model.model.layers.0.self_attn.q_proj"
                              ".lora_B.weight holds NaN or Inf values")
    good = load_adapter(_adapter(tmp_path / "good-adapter", None))  # non-vacuity
    assert list(good.factors) == ["model.layers.0.self_attn.q_proj"]


# ---------------------------------------------------------------------------------------------
# the CLI: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------
def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=cwd)


def test_cli_bad_recipes_exit_2_with_one_line(tmp_path):
    (tmp_path / "inf.yml").write_text(_merge_recipe("{weight: .inf}"))
    (tmp_path / "latin1.yml").write_bytes(b"base_model: demo\nadapters: [caf\xe9]\n")
    proc = _cli(["merge", "inf.yml", "out"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "weightsmith: error: models[ft].parameters: weight must be a finite number, got inf"], proc.stderr
    proc = _cli(["mix-adapters", "latin1.yml", "out"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "weightsmith: error: adapter mix recipe latin1.yml: not UTF-8 text (byte 0xe9 at offset 31); save it as UTF-8"
    ], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inf.yml", "latin1.yml"]


# ---------------------------------------------------------------------------------------------
# sizes (issue 17: two parsers disagreed, "2gb" was 2·10⁹ in merge and 2·2³⁰ in the workspace)
# ---------------------------------------------------------------------------------------------
def test_one_size_parser_decimal_and_binary():
    from checkpoints.sizes import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("5gb") == 5 * 10**9 and parse_size("5G") == 5 * 10**9
    assert parse_size("5GiB") == 5 * 2**30 and parse_size("5gi") == 5 * 2**30
    assert parse_size("500M") == 500 * 10**6 and parse_size("1.5MiB") == 3 * 2**19
    assert parse_size("10kb") == 10_000 and parse_size("1KiB") == 1024 and parse_size("2TB") == 2 * 10**12
    assert parse_size("1234") == 1234 and parse_size("1234B") == 1234 and parse_size(1234) == 1234
    assert parse_size(None) is None and parse_size("  ") is None
    for bad in ("lots", "-5GB", "5XB", "GB", "1e3", "5 G B", float("nan"), float("inf"), -1, True):
        with pytest.raises(WeightsmithError, match=r"^max shard size .*not a size"):
            parse_size(bad, what="max shard size")


# ---------------------------------------------------------------------------------------------
# adapters under the server's policy (S3/S1 request: a Hub-shaped name was read from the server's disk)
# ---------------------------------------------------------------------------------------------
def test_adapter_policy_hub_shaped_names_outside_paths_and_links(tmp_path, monkeypatch):
    from merging.adapters import mix_adapters

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    _adapter(tmp_path / "models" / "secret", None)
    # Local paths on (the CLI): the folder is read, as before.
    assert load_adapter("models/secret").name == "secret"
    # Local paths off (a public server): a Hub id is never looked up on disk; offline, the Hub says so.
    with pytest.raises(WeightsmithError) as err:
        load_adapter("models/secret", allow_local=False)
    assert "models/secret" in _one_line(err) and "local paths" not in str(err.value)
    with pytest.raises(WeightsmithError, match=r"/models/secret: local paths are not allowed here"):
        load_adapter(str(tmp_path / "models" / "secret"), allow_local=False)
    with pytest.raises(WeightsmithError, match=r"^adapter_config\.json: local paths are not allowed here"):
        load_adapter([str(tmp_path / "models" / "secret" / "adapter_config.json")], allow_local=False)
    trusted = load_adapter(str(tmp_path / "models" / "secret"), allow_local=False, trusted_roots=[tmp_path / "models"])
    assert trusted.name == "secret"
    # A weights file linking out of the adapter's folder is refused, naming the entry only.
    outside = _adapter(tmp_path / "elsewhere", None)
    linked = tmp_path / "models" / "linked"
    linked.mkdir()
    (linked / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    (linked / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    with pytest.raises(WeightsmithError, match=r"^linked: entry 'adapter_model\.safetensors' points outside"):
        load_adapter(linked)
    # The mix passes the policy on to its base model too.
    recipe = AdapterMixRecipe.from_yaml(f"base_model: {tmp_path / 'models'}\nadapters: [models/secret]\n")
    with pytest.raises(WeightsmithError, match=r"local paths are not allowed here"):
        mix_adapters(recipe, tmp_path / "out", allow_local=False)
    assert not (tmp_path / "out").exists()
