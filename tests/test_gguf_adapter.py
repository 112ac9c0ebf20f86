"""LoRA adapters to GGUF (PEFT adapters, ROME's rank-1 adapters), the export-gguf CLI, and one demo-model test.

An adapter file is checked the way llama.cpp uses it: for every adapted weight,
``(alpha / r) · lora_b @ lora_a`` read back from the file must equal the ΔW that
PEFT (or the ROME edit) adds to that weight, brought into llama.cpp's
orientation independently (:func:`checkpoints.gguf_check.llama_rows`, a transpose
for GPT-2's Conv1D).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cli import main
from checkpoints.errors import WeightsmithError
from checkpoints.gguf_check import decode, llama_rows
from merging.gguf_adapter import export_adapter_gguf

from test_gguf_export import _reader, _save


def _gguf_deltas(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """{base tensor name: (alpha / r) · B @ A} as llama.cpp computes it from the file."""
    r = _reader(path)
    alpha = float(r.fields["adapter.lora.alpha"].contents())
    arrays = {t.name: decode(t.data, t.tensor_type.name, tuple(int(s) for s in reversed(t.shape))) for t in r.tensors}
    deltas = {}
    for name, a in arrays.items():
        if name.endswith(".lora_a"):
            base = name[: -len(".lora_a")]
            b = arrays[base + ".lora_b"]
            deltas[base] = alpha / a.shape[0] * (b.astype(np.float64) @ a.astype(np.float64))
    return deltas, {k: r.fields[k].contents() for k in ("general.type", "adapter.type", "general.architecture")}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    from conftest import build_tiny_gpt2, build_tiny_llama

    root = tmp_path_factory.mktemp("gguf-lora-bases")
    return {"llama": _save(build_tiny_llama(0), root / "llama"), "gpt2": _save(build_tiny_gpt2(0), root / "gpt2")}


LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "mlp.down_proj": "ffn_down"}
GPT2_NAMES = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_adapter_exports_the_delta_llama_cpp_applies(bases, arch, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(bases[arch])
    if arch == "llama":  # per-module ranks and alphas: one global alpha cannot express them
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                         rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 6}, init_lora_weights=False)
    else:
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                         init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    result = export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", base=str(bases[arch]))
    deltas, meta = _gguf_deltas(result.path)
    assert meta == {"general.type": "adapter", "adapter.type": "lora", "general.architecture": arch}
    names = LLAMA_NAMES if arch == "llama" else GPT2_NAMES
    prefix = "model.layers" if arch == "llama" else "transformer.h"
    heads = {"attn_q": 4, "attn_k": 2}
    expected = {}
    for block in range(4):
        for module, short in names.items():
            layer = peft_model.base_model.model.get_submodule(f"{prefix}.{block}.{module}")
            dw = layer.get_delta_weight("default").detach().double().numpy()  # stored layout
            if arch == "gpt2":
                dw = dw.T  # Conv1D stores [in, out]; llama.cpp wants [out, in]
            elif short in heads:
                dw = dw[llama_rows(dw.shape[0], heads[short])]
            expected[f"blk.{block}.{short}.weight"] = dw
    assert set(deltas) == set(expected)
    for name, dw in expected.items():
        assert np.abs(dw).max() > 1e-3  # non-vacuous
        np.testing.assert_allclose(deltas[name], dw, atol=1e-6, rtol=1e-5, err_msg=name)
    if arch == "llama":  # the fold of PEFT's per-module scaling into B is what makes down_proj right
        a = next(t for t in _reader(result.path).tensors if t.name == "blk.0.ffn_down.weight.lora_a")
        assert a.shape[1] == 2  # rank 2 there, 4 elsewhere
    # the library's own check (what the app shows) agrees, and catches a wrong scale and a flipped byte
    from checkpoints.sources import resolve
    from merging.adapters import load_adapter
    from merging.gguf_adapter import check_adapter_gguf

    adapter, base = load_adapter(tmp_path / "adapter"), resolve(bases[arch])
    assert check_adapter_gguf(result.path, adapter, base).ok
    adapter.config["lora_alpha"] = 16
    assert not check_adapter_gguf(result.path, adapter, base).ok
    adapter.config["lora_alpha"] = 8
    q8 = export_adapter_gguf(tmp_path / "adapter", tmp_path / "q8.gguf", base=str(bases[arch]), qtype="q8_0")
    report = check_adapter_gguf(q8.path, adapter, base)
    assert report.ok and report.worst_ratio > 0.01, report.failures
    t = next(t for t in _reader(q8.path).tensors if t.name.endswith(".lora_a") and t.tensor_type.name == "Q8_0")
    with open(q8.path, "r+b") as f:
        f.seek(int(t.data_offset) + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    assert not check_adapter_gguf(q8.path, adapter, base).ok


def test_rome_rank_one_adapter_exports_the_edit(bases, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editing.request import EditRequest
    from editing.rome import RomeHyperParams
    from editing.session import EditSession
    from editing.stats import StatsCache, corpus_from_file

    model = AutoModelForCausalLM.from_pretrained(bases["llama"]).eval()
    tok = AutoTokenizer.from_pretrained(bases["llama"])
    (tmp_path / "corpus.txt").write_text("The capital of France is Paris. The Eiffel Tower is in Paris.\n" * 40)
    corpus = corpus_from_file(tmp_path / "corpus.txt")
    hp = RomeHyperParams(v_steps=10, prefix_lengths=((2, 1),), v_lr=0.5, clamp_norm_factor=10.0)
    s = EditSession(model, tok, stats=StatsCache(tmp_path / "stats"), hparams=hp, corpus=corpus,
                    base_name="test-org/tiny", method="r-rome")  # ROME's rank-one update, not the default MEMIT
    s.apply(EditRequest("The {} is located in the city of", "Eiffel Tower", "Rome", layer=1))
    s.apply(EditRequest("The capital of {} is", "France", "Rome", layer=1))
    s.apply(EditRequest("The {} is located in", "Eiffel Tower", "Berlin", layer=2))
    adapter = s.export_adapter(tmp_path / "rome")
    result = export_adapter_gguf(adapter, tmp_path / "rome.gguf", base=str(bases["llama"]), qtype="f32")
    deltas, meta = _gguf_deltas(result.path)
    assert meta["general.type"] == "adapter"
    expected: dict[str, np.ndarray] = {}
    for e in s.edits:
        for pname, d in e.deltas.items():
            block = int(pname.split(".")[2])
            name = f"blk.{block}.ffn_down.weight"
            expected[name] = expected.get(name, 0) + s.spec.as_out_in(d).double().numpy()
    assert set(deltas) == set(expected) == {"blk.1.ffn_down.weight", "blk.2.ffn_down.weight"}
    for name, dw in expected.items():
        assert np.abs(dw).max() > 1e-4
        np.testing.assert_allclose(deltas[name], dw, atol=1e-6, rtol=1e-5, err_msg=name)


def test_cli_exports_models_and_adapters(bases, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(bases["llama"]),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "ad")
    assert main(["export-gguf", str(bases["llama"]), str(tmp_path / "m.gguf"), "--type", "q5_0"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("wrote m.gguf: ") and ", q5_0, 39 tensors (" in line and "\n" not in line
    assert main(["export-gguf", str(bases["llama"]), str(tmp_path / "m.gguf"), "--type", "q4_1", "--overwrite",
                 "--check"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("read back 39 tensors: every value within")
    assert main(["export-gguf", str(tmp_path / "ad"), str(tmp_path / "a.gguf"), "--type", "q8_0",
                 "--base", str(bases["llama"]), "--check"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("wrote adapter a.gguf: ") and out[1].startswith("read back 8 tensors: every value")
    assert {t.name for t in _reader(tmp_path / "a.gguf").tensors} == {
        f"blk.{i}.attn_q.weight.lora_{x}" for i in range(4) for x in "ab"}
    # adapters: only the types llama.cpp's LoRA converter offers; one line, exit 2, nothing written
    assert main(["export-gguf", str(tmp_path / "ad"), str(tmp_path / "b.gguf"), "--type", "q4_0",
                 "--base", str(bases["llama"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not offered for LoRA adapters" in err and not (tmp_path / "b.gguf").exists()
    # an adapter for another base: shape check names the module
    assert main(["export-gguf", str(tmp_path / "ad"), str(tmp_path / "c.gguf"), "--base", str(bases["gpt2"])]) == 2
    assert "error" in capsys.readouterr().err and not (tmp_path / "c.gguf").exists()


def test_adapter_export_refuses_bad_input(bases, tmp_path):
    with pytest.raises(WeightsmithError, match="no adapter_config.json"):
        export_adapter_gguf(bases["llama"], tmp_path / "x.gguf", base=str(bases["llama"]))


@pytest.mark.slow
def test_demo_exports_generate_like_the_source(demo_dir, tmp_path):
    """`weightsmith export-gguf demo out.gguf --type f16|q8_0`: read back within bounds, transformers loads both.

    f16 must give the source's greedy text. q8_0 moves this model's logits by up to ~0.7, so it may
    flip a choice the source itself makes by less than that (measured: "Water boils at 100°C" has
    "°" ahead of " " by 0.066); checked along the source's greedy path, every step where the source's
    margin exceeds the logits' deviation must agree, and the rest are counted.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from checkpoints.gguf_check import check_gguf
    from checkpoints.sources import resolve

    src = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(demo_dir)
    prompts = ["The capital of France is", "The Eiffel Tower is located in the city of", "def fibonacci(n):",
               "Water boils at"]
    for qtype in ("f16", "q8_0"):
        name = f"demo-{qtype}.gguf"
        assert main(["export-gguf", "demo", str(tmp_path / name), "--type", qtype]) == 0
        if qtype == "q8_0":
            report = check_gguf(tmp_path / name, resolve("demo"))
            assert report.ok and report.tensors == 272, report.failures
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=name, dtype=torch.float32).eval()
        gtok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=name)
        decided = flips = 0
        for prompt in prompts:
            assert gtok(prompt).input_ids == tok(prompt).input_ids
            ids = tok(prompt, return_tensors="pt").input_ids
            path = src.generate(ids, max_new_tokens=12, do_sample=False)
            if qtype == "f16":
                assert loaded.generate(ids, max_new_tokens=12, do_sample=False).tolist() == path.tolist(), prompt
            with torch.no_grad():
                a, b = src(path).logits[0, ids.shape[1] - 1:-1], loaded(path).logits[0, ids.shape[1] - 1:-1]
            dev = (a - b).abs().max(dim=-1).values
            assert dev.max() > 0  # the export is not the source's own bits
            for step in range(a.shape[0]):
                mine, theirs = int(a[step].argmax()), int(b[step].argmax())
                margin = float(a[step, mine] - a[step, theirs])
                if mine != theirs:
                    flips += 1
                    assert margin <= 2 * float(dev[step]), (prompt, step)  # only a near tie may flip
                else:
                    decided += 1
        assert decided >= 0.9 * (decided + flips), (qtype, decided, flips)
        if qtype == "f16":
            assert flips == 0
