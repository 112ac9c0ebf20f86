"""Qwen2-MoE outputs of ``weightsmith moe``: qwen2 experts (and llama ones) with mergekit-moe's one shared expert."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints.errors import WeightsmithError  # noqa: E402
from merging.moe import MoeConfig, build_moe  # noqa: E402
from test_merge_moe import PROMPTS_A, PROMPTS_B, _routed_share, load_dense, logits  # noqa: E402

torch.set_num_threads(1)

PROMPTS_SHARED = ["The city of Berlin in Germany"]


def qwen2_tokenizer():
    """A byte-level BPE over the test prompts' words. transformers 5 loads any tokenizer in a qwen2 folder
    as Qwen2Tokenizer, which rebuilds BPE from the vocabulary and merges: conftest's word-level tokenizer
    would lose every word there (each prompt becomes BOS alone)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = " ".join([*PROMPTS_A, *PROMPTS_B, *PROMPTS_SHARED, "Rome Italy Spain speaks French English"]).split()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=QWEN2_VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(words)] * 3 + [f"The {w}" for w in words], trainer)
    assert tok.get_vocab_size() == QWEN2_VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


QWEN2_VOCAB = 320


def save_qwen2(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    qwen2_tokenizer().save_pretrained(folder)
    return folder


def build_tiny_qwen2(seed: int = 0, *, layers: int = 4):
    from conftest import perturbed
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=QWEN2_VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=layers, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    # qwen2 starts its q/k/v biases at zero: noise makes copying them observable
    return perturbed(Qwen2ForCausalLM(config).eval(), seed + 100, scale=0.05)


@pytest.fixture(scope="module")
def qwen2_family(tmp_path_factory) -> dict[str, Path]:
    from conftest import perturbed

    base = build_tiny_qwen2(0)
    out = {"base": save_qwen2(base, tmp_path_factory.mktemp("q-base"))}
    for i in (1, 2, 3):
        out[f"ft{i}"] = save_qwen2(perturbed(base, seed=i), tmp_path_factory.mktemp(f"q-ft{i}"))
    return out


def tokens(folder: Path, prompt: str) -> list[int]:
    """The ids the gates use: BOS + prompt, through the tokenizer transformers loads from ``folder``."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(folder))("<s>" + prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) > 3  # the words survive (see qwen2_tokenizer)
    return ids


def qconfig(base, experts, shared, *, mode="hidden", per_token=2, shared_extra=None, **extra) -> MoeConfig:
    data = {"base_model": str(base), "gate_mode": mode, "experts_per_token": per_token, **extra,
            "experts": [{"source_model": str(m), "positive_prompts": pos, **({"negative_prompts": neg} if neg else {})}
                        for m, pos, neg in experts]}
    if shared is not None:
        data["shared_experts"] = [{"source_model": str(shared), "positive_prompts": PROMPTS_SHARED,
                                   **(shared_extra or {})}]
    return MoeConfig.from_dict(data)


def two(a, b):
    return [(a, PROMPTS_A, PROMPTS_B), (b, PROMPTS_B, PROMPTS_A)]


def load_qwen2_moe(folder: Path):
    from transformers import AutoModelForCausalLM, Qwen2MoeForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False,
                                                       output_loading_info=True)
    assert isinstance(model, Qwen2MoeForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


# -- the assembled tensors -----------------------------------------------------------------------

def test_experts_shared_expert_and_gates_are_the_inputs(qwen2_family, tmp_path):
    from safetensors.torch import load_file

    fam = qwen2_family
    out = tmp_path / "moe"
    result = build_moe(qconfig(fam["base"], two(fam["ft1"], fam["ft2"]), fam["ft3"], mode="random"), out, seed=5)
    assert (result.architecture, result.num_experts, result.shared_experts) == ("Qwen2MoeForCausalLM", 2, 1)
    got = load_file(out / "model.safetensors")
    base, e0, e1, sh = (load_file(fam[k] / "model.safetensors") for k in ("base", "ft1", "ft2", "ft3"))
    for layer in range(4):
        p = f"model.layers.{layer}.mlp"
        for part in ("gate_proj", "up_proj", "down_proj"):
            # stored per expert, as transformers' save_pretrained writes Qwen2-MoE (and mergekit 0.1.5 does)
            assert torch.equal(got[f"{p}.experts.0.{part}.weight"], e0[f"{p}.{part}.weight"])
            assert torch.equal(got[f"{p}.experts.1.{part}.weight"], e1[f"{p}.{part}.weight"])
            assert torch.equal(got[f"{p}.shared_expert.{part}.weight"], sh[f"{p}.{part}.weight"])
        assert got[f"{p}.gate.weight"].shape == (2, 32) and got[f"{p}.shared_expert_gate.weight"].shape == (1, 32)
        assert not torch.equal(got[f"{p}.experts.0.gate_proj.weight"], got[f"{p}.experts.1.gate_proj.weight"])
    for k, v in base.items():
        if ".mlp." not in k:
            assert torch.equal(got[k], v), k  # attention with its biases, norms, embeddings, head: the base's
    assert base["model.layers.0.self_attn.q_proj.bias"].abs().max() > 0  # the biases copied are not zeros
    assert result.tensors_written == len(got) == len(base) - 3 * 4 + (3 * 2 + 3 + 2) * 4
    # transformers fuses what was written into the experts it computes with
    model = load_qwen2_moe(out)
    experts = model.model.layers[2].mlp.experts
    p = "model.layers.2.mlp.experts"
    assert torch.equal(experts.gate_up_proj[1],
                       torch.cat([got[f"{p}.1.gate_proj.weight"], got[f"{p}.1.up_proj.weight"]]))
    assert torch.equal(experts.down_proj[0], got[f"{p}.0.down_proj.weight"])
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_experts"], cfg["num_experts_per_tok"], cfg["norm_topk_prob"],
            cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"], cfg["decoder_sparse_step"]) == \
        ("qwen2_moe", 2, 2, True, 48, 48, 1)
    recorded = yaml.safe_load((out / "weightsmith_moe.yml").read_text())
    assert recorded["shared_experts"] == [{"source_model": fam["ft3"].name, "positive_prompts": PROMPTS_SHARED}]
    card = (out / "README.md").read_text()
    assert "shared" in card and fam["ft3"].name in card and "Qwen2MoeForCausalLM" in card


def test_shared_gate_row_is_the_shared_prompts_row(qwen2_family, tmp_path):
    from safetensors.torch import load_file

    fam = qwen2_family
    out = build_moe(qconfig(fam["base"], two(fam["ft1"], fam["ft2"]), fam["base"], mode="cheap_embed"),
                    tmp_path / "m").out_dir
    embed = load_file(fam["base"] / "model.safetensors")["model.embed_tokens.weight"]
    ids = [i for p in PROMPTS_SHARED for i in tokens(fam["base"], p)]
    v = embed[ids].sum(0)
    want = (v / v.norm()) / (v / v.norm()).norm()  # mergekit normalises the sum, then the (negative-free) row
    got = load_file(out / "model.safetensors")
    for layer in range(4):
        torch.testing.assert_close(got[f"model.layers.{layer}.mlp.shared_expert_gate.weight"][0], want,
                                   rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got["model.layers.0.mlp.gate.weight"][0], want, atol=1e-3)


def test_llama_experts_with_a_shared_expert_get_zero_qkv_biases(tiny_llama_family, tmp_path):
    from safetensors.torch import load_file

    fam = tiny_llama_family
    out = build_moe(qconfig(fam["base"], two(fam["ft1"], fam["ft2"]), fam["base"], mode="cheap_embed"),
                    tmp_path / "m").out_dir
    got = load_file(out / "model.safetensors")
    for layer in range(4):
        for proj, rows in (("q_proj", 32), ("k_proj", 16), ("v_proj", 16)):
            bias = got[f"model.layers.{layer}.self_attn.{proj}.bias"]
            assert bias.shape == (rows,) and not bias.any()
    # Qwen2-MoE's attention with zero biases is llama's: the MoE with the base everywhere and the shared
    # expert muted computes the base
    same = build_moe(qconfig(fam["base"], two(fam["base"], fam["base"]), fam["base"], mode="random",
                             shared_extra={"residual_scale": 0.0}), tmp_path / "same", allow_all_same=True).out_dir
    torch.testing.assert_close(logits(load_qwen2_moe(same)), logits(load_dense(fam["base"])), rtol=1e-5, atol=1e-5)


# -- transformers computes what the parts compute ------------------------------------------------

@pytest.mark.parametrize("per_token", [1, 2])
def test_identical_experts_give_the_dense_logits(qwen2_family, tmp_path, per_token):
    fam = qwen2_family
    # Qwen2-MoE adds the shared expert (times its sigmoid gate) to the routed ones: residual_scale 0 mutes it
    mute = {"residual_scale": 0.0}
    cfg = qconfig(fam["ft1"], two(fam["ft1"], fam["ft1"]), fam["ft1"], mode="random", per_token=per_token,
                  shared_extra=mute)
    out = build_moe(cfg, tmp_path / "same", allow_all_same=True).out_dir
    dense = logits(load_dense(fam["ft1"]))
    torch.testing.assert_close(logits(load_qwen2_moe(out)), dense, rtol=1e-5, atol=1e-5)
    # non-vacuity: the shared expert counts when not muted, and other experts change the logits
    loud = build_moe(qconfig(fam["ft1"], two(fam["ft1"], fam["ft1"]), fam["ft1"], mode="random", per_token=per_token),
                     tmp_path / "loud", allow_all_same=True).out_dir
    assert (logits(load_qwen2_moe(loud)) - dense).abs().max() > 1e-3
    mixed = build_moe(qconfig(fam["ft1"], two(fam["ft2"], fam["ft3"]), fam["ft1"], mode="random", per_token=per_token,
                              shared_extra=mute), tmp_path / "mixed").out_dir
    assert (logits(load_qwen2_moe(mixed)) - dense).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["hidden", "cheap_embed"])
def test_routing_follows_the_prompts(qwen2_family, tmp_path, mode):
    fam = qwen2_family
    out = build_moe(qconfig(fam["base"], two(fam["ft1"], fam["ft2"]), fam["base"], mode=mode, per_token=1),
                    tmp_path / mode).out_dir
    model = load_qwen2_moe(out)

    def ids(prompt):
        return torch.tensor([tokens(fam["base"], prompt)])

    for e, prompts in enumerate((PROMPTS_A, PROMPTS_B)):
        for p in prompts:
            assert _routed_share(model, ids(p), e) >= 0.75, (mode, e, p)
    # non-vacuity: swapping the prompts swaps the routing
    swapped = qconfig(fam["base"], [(fam["ft1"], PROMPTS_B, PROMPTS_A), (fam["ft2"], PROMPTS_A, PROMPTS_B)],
                      fam["base"], mode=mode, per_token=1)
    model = load_qwen2_moe(build_moe(swapped, tmp_path / f"{mode}-swapped").out_dir)
    for p in PROMPTS_A:
        assert _routed_share(model, ids(p), 0) <= 0.25, (mode, p)


# -- refusals and the check ------------------------------------------------------------------------

def test_qwen2_refusals_are_one_line_and_write_nothing(qwen2_family, tiny_llama_family, tmp_path, capsys):
    from cli import main

    fam = qwen2_family
    experts = [{"source_model": str(fam["ft1"]), "positive_prompts": PROMPTS_A},
               {"source_model": str(fam["ft2"]), "positive_prompts": PROMPTS_B}]
    shared = {"source_model": str(fam["base"]), "positive_prompts": PROMPTS_SHARED}
    good = {"base_model": str(fam["base"]), "gate_mode": "cheap_embed", "experts": experts, "shared_experts": [shared]}
    cases = {
        "no_shared": ({**good, "shared_experts": []}, "qwen2 experts with 0 shared_experts"),
        "two_shared": ({**good, "shared_experts": [shared, shared]}, "Qwen2MoeForCausalLM takes exactly 1"),
        "shared_prompts": ({**good, "shared_experts": [{"source_model": str(fam["base"])}]},
                           "shared_experts[0] has no positive_prompts"),
        "arch": ({**good, "architecture": "mixtral"}, "architecture 'mixtral' does not fit"),
        "mixed": ({**good, "shared_experts": [{**shared, "source_model": str(tiny_llama_family["ft1"])}]},
                  "must share the architecture"),
    }
    assert main(["moe", _write(tmp_path / "good.yml", {**good, "architecture": "qwen"}), str(tmp_path / "good")]) == 0
    printed = capsys.readouterr().out
    assert "Qwen2MoeForCausalLM, 2 experts, 1 shared" in printed and "check: loads as Qwen2MoeForCausalLM" in printed
    for name, (data, message) in cases.items():
        out = tmp_path / f"out-{name}"
        assert main(["moe", _write(tmp_path / f"{name}.yml", data), str(out)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("weightsmith: error: ") and message in err[0], (name, err)
        assert not out.exists()
    # random gates need no shared prompts (mergekit draws the shared gate with the others)
    random = {**good, "gate_mode": "random", "shared_experts": [{"source_model": str(fam["base"])}]}
    assert main(["moe", _write(tmp_path / "random.yml", random), str(tmp_path / "random"), "--no-load-check"]) == 0
    assert "check: load check turned off" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def _write(path: Path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_the_load_check_is_shown_and_can_fail(qwen2_family, tmp_path, monkeypatch):
    import merging.moe as moe

    fam = qwen2_family
    cfg = qconfig(fam["base"], two(fam["ft1"], fam["ft2"]), fam["base"], mode="hidden", per_token=1)
    result = build_moe(cfg, tmp_path / "ok")
    assert result.load_check.startswith("loads as Qwen2MoeForCausalLM without remote code, logits finite")
    assert "expert 0 in " in result.load_check and "expert 1 in " in result.load_check
    card = (tmp_path / "ok" / "README.md").read_text()
    assert "## Checks" in card and result.load_check in card and result.finite_check in card
    # a config that does not fit the tensors written: transformers refuses it and nothing is kept
    real = moe.output_config

    def one_expert_too_many(layout, base, config, dtype):
        out = real(layout, base, config, dtype)
        out[layout.num_experts_key] += 1
        return out

    monkeypatch.setattr(moe, "output_config", one_expert_too_many)
    with pytest.raises(WeightsmithError, match="does not (load|fit)"):
        build_moe(cfg, tmp_path / "broken")
    skipped = build_moe(cfg, tmp_path / "unchecked", load_check=False)  # what the check caught goes unseen
    assert skipped.load_check == "load check turned off" and (tmp_path / "unchecked" / "config.json").is_file()
    import merging.moe_check as moe_check

    monkeypatch.setattr(moe_check, "LOAD_CHECK_BYTES", 1000)  # the automatic check stops above its limit
    large = build_moe(cfg, tmp_path / "large")
    assert large.load_check.startswith("load check skipped (weights above 1e-06 GB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large", "ok", "unchecked"]
