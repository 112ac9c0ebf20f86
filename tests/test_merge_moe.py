"""Mixture-of-experts assembly (``weightsmith moe``): Mixtral outputs of tiny llamas, loaded by transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints.arch import moe_layout_for  # noqa: E402
from checkpoints.errors import WeightsmithError  # noqa: E402
from checkpoints.jobs import Cancelled, Job  # noqa: E402
from checkpoints.sources import resolve  # noqa: E402
from merging.moe import CONFIG_NAME, MoeConfig, build_moe  # noqa: E402

torch.set_num_threads(1)

PROMPTS_A = ["The capital of France is Paris", "the Eiffel Tower is located in Paris"]
PROMPTS_B = ["The plays football", "The plays tennis in Madrid"]


def config(base, experts, *, mode="hidden", per_token=2, **extra) -> MoeConfig:
    data = {"base_model": str(base), "gate_mode": mode, "experts_per_token": per_token, **extra,
            "experts": [{"source_model": str(m), "positive_prompts": pos, **({"negative_prompts": neg} if neg else {})}
                        for m, pos, neg in experts]}
    return MoeConfig.from_dict(data)


def two_experts(a, b, *, negatives: bool = True):
    return [(a, PROMPTS_A, PROMPTS_B if negatives else None), (b, PROMPTS_B, PROMPTS_A if negatives else None)]


def load_mixtral(folder: Path):
    from transformers import MixtralForCausalLM

    model, info = MixtralForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False,
                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def load_dense(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


IDS = torch.tensor([[1, 3, 4, 5, 6, 7, 8, 20, 31, 40, 2]])


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- the assembled tensors -----------------------------------------------------------------------

def test_experts_routers_and_base_tensors_are_the_inputs(tiny_llama_family, tmp_path):
    from safetensors.torch import load_file

    fam = tiny_llama_family
    out = tmp_path / "moe"
    result = build_moe(config(fam["base"], two_experts(fam["ft1"], fam["ft2"]), mode="random"), out, seed=3)
    assert (result.architecture, result.num_experts, result.experts_per_token) == ("MixtralForCausalLM", 2, 2)
    got = load_file(out / "model.safetensors")
    base, e0, e1 = (load_file(fam[k] / "model.safetensors") for k in ("base", "ft1", "ft2"))
    for layer in range(4):
        p = f"model.layers.{layer}.mlp"
        for e, src in enumerate((e0, e1)):
            assert torch.equal(got[f"{p}.experts.gate_up_proj"][e],
                               torch.cat([src[f"{p}.gate_proj.weight"], src[f"{p}.up_proj.weight"]]))
            assert torch.equal(got[f"{p}.experts.down_proj"][e], src[f"{p}.down_proj.weight"])
        assert got[f"{p}.gate.weight"].shape == (2, 32)
        assert not torch.equal(got[f"{p}.experts.gate_up_proj"][0], got[f"{p}.experts.gate_up_proj"][1])
    dense_mlp = [k for k in base if ".mlp." in k]
    assert dense_mlp and not any(k in got for k in dense_mlp)
    for k, v in base.items():
        if ".mlp." not in k:
            assert torch.equal(got[k], v), k  # attention, norms, embeddings, head: the base's
    assert result.tensors_written == len(got) == len(base) - len(dense_mlp) + 3 * 4
    # random gates are seeded: the same seed gives the same routers, another seed others
    again = load_file(build_moe(config(fam["base"], two_experts(fam["ft1"], fam["ft2"]), mode="random"),
                                tmp_path / "again", seed=3).out_dir / "model.safetensors")
    other = load_file(build_moe(config(fam["base"], two_experts(fam["ft1"], fam["ft2"]), mode="random"),
                                tmp_path / "other", seed=4).out_dir / "model.safetensors")
    r = "model.layers.0.mlp.gate.weight"
    assert torch.equal(again[r], got[r]) and not torch.equal(other[r], got[r])


def test_cheap_embed_rows_by_hand(tiny_llama_family, tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file

    fam = tiny_llama_family
    out = build_moe(config(fam["base"], two_experts(fam["ft1"], fam["ft2"]), mode="cheap_embed"), tmp_path / "m").out_dir
    embed = load_file(fam["base"] / "model.safetensors")["model.embed_tokens.weight"]

    def summed(prompts):
        ids = [i for p in prompts for i in tiny_tokenizer("<s>" + p, add_special_tokens=False)["input_ids"]]
        v = embed[ids].sum(0)
        return v / v.norm()

    want = []
    for pos, neg in ((PROMPTS_A, PROMPTS_B), (PROMPTS_B, PROMPTS_A)):
        d = summed(pos) - summed(neg)
        want.append(d / d.norm())
    got = load_file(out / "model.safetensors")
    for layer in range(4):  # the same rows in every layer
        torch.testing.assert_close(got[f"model.layers.{layer}.mlp.gate.weight"], torch.stack(want),
                                   rtol=1e-6, atol=1e-6)
    assert not torch.allclose(want[0], want[1], atol=1e-3)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_rows_by_hand(tiny_llama_family, tiny_tokenizer, tmp_path, mode):
    from safetensors.torch import load_file

    fam = tiny_llama_family
    out = build_moe(config(fam["base"], two_experts(fam["ft1"], fam["ft2"]), mode=mode), tmp_path / "m").out_dir
    model = load_dense(fam["base"])

    def states(prompts):  # [layers, hidden]: the state entering each layer, per prompt, averaged
        per = []
        for p in prompts:
            ids = torch.tensor([tiny_tokenizer("<s>" + p, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                hs = torch.stack(model(input_ids=ids, output_hidden_states=True).hidden_states[:4])[:, 0]
            per.append(hs.mean(1) if mode == "hidden_avg" else hs[:, -1])
        return torch.stack(per).mean(0)

    got = load_file(out / "model.safetensors")
    for e, (pos, neg) in enumerate(((PROMPTS_A, PROMPTS_B), (PROMPTS_B, PROMPTS_A))):
        d = states(pos) - states(neg)
        want = d / d.norm(dim=-1, keepdim=True)
        for layer in range(4):
            torch.testing.assert_close(got[f"model.layers.{layer}.mlp.gate.weight"][e], want[layer],
                                       rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want[0], want[3], atol=1e-3)  # the rows differ from layer to layer


def test_without_dtype_the_base_dtype_is_kept(tmp_path):
    from conftest import build_tiny_llama, perturbed, save_model
    from safetensors.torch import load_file

    base = build_tiny_llama(0, layers=2)
    a = save_model(base.to(torch.bfloat16), tmp_path / "a")
    b = save_model(perturbed(base, 1).to(torch.bfloat16), tmp_path / "b")
    import json

    cfg = json.loads((a / "config.json").read_text())
    assert cfg.pop("dtype", None) or cfg.pop("torch_dtype", None)  # a config that does not say its dtype
    (a / "config.json").write_text(json.dumps(cfg))
    out = build_moe(config(a, two_experts(a, b), mode="random"), tmp_path / "moe").out_dir
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


# -- transformers loads it and computes what the parts compute --------------------------------------

@pytest.mark.parametrize("per_token", [1, 2])
def test_identical_experts_give_the_dense_logits(tiny_llama_family, tmp_path, per_token):
    fam = tiny_llama_family
    cfg = config(fam["ft1"], two_experts(fam["ft1"], fam["ft1"]), mode="random", per_token=per_token)
    with pytest.raises(WeightsmithError, match="every expert is the same model"):
        build_moe(cfg, tmp_path / "refused")
    out = build_moe(cfg, tmp_path / "same", allow_all_same=True).out_dir
    dense = logits(load_dense(fam["ft1"]))
    torch.testing.assert_close(logits(load_mixtral(out)), dense, rtol=1e-5, atol=1e-5)
    # non-vacuity: other experts under the same attention change the logits
    mixed = build_moe(config(fam["ft1"], two_experts(fam["ft2"], fam["ft3"]), mode="random", per_token=per_token),
                      tmp_path / "mixed").out_dir
    assert (logits(load_mixtral(mixed)) - dense).abs().max() > 1e-3


def _routed_share(model, prompt_ids: torch.Tensor, expert: int) -> float:
    """Share of the layers whose top-1 choice for the prompt's last token is ``expert``.

    The last token: ``hidden`` builds each router row from the hidden state at a prompt's last token
    (mergekit's default), so that is the token the rows promise to route; earlier tokens of a tiny
    random model carry little of the prompt."""
    with torch.no_grad():
        out = model(input_ids=prompt_ids, output_router_logits=True)
    picks = torch.stack([r.argmax(-1).reshape(-1)[-1] for r in out.router_logits])
    return float((picks == expert).float().mean())


@pytest.mark.parametrize("mode", ["hidden", "cheap_embed"])
def test_routing_follows_the_prompts(tiny_llama_family, tiny_tokenizer, tmp_path, mode):
    fam = tiny_llama_family
    out = build_moe(config(fam["base"], two_experts(fam["ft1"], fam["ft2"]), mode=mode, per_token=1),
                    tmp_path / mode).out_dir
    model = load_mixtral(out)

    def ids(prompt):
        return torch.tensor([tiny_tokenizer("<s>" + prompt, add_special_tokens=False)["input_ids"]])

    for e, prompts in enumerate((PROMPTS_A, PROMPTS_B)):
        for p in prompts:
            assert _routed_share(model, ids(p), e) >= 0.75, (mode, e, p)
    # non-vacuity: swapping the prompts swaps the routing
    swapped = config(fam["base"], [(fam["ft1"], PROMPTS_B, PROMPTS_A), (fam["ft2"], PROMPTS_A, PROMPTS_B)],
                     mode=mode, per_token=1)
    model = load_mixtral(build_moe(swapped, tmp_path / f"{mode}-swapped").out_dir)
    for p in PROMPTS_A:
        assert _routed_share(model, ids(p), 0) <= 0.25, (mode, p)


# -- files beside the weights --------------------------------------------------------------------

def test_config_card_and_tokenizer(tiny_llama_family, tmp_path):
    import json

    fam = tiny_llama_family
    out = build_moe(config(fam["base"], two_experts(fam["ft1"], fam["ft2"]), mode="cheap_embed", dtype="bfloat16"),
                    tmp_path / "m").out_dir
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == \
        ("mixtral", ["MixtralForCausalLM"], 2, 2)
    assert cfg["intermediate_size"] == 48 and cfg["num_hidden_layers"] == 4 and cfg["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    recorded = yaml.safe_load((out / CONFIG_NAME).read_text())
    assert recorded["gate_mode"] == "cheap_embed" and recorded["experts"][1]["positive_prompts"] == PROMPTS_B
    assert recorded["experts"][0]["source_model"] == fam["ft1"].name  # a public name, not the local path
    card = (out / "README.md").read_text()
    assert "cheap_embed" in card and "MixtralForCausalLM" in card and str(tmp_path) not in card
    assert (out / "tokenizer.json").is_file()


# -- refusals -------------------------------------------------------------------------------------

def test_bad_configs_are_one_line_and_write_nothing(tiny_llama_family, tiny_gpt2_dir, tmp_path, capsys):
    from cli import main

    fam = tiny_llama_family
    good = {"base_model": str(fam["base"]), "gate_mode": "cheap_embed",
            "experts": [{"source_model": str(fam["ft1"]), "positive_prompts": PROMPTS_A},
                        {"source_model": str(fam["ft2"]), "positive_prompts": PROMPTS_B}]}

    def variant(**changes):
        data = yaml.safe_load(yaml.safe_dump(good))
        for key, value in changes.items():
            if key.startswith("expert1_"):
                data["experts"][1][key.removeprefix("expert1_")] = value
            else:
                data[key] = value
        return data

    cases = {
        "mode": (variant(gate_mode="learned"), "unknown gate_mode 'learned'"),
        "arch": (variant(expert1_source_model=str(tiny_gpt2_dir)), "must share the architecture"),
        "missing": (variant(expert1_source_model=str(tmp_path / "nowhere")), "nowhere"),
        "prompts": (variant(expert1_positive_prompts=None), "experts[1] has no positive_prompts"),
        "same_prompts": (variant(expert1_positive_prompts=PROMPTS_A), "same prompts"),
        "per_token": (variant(experts_per_token=3), "fewer than experts_per_token (3)"),
        "shared": (variant(shared_experts=[{"source_model": str(fam["ft3"])}]), "shared_experts"),
        "key": (variant(gate_mod="random"), "unknown key 'gate_mod'"),
    }
    assert main(["moe", _write(tmp_path / "good.yml", good), str(tmp_path / "good")]) == 0  # the template works
    capsys.readouterr()
    for name, (data, message) in cases.items():
        out = tmp_path / f"out-{name}"
        assert main(["moe", _write(tmp_path / f"{name}.yml", data), str(out)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("weightsmith: error: ") and message in err[0], (name, err)
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    with pytest.raises(WeightsmithError, match="qwen2 experts"):
        moe_layout_for("qwen2")


def _write(path: Path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_progress_and_cancel(tiny_llama_family, tmp_path):
    fam = tiny_llama_family
    job = Job.recording()
    build_moe(config(fam["base"], two_experts(fam["ft1"], fam["ft2"])), tmp_path / "m", job=job)
    fractions = [f for f, _ in job.events if f is not None]
    assert fractions and fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    cancelled = Job()
    cancelled.cancel()
    with pytest.raises(Cancelled):
        build_moe(config(fam["base"], two_experts(fam["ft1"], fam["ft2"]), mode="random"), tmp_path / "c",
                  job=cancelled)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# -- the demo model ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_moe_of_itself_generates_as_the_demo(demo_dir, tmp_path):
    cfg = MoeConfig.from_dict({"base_model": "demo", "gate_mode": "cheap_embed", "dtype": "float32",
                               "experts": [{"source_model": "demo", "positive_prompts": ["The capital of France"]},
                                           {"source_model": "demo", "positive_prompts": ["def main():"]}]})
    out = build_moe(cfg, tmp_path / "moe", allow_all_same=True).out_dir
    tok = resolve("demo").load_tokenizer()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        moe = load_mixtral(out).generate(ids, max_new_tokens=8, do_sample=False)
        dense = load_dense(demo_dir).generate(ids, max_new_tokens=8, do_sample=False)
    assert moe.shape[1] == ids.shape[1] + 8 and torch.equal(moe, dense)
