"""LoRA inputs (issue 14 item 3): ``model: base+adapter`` applies the PEFT adapter on read.

The reference is PEFT itself: the base loaded with transformers, the adapter
attached with ``PeftModel.from_pretrained`` and folded in with
``merge_and_unload``. A passthrough recipe over ``base+adapter`` must give
exactly those tensors (llama, and gpt2 whose Conv1D stores weights [in, out]),
and differ from the plain base where the adapter acts. mergekit 0.1.5 (a
separate venv, absent in CI) must give the same tensors within 1e-5.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from checkpoints.errors import WeightsmithError
from checkpoints.refs import split_lora_ref
from checkpoints.sources import resolve
from merging.engine import run_merge
from merging.lora_inputs import resolve_input
from merging.recipe import MergeRecipe
from test_merge_methods import load

MERGEKIT_VENV = Path(os.environ.get("WEIGHTSMITH_MERGEKIT_VENV", "/work/mergekit-venv"))
Q0 = "model.layers.0.self_attn.q_proj.weight"
K0 = "model.layers.0.self_attn.k_proj.weight"


def make_adapter(base_dir: Path, out: Path, targets: list[str], *, seed: int, rank: int = 4, alpha: int = 8,
                 fan_in_fan_out: bool = False) -> Path:
    """A random PEFT LoRA adapter for the model in ``base_dir`` (B is not zero: init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                     fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0)
    get_peft_model(model, cfg).save_pretrained(str(out))
    return out


def peft_merged(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The base with the adapter folded in by PEFT's merge_and_unload (the hand reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def llama_lora(tiny_llama_family, tmp_path_factory) -> Path:
    return make_adapter(tiny_llama_family["base"], tmp_path_factory.mktemp("lora") / "lora-llama",
                        ["q_proj", "v_proj", "down_proj"], seed=7)


def passthrough(ref: str) -> str:
    return f"merge_method: passthrough\nmodels:\n  - model: {ref}\n"


def test_base_plus_lora_equals_peft_merge_and_unload(tmp_path, tiny_llama_family, llama_lora):
    base = tiny_llama_family["base"]
    result = run_merge(MergeRecipe.from_yaml(passthrough(f"{base}+{llama_lora}")), tmp_path / "out")
    out, want, plain = load(tmp_path / "out"), peft_merged(base, llama_lora), load(base)
    assert set(out) == set(plain)
    for name in out:
        assert torch.equal(out[name], want[name]), name
    # non-vacuous: the adapted projections moved, the others are the base's bit for bit
    adapted = [n for n in out if any(m in n for m in ("q_proj", "v_proj", "down_proj"))]
    assert len(adapted) == 12 and all(not torch.equal(out[n], plain[n]) for n in adapted)
    assert all(torch.equal(out[n], plain[n]) for n in set(out) - set(adapted))
    assert result.tensors_total == len(plain)
    # nothing but the output was written beside it (no merged copy of base+adapter first): the adapted
    # tensors have no bytes in any file, they are computed when read; the others are read from the base's files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    ckpt = resolve_input(f"{base}+{llama_lora}")
    assert ckpt.files == resolve(str(base)).files
    assert ckpt.reader().meta(Q0).data_start is None and ckpt.reader().meta(K0).data_start is not None


def test_gpt2_conv1d_lora_equals_peft(tmp_path, tiny_gpt2_family):
    base = tiny_gpt2_family["base"]
    lora = make_adapter(base, tmp_path / "lora-gpt2", ["c_attn", "c_fc"], seed=3, rank=2, alpha=5,
                        fan_in_fan_out=True)
    run_merge(MergeRecipe.from_yaml(passthrough(f"{base}+{lora}")), tmp_path / "out")
    out, want, plain = load(tmp_path / "out"), peft_merged(base, lora), load(base)
    name = "transformer.h.1.attn.c_attn.weight"
    for k, v in out.items():
        ref = want.get(k, want.get(f"transformer.{k}"))
        assert torch.equal(v, ref), k
    assert not torch.equal(out[name], plain[name])  # the Conv1D [in, out] weight took the transposed ΔW


def test_lora_input_mixes_like_any_model(tmp_path, tiny_llama_family, llama_lora):
    """In a task-arithmetic merge, base+lora contributes exactly the adapter's ΔW as its task vector."""
    f = tiny_llama_family
    recipe = (f"merge_method: task_arithmetic\nbase_model: {f['base']}\nmodels:\n"
              f"  - model: {f['base']}+{llama_lora}\n    parameters: {{weight: 0.5}}\n"
              f"  - model: {f['ft1']}\n    parameters: {{weight: 0.5}}\n")
    run_merge(MergeRecipe.from_yaml(recipe), tmp_path / "mix")
    out, base, ft1, lora = load(tmp_path / "mix"), load(f["base"]), load(f["ft1"]), peft_merged(f["base"], llama_lora)
    want = base[Q0] + 0.5 * (lora[Q0] - base[Q0]) + 0.5 * (ft1[Q0] - base[Q0])
    assert torch.allclose(out[Q0], want, rtol=0, atol=1e-6)
    assert torch.allclose(out[K0], base[K0] + 0.5 * (ft1[K0] - base[K0]), rtol=0, atol=1e-6)  # no adapter on k_proj
    assert not torch.allclose(out[Q0], base[Q0] + 0.5 * (ft1[Q0] - base[Q0]), rtol=0, atol=1e-4)
    card = (tmp_path / "mix" / "README.md").read_text()
    assert f"{f['base'].name}+{llama_lora.name}" in card and str(tmp_path) not in card


def test_bad_lora_references_are_one_line(tmp_path, tiny_llama_family, tiny_gpt2_family, llama_lora):
    f = tiny_llama_family
    cases = {
        f"{f['base']}+{llama_lora}+{llama_lora}": "one '+'",
        f"{f['base']}+": "one '+'",
        f"{f['base']}+{f['ft1']}": "not a PEFT adapter",  # a model where the adapter goes
        f"{tiny_gpt2_family['base']}+{llama_lora}": "targets",  # the adapter does not fit that model
        f"{f['base']}+{tmp_path / 'missing'}": "no such adapter folder",
    }
    for ref, words in cases.items():
        with pytest.raises(WeightsmithError) as err:
            run_merge(MergeRecipe.from_yaml(passthrough(ref)), tmp_path / "never")
        assert words in str(err.value) and "\n" not in str(err.value), (ref, str(err.value))
        assert not (tmp_path / "never").exists()
    assert split_lora_ref("org/base+org/lora") == ("org/base", "org/lora")


def test_a_file_the_adapter_names_stays_inside_it(tmp_path, tiny_llama_family, llama_lora):
    """An adapter whose weights file links outside its folder is refused, like any checkpoint's."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(llama_lora / "adapter_model.safetensors", outside / "w.safetensors")
    sneaky = tmp_path / "sneaky"
    sneaky.mkdir()
    shutil.copy(llama_lora / "adapter_config.json", sneaky / "adapter_config.json")
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "w.safetensors")
    with pytest.raises(WeightsmithError, match="points outside the checkpoint folder"):
        resolve_input(f"{tiny_llama_family['base']}+{sneaky}")


def test_server_policy_applies_to_the_adapter(tmp_path, tiny_llama_family, llama_lora):
    """With local paths off, an adapter outside the trusted roots is refused like a model would be."""
    base = tiny_llama_family["base"]
    with pytest.raises(WeightsmithError, match="local paths are not allowed"):
        resolve_input(f"{base}+{llama_lora}", allow_local=False, trusted_roots=[base])
    ckpt = resolve_input(f"{base}+{llama_lora}", allow_local=False, trusted_roots=[base, llama_lora])
    assert ckpt.kind == "lora" and ckpt.name == f"{base.name}+{llama_lora.name}"


def mergekit_yaml(recipe: Path, out: Path, *extra: str) -> None:
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if not exe.exists():
        pytest.skip(f"mergekit 0.1.5 venv not found at {MERGEKIT_VENV} (bench/merge_vs_mergekit.py makes it)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(exe), str(recipe), str(out), *extra], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_same_tensors_as_mergekit(tmp_path, tiny_llama_family, llama_lora):
    f = tiny_llama_family
    text = (f"merge_method: task_arithmetic\nbase_model: {f['base']}\ndtype: float32\nmodels:\n"
            f"  - model: {f['base']}+{llama_lora}\n    parameters: {{weight: 0.7}}\n"
            f"  - model: {f['ft2']}\n    parameters: {{weight: 0.4}}\n")
    (tmp_path / "recipe.yml").write_text(text)
    mergekit_yaml(tmp_path / "recipe.yml", tmp_path / "mk", "--lora-merge-cache", str(tmp_path / "mk-cache"),
                  "--allow-crimes")
    run_merge(MergeRecipe.from_yaml(text), tmp_path / "ws")
    ours, theirs = load(tmp_path / "ws"), load(tmp_path / "mk")
    assert max_diff(ours, theirs) <= 1e-5
    plain, ft2 = load(f["base"]), load(f["ft2"])
    without_lora = plain[Q0] + 0.4 * (ft2[Q0] - plain[Q0])
    assert float((ours[Q0] - without_lora).abs().max()) > 1e-3  # non-vacuous: both applied the adapter
