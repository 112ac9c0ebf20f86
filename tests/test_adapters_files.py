"""checkpoints.peft_adapter: the one module that reads, checks, writes and applies PEFT adapter files.

* what we write reads back bit for bit, and PEFT itself (``PeftModel.from_pretrained``,
  local files only) gives the same outputs as our base-plus-adapter, whose merged
  weights are the base plus B·A by hand (Linear and GPT-2 Conv1D);
* hostile adapter files (bad config, names outside the checkpoint, wrong shapes,
  NaN) are each one clear WeightsmithError line, and nothing half-written;
* the layout facts come from the architecture map;
* mixing reports through the one Job protocol, and the old keywords still work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints.arch import spec_for
from checkpoints.demo import DEMO_NAME
from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Cancelled, Job
from checkpoints.peft_adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    base_plus_adapter,
    base_reference,
    check_fits,
    declared_base,
    load_adapter_folder,
    tensor_key,
    unit_scale_config,
    write_adapter,
)
from checkpoints.sources import resolve

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 40, 3]])


def random_factors(base_dir: Path, modules: dict[str, int], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A [r, in], B [out, r]) of the given ranks, sized from the base's stored shapes."""
    base = resolve(str(base_dir))
    metas, spec = base.reader().metas(), base.spec
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, r in modules.items():
        shape = metas[spec.weight_name(module, metas)].shape
        out_f, in_f = (shape[1], shape[0]) if spec.module_transposed(module) else shape
        out[module] = (0.1 * torch.randn(r, in_f, generator=g), 0.1 * torch.randn(out_f, r, generator=g))
    return out


def write_random(base_dir: Path, out: Path, modules: dict[str, int], seed: int = 0):
    base = resolve(str(base_dir))
    factors = random_factors(base_dir, modules, seed)
    config = unit_scale_config({m: a.shape[0] for m, (a, _) in factors.items()}, base_model=base.name,
                               spec=base.spec)
    write_adapter(out, config, factors)
    return factors


LLAMA = {"model.layers.0.self_attn.q_proj": 3, "model.layers.2.mlp.down_proj": 1, "model.layers.3.self_attn.v_proj": 2}
GPT2 = {"transformer.h.0.attn.c_attn": 2, "transformer.h.1.mlp.c_proj": 3}  # Conv1D, stored [in, out]


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


def test_write_then_load_is_exact(tmp_path, tiny_llama_dir):
    seen = []
    factors = random_factors(tiny_llama_dir, LLAMA, seed=1)
    config = unit_scale_config({m: a.shape[0] for m, (a, _) in factors.items()}, base_model="tiny", spec=spec_for("llama"))
    write_adapter(tmp_path / "ad", config, factors, extra=lambda folder: seen.append(sorted(p.name for p in folder.iterdir())))
    assert seen and CONFIG_NAME in seen[0] and WEIGHTS_NAME in seen[0]  # extra runs inside the staging folder
    ad = load_adapter_folder(tmp_path / "ad")
    assert sorted(ad.factors) == sorted(LLAMA)
    for module, (a, b) in factors.items():
        assert torch.equal(ad.factors[module][0], a) and torch.equal(ad.factors[module][1], b)
        assert ad.scaling(module) == 1.0  # ΔW is B·A itself, whatever the module's rank
        assert torch.equal(ad.delta(module), b @ a)
    # non-vacuity: the ranks differ, so the per-module patterns carry them
    assert {a.shape[0] for a, _ in ad.factors.values()} == {1, 2, 3} and ad.config["rank_pattern"]
    assert ad.base_model == "tiny" and declared_base(tmp_path / "ad") == "tiny"
    assert base_reference({}) == base_reference({"base_model_name_or_path": DEMO_NAME}) == "demo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no staging folder left
    with pytest.raises(WeightsmithError, match="already exists"):
        write_adapter(tmp_path / "ad", config, factors)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_loads_what_we_write_like_base_plus_adapter(tmp_path, request, family):
    """PeftModel.from_pretrained (local files only) of our file == our base plus adapter == base + B·A by hand."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = request.getfixturevalue("tiny_llama_dir" if family == "llama" else "tiny_gpt2_dir")
    modules = LLAMA if family == "llama" else GPT2
    factors = write_random(base_dir, tmp_path / "ad", modules, seed=2)
    base = resolve(str(base_dir))

    ours = base_plus_adapter(base, tmp_path / "ad")
    plain = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                                     str(tmp_path / "ad"), local_files_only=True).eval()
    with torch.no_grad():
        got, want, before = ours(IDS).logits, peft(IDS).logits, plain(IDS).logits
    assert (want - before).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and our merged weights are the base plus B·A in the stored layout, by hand
    spec = base.spec
    for module, (a, b) in factors.items():
        w0 = plain.get_submodule(module).weight
        delta = spec.from_out_in(b @ a) if spec.module_transposed(module) else b @ a
        torch.testing.assert_close(ours.get_submodule(module).weight, w0 + delta, rtol=0, atol=1e-6)
    untouched = "model.layers.1.self_attn.k_proj" if family == "llama" else "transformer.h.2.attn.c_attn"
    assert torch.equal(ours.get_submodule(untouched).weight, plain.get_submodule(untouched).weight)


def test_edit_export_reads_back_through_the_module(tmp_path, tiny_llama_dir):
    """editing's export writes through write_adapter: a folder of that shape loads with unit scaling."""
    write_random(tiny_llama_dir, tmp_path / "ad", {"model.layers.1.mlp.down_proj": 2, "model.layers.2.mlp.down_proj": 1})
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert cfg["rank_pattern"] == {"model.layers.1.mlp.down_proj": 2, "model.layers.2.mlp.down_proj": 1}
    assert cfg["alpha_pattern"] == cfg["rank_pattern"] and cfg["r"] == cfg["lora_alpha"] == 2
    ad = load_adapter_folder(tmp_path / "ad")
    assert [ad.scaling(m) for m in sorted(ad.factors)] == [1.0, 1.0]


# ---------------------------------------------------------------------------
# Hostile adapter files: one line each
# ---------------------------------------------------------------------------


def one_line(match: str, fn, *args, **kw) -> str:
    with pytest.raises(WeightsmithError, match=match) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.fixture
def good(tmp_path, tiny_llama_dir) -> Path:
    write_random(tiny_llama_dir, tmp_path / "good", LLAMA, seed=3)
    return tmp_path / "good"


def copy_with(src: Path, dst: Path, *, config: bytes | None = None, tensors: dict | None = None) -> Path:
    dst.mkdir()
    (dst / CONFIG_NAME).write_bytes(config if config is not None else (src / CONFIG_NAME).read_bytes())
    if tensors is None:
        (dst / WEIGHTS_NAME).write_bytes((src / WEIGHTS_NAME).read_bytes())
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / WEIGHTS_NAME))
    return dst


@pytest.mark.parametrize("config, match", [
    (b"[1, 2]", "adapter_config.json: expected a JSON object"),
    (b'{"r": 2,', "adapter_config.json: corrupt JSON"),
    (b'{"peft_type": "LORA", "r": 1, "r": 2}', "corrupt JSON .*appears twice"),
    (b'{"peft_type": "IA3"}', "peft_type is 'IA3'; only LORA adapters mix"),
    (b'{"peft_type": "LORA", "r": -4}', "r = -4; expected a positive number"),
    (b'{"peft_type": "LORA", "r": 2, "lora_alpha": "big"}', "lora_alpha = 'big'; expected a positive number"),
    (b'{"peft_type": "LORA", "r": 2, "rank_pattern": [1]}', "rank_pattern that is not a mapping"),
    (b'{"peft_type": "LORA", "r": 2, "use_dora": true}', "DoRA adapters cannot be mixed"),
    (b'{"peft_type": "LORA", "r": 2, "modules_to_save": ["lm_head"]}', r"saves full modules \(lm_head\)"),
])
def test_bad_config(tmp_path, good, config, match):
    bad = copy_with(good, tmp_path / "bad", config=config)
    one_line(match, load_adapter_folder, bad)


def test_files_outside_the_folder_are_refused(tmp_path, good):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / WEIGHTS_NAME).write_bytes((good / WEIGHTS_NAME).read_bytes())
    bad = tmp_path / "linked"
    bad.mkdir()
    (bad / CONFIG_NAME).write_bytes((good / CONFIG_NAME).read_bytes())
    (bad / WEIGHTS_NAME).symlink_to(outside / WEIGHTS_NAME)
    msg = one_line("points outside the checkpoint folder", load_adapter_folder, bad)
    assert str(tmp_path) not in msg
    load_adapter_folder(good)  # non-vacuity: the same bytes inside the folder load


def test_tensor_names_outside_lora_are_refused(tmp_path, good, tiny_llama_dir):
    ad = load_adapter_folder(good)
    state = ad.state_dict()
    full = copy_with(good, tmp_path / "full", tensors={**state, "base_model.model.model.norm.weight": torch.ones(32)})
    one_line(r"fully saved module weights \(base_model\.model\.model\.norm\.weight\)", load_adapter_folder, full)
    emb = copy_with(good, tmp_path / "emb", tensors={**state, "base_model.model.lm_head.lora_embedding_A": torch.ones(2, 3)})
    one_line("LoRA on embeddings cannot be mixed", load_adapter_folder, emb)
    # a module the base does not have: read fine, refused against the base, before any model is built
    a, b = ad.factors["model.layers.0.self_attn.q_proj"]
    ghost = copy_with(good, tmp_path / "ghost", tensors={tensor_key("model.layers.9.self_attn.q_proj", "A"): a,
                                                          tensor_key("model.layers.9.self_attn.q_proj", "B"): b})
    base = resolve(str(tiny_llama_dir))
    one_line(r"targets model\.layers\.9\.self_attn\.q_proj, which the base .* does not have",
             check_fits, [load_adapter_folder(ghost)], base)
    one_line("does not have", base_plus_adapter, base, ghost)


def test_wrong_shapes_are_refused(tmp_path, good, tiny_llama_dir):
    ad = load_adapter_folder(good)
    q = "model.layers.0.self_attn.q_proj"
    a, b = ad.factors[q]
    loose = copy_with(good, tmp_path / "loose", tensors={tensor_key(q, "A"): a, tensor_key(q, "B"): b[:, :1]})
    one_line(r"lora_A \[3, 32\] and lora_B \[32, 1\], which do not chain", load_adapter_folder, loose)
    half = copy_with(good, tmp_path / "half", tensors={tensor_key(q, "A"): a})
    one_line("has lora_A but not both A and B", load_adapter_folder, half)
    base = resolve(str(tiny_llama_dir))
    wide = copy_with(good, tmp_path / "wide", tensors={tensor_key(q, "A"): torch.zeros(3, 48), tensor_key(q, "B"): b})
    one_line(r"does not fit base .*lora_A \[3, 48\].*\[out=32, in=32\]", check_fits, [load_adapter_folder(wide)], base)
    # the config's rank disagrees with the stored factors: PEFT would build rank-5 layers
    cfg = json.loads((good / CONFIG_NAME).read_text())
    cfg.update(r=5, lora_alpha=5, rank_pattern={}, alpha_pattern={})
    lying = copy_with(good, tmp_path / "lying", config=json.dumps(cfg).encode())
    one_line(r"stores rank \d but its config gives rank 5", base_plus_adapter, base, lying)


def test_nan_and_integer_factors_are_refused(tmp_path, good):
    ad = load_adapter_folder(good)
    q = "model.layers.0.self_attn.q_proj"
    a, b = ad.factors[q]
    nan = copy_with(good, tmp_path / "nan", tensors={tensor_key(q, "A"): a, tensor_key(q, "B"): b.clone().fill_(float("nan"))})
    one_line(r"lora_B\.weight holds NaN or Inf", load_adapter_folder, nan)
    ints = copy_with(good, tmp_path / "ints", tensors={tensor_key(q, "A"): a.long(), tensor_key(q, "B"): b})
    one_line("is torch.int64, not floating point", load_adapter_folder, ints)


def test_hostile_upload_is_one_line_and_leaves_nothing(tmp_path, good):
    from checkpoints.uploads import import_upload
    from checkpoints.workspace import WorkspaceConfig, WorkspaceManager

    ws = WorkspaceManager(WorkspaceConfig(root=tmp_path / "ws", max_age_seconds=60, max_bytes=50 * 2**20)).create()
    ad = load_adapter_folder(good)
    q = "model.layers.0.self_attn.q_proj"
    a, b = ad.factors[q]
    bad = copy_with(good, tmp_path / "upl", tensors={tensor_key(q, "A"): a, tensor_key(q, "B"): b[:, :2]})
    one_line("do not chain", import_upload, ws, [bad / CONFIG_NAME, bad / WEIGHTS_NAME])
    assert ws.items() == [] and (not ws.items_dir.exists() or not any(ws.items_dir.iterdir()))
    item = import_upload(ws, [good / CONFIG_NAME, good / WEIGHTS_NAME], name="fine")  # non-vacuity
    assert item.kind == "adapter"


# ---------------------------------------------------------------------------
# Layout facts from the architecture map
# ---------------------------------------------------------------------------


def test_layout_facts_are_declared_in_the_map():
    gpt2, llama = spec_for("gpt2"), spec_for("llama")
    names = {"h.0.mlp.c_fc.weight", "lm_head.weight"}  # a gpt2 checkpoint saved without "transformer."
    assert gpt2.weight_name("transformer.h.0.mlp.c_fc", names) == "h.0.mlp.c_fc.weight"
    assert gpt2.module_name("h.0.mlp.c_fc.weight") == "transformer.h.0.mlp.c_fc"
    assert gpt2.weight_name("transformer.h.1.mlp.c_fc", names) is None
    assert gpt2.module_transposed("transformer.h.0.mlp.c_fc") and not gpt2.module_transposed("lm_head")
    assert not llama.module_transposed("model.layers.0.mlp.down_proj")
    assert llama.module_name("model.layers.0.mlp.down_proj.weight") == "model.layers.0.mlp.down_proj"
    # tied heads: the config decides; without a word, gpt2 ties (GPT2Config's default) and llama does not
    assert gpt2.tied_head_names({}) == ["lm_head.weight"] and llama.tied_head_names({}) == []
    assert llama.tied_head_names({"tie_word_embeddings": True}) == ["lm_head.weight"]
    assert gpt2.tied_head_names({"tie_word_embeddings": False}) == []


# ---------------------------------------------------------------------------
# One job protocol
# ---------------------------------------------------------------------------


def test_mix_reports_through_a_job_and_stops_when_cancelled(tmp_path, tiny_llama_dir, good):
    from merging.adapters import AdapterEntry, AdapterMixRecipe, mix_adapters

    recipe = AdapterMixRecipe(str(tiny_llama_dir), [AdapterEntry(str(good), 0.5)], "cat", check_base_name=False)
    job = Job.recording()
    mix_adapters(recipe, tmp_path / "mixed", job=job, merge_into_base=True)
    fractions = [f for f, _ in job.events if f is not None]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert any("writing tensor" in text for _, text in job.events)  # the merge's steps come through its part
    stopped = Job.recording()
    stopped.cancel()
    with pytest.raises(Cancelled, match="cancelled; nothing was written"):
        mix_adapters(recipe, tmp_path / "stopped", job=stopped)
    assert not (tmp_path / "stopped").exists() and not list(tmp_path.glob(".stopped*"))
    # the old keywords (the app's, for this session) still drive the same job
    seen = []
    mix_adapters(recipe, tmp_path / "old", progress=lambda f, text: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0
    with pytest.raises(ValueError, match="not both"):  # a caller's mistake, not bad input
        mix_adapters(recipe, tmp_path / "both", job=Job(), progress=lambda f, text: None)


def test_adapter_gguf_export_reports_through_a_job(tmp_path, tiny_llama_dir, good):
    from merging.gguf_adapter import export_adapter_gguf

    job = Job.recording()
    export_adapter_gguf(good, tmp_path / "a.gguf", base=str(tiny_llama_dir), job=job)
    fractions = [f for f, _ in job.events if f is not None]
    assert (tmp_path / "a.gguf").is_file() and fractions and fractions[-1] == 1.0
    stopped = Job.recording()
    stopped.cancel()
    with pytest.raises(Cancelled):
        export_adapter_gguf(good, tmp_path / "b.gguf", base=str(tiny_llama_dir), job=stopped)
    assert not (tmp_path / "b.gguf").exists()
