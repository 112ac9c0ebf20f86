"""``weightsmith moe`` against ``mergekit-moe`` 0.1.5 on tiny models: the same tensor names and values.

``cheap_embed`` gates are computed from the embeddings alone, so both tools must agree to float
rounding. (``hidden`` differs by design: mergekit runs the base in bfloat16 and left-pads the
prompts; here it runs in float32, one prompt at a time.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.moe import MoeConfig, build_moe  # noqa: E402
from test_merge_moe import PROMPTS_A, PROMPTS_B  # noqa: E402
from test_merge_tokenizer import MERGEKIT_VENV  # noqa: E402
from test_moe_qwen2 import PROMPTS_SHARED, qwen2_family  # noqa: E402,F401 - the fixture

MERGEKIT_MOE = MERGEKIT_VENV / "bin" / "mergekit-moe"
needs_mergekit_moe = pytest.mark.skipif(not MERGEKIT_MOE.exists(),
                                        reason=f"mergekit 0.1.5 venv not found at {MERGEKIT_VENV}; CI has none")


def moe_yaml(base: Path, a: Path, b: Path, shared: Path | None) -> dict:
    data = {"base_model": str(base), "gate_mode": "cheap_embed", "experts_per_token": 2,
            "experts": [{"source_model": str(a), "positive_prompts": PROMPTS_A, "negative_prompts": PROMPTS_B[:1]},
                        {"source_model": str(b), "positive_prompts": PROMPTS_B}]}
    if shared is not None:
        # mergekit 0.1.5 reads the shared expert through the loaders of the base and the experts only,
        # so its shared expert must be one of those models
        data["shared_experts"] = [{"source_model": str(shared), "positive_prompts": PROMPTS_SHARED}]
    return data


def compare_with_mergekit(data: dict, tmp_path: Path) -> float:
    from safetensors.torch import load_file

    recipe = tmp_path / "moe.yml"
    recipe.write_text(yaml.safe_dump(data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(MERGEKIT_MOE), str(recipe), str(tmp_path / "mk"), "--quiet"], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    build_moe(MoeConfig.from_dict(data), tmp_path / "ours")
    ours, theirs = (load_file(tmp_path / d / "model.safetensors") for d in ("ours", "mk"))
    assert sorted(ours) == sorted(theirs)
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}
    worst = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)
    # non-vacuity: the experts and their routers differ, so equal outputs are not equal by accident
    assert not torch.equal(ours["model.layers.0.mlp.gate.weight"][0], ours["model.layers.0.mlp.gate.weight"][1])
    return worst


@needs_mergekit_moe
def test_qwen2_moe_equals_mergekit(qwen2_family, tmp_path):
    fam = qwen2_family
    data = moe_yaml(fam["base"], fam["ft1"], fam["ft2"], fam["base"])
    assert compare_with_mergekit(data, tmp_path) <= 1e-6  # measured 6.0e-8 (a router row's rounding)


@needs_mergekit_moe
@pytest.mark.slow
@pytest.mark.parametrize("shared", [False, True], ids=["mixtral", "qwen2_moe"])
def test_llama_moe_equals_mergekit(tiny_llama_family, tmp_path, shared):
    fam = tiny_llama_family
    data = moe_yaml(fam["base"], fam["ft1"], fam["ft2"], fam["base"] if shared else None)
    assert compare_with_mergekit(data, tmp_path) <= 1e-6  # measured 8.9e-8 both
