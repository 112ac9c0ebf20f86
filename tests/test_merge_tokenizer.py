"""Tokenizer merges and chat templates (issue 14 item 2), with mergekit 0.1.5's semantics.

The family (tests/tiny_vocab.py): base has ``dog``; ft1 has the common words in
another id order plus ``apple``, ``dog``, ``banana``; ft2 lacks ``dog`` and has
``banana``, ``cherry``. Hand-computed rows follow mergekit's rule for a token a
model lacks: the only model that has it gives its row; else the base's row;
else the mean of the rows that exist.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from checkpoints.errors import WeightsmithError
from merging.chat_template import BUNDLED
from merging.engine import run_merge
from merging.recipe import MergeRecipe
from tiny_vocab import (VOCABS, config, max_token_diff, mergekit_cases, tensors, token_rows,
                        vocabulary)
from tiny_vocab import linear_recipe as linear
from tiny_vocab import task_arithmetic_recipe as task_arithmetic

MERGEKIT_VENV = Path(os.environ.get("WEIGHTSMITH_MERGEKIT_VENV", "/work/mergekit-venv"))
MERGEKIT_TEMPLATES = MERGEKIT_VENV / "lib/python3.11/site-packages/mergekit/_data/chat_templates"
MERGEKIT_YAML = MERGEKIT_VENV / "bin" / "mergekit-yaml"
# Checked before any fixture is built, so CI (no mergekit venv) skips these at once.
needs_mergekit = pytest.mark.skipif(not (MERGEKIT_YAML.exists() and MERGEKIT_TEMPLATES.is_dir()),
                                    reason=f"mergekit 0.1.5 venv not found at {MERGEKIT_VENV} "
                                           "(bench/merge_vs_mergekit.py makes it); CI has none")
TEMPLATE_A = "{% for m in messages %}A: {{ m['content'] }}\n{% endfor %}"
TEMPLATE_B = "{% for m in messages %}B|{{ m['role'] }}|{{ m['content'] }}\n{% endfor %}\n"
UNION = sorted(set().union(*map(set, VOCABS.values())))
LLAMA_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    from tiny_vocab import build_vocab_family

    return build_vocab_family(tmp_path_factory.mktemp("vocab"),
                              templates={"base": TEMPLATE_A, "ft1": TEMPLATE_B, "ft2": TEMPLATE_B})


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> dict[str, Path]:
    from tiny_vocab import build_vocab_family

    return build_vocab_family(tmp_path_factory.mktemp("vocab-tied"), tie=True)


def merge(text: str, out: Path) -> Path:
    run_merge(MergeRecipe.from_yaml(text), out)
    return out


def rows(f: dict[str, Path], name: str) -> dict[str, dict[str, torch.Tensor]]:
    return {m: token_rows(f[m], name) for m in ("base", "ft1", "ft2")}


# -- the merged vocabulary ------------------------------------------------------------------------------

def test_union_tokenizer_encodes_every_models_tokens(fam, tmp_path):
    from transformers import AutoTokenizer

    out = merge(linear(fam, "tokenizer_source: union\n"), tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert sorted(tok.get_vocab()) == UNION
    assert config(out)["vocab_size"] == len(UNION) == tensors(out)["model.embed_tokens.weight"].shape[0]
    text = "the apple banana cherry dog of Paris"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert [tok.convert_ids_to_tokens(i) for i in ids] == text.split()
    # Non-vacuity: the base's own tokenizer cannot say apple, banana or cherry.
    base = AutoTokenizer.from_pretrained(str(fam["base"]))
    assert base.convert_ids_to_tokens(base(text, add_special_tokens=False)["input_ids"]).count("<unk>") == 3
    # The base's tokens keep the base's ids; new ones follow.
    assert all(tok.get_vocab()[w] == i for i, w in enumerate(VOCABS["base"]))


@pytest.mark.parametrize("name", LLAMA_VOCAB)
def test_union_rows_follow_mergekits_rule_by_hand(fam, tmp_path, name):
    out = merge(linear(fam, "tokenizer: {source: union}\n"), tmp_path / "out")
    got = token_rows(out, name)
    r = rows(fam, name)
    b, f1, f2 = r["base"], r["ft1"], r["ft2"]
    expected = {
        "the": 0.5 * b["the"] + 0.3 * f1["the"] + 0.2 * f2["the"],      # everywhere: each model's own row
        "dog": 0.5 * b["dog"] + 0.3 * f1["dog"] + 0.2 * b["dog"],      # ft2 lacks it: the base's row
        "apple": f1["apple"],                                          # only ft1 has it: ft1's row everywhere
        "banana": 0.5 * (f1["banana"] + f2["banana"]) / 2 + 0.3 * f1["banana"] + 0.2 * f2["banana"],  # mean
        "cherry": f2["cherry"],
    }
    for tok, want in expected.items():
        torch.testing.assert_close(got[tok], want, rtol=0, atol=1e-6, msg=f"{name}[{tok!r}]")
    # Non-vacuity: ft1 stores 'the' at another id than the base, and a zero row for the base's missing
    # 'banana' would give a different merge.
    assert VOCABS["ft1"].index("the") != VOCABS["base"].index("the")
    assert (got["banana"] - (0.3 * f1["banana"] + 0.2 * f2["banana"])).abs().max() > 1e-3


def test_token_new_to_the_base_gets_its_donors_row_exactly(fam, tmp_path):
    out = merge(task_arithmetic(fam, "tokenizer_source: union\n"), tmp_path / "out")
    for name in LLAMA_VOCAB:
        got, r = token_rows(out, name), rows(fam, name)
        # Every model holds ft1's row for 'apple', so every task vector there is zero.
        assert torch.equal(got["apple"], r["ft1"]["apple"])
        assert torch.equal(got["cherry"], r["ft2"]["cherry"])
        mean = (r["ft1"]["banana"] + r["ft2"]["banana"]) / 2
        want = mean + 0.7 * (r["ft1"]["banana"] - mean) + 0.4 * (r["ft2"]["banana"] - mean)
        torch.testing.assert_close(got["banana"], want, rtol=0, atol=1e-6)
        assert not torch.allclose(got["apple"], r["base"]["the"])  # non-vacuity: real, distinct rows


def test_tokens_force_model_token_zero_and_padding(fam, tmp_path):
    extra = (f"tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n"
             f"    the: {{source: {fam['ft2']}, force: true}}\n"
             f"    <new>: {{source: {{kind: model_token, model: {fam['ft1']}, token: apple}}}}\n"
             f"    <nil>: {{source: {{kind: zero}}}}\n")
    out = merge(linear(fam, extra), tmp_path / "out")
    n = len(UNION) + 2
    assert config(out)["vocab_size"] == 24 and n == 19
    state = tensors(out)
    for name in LLAMA_VOCAB:
        got, r = token_rows(out, name), rows(fam, name)
        torch.testing.assert_close(got["the"], r["ft2"]["the"], rtol=0, atol=1e-6)  # forced in every model
        torch.testing.assert_close(got["<new>"], r["ft1"]["apple"], rtol=0, atol=1e-6)
        assert torch.equal(got["<nil>"], torch.zeros_like(got["<nil>"]))
        # Padding rows: each model's mean token row; linear keeps means, so the output's mean row.
        w = state[name]
        assert w.shape[0] == 24
        torch.testing.assert_close(w[n:], w[:n].mean(0).expand(24 - n, -1), rtol=0, atol=1e-6)
        assert not torch.allclose(got["the"], 0.5 * r["base"]["the"] + 0.3 * r["ft1"]["the"] + 0.2 * r["ft2"]["the"])
    assert "<new>" in vocabulary(out) and "<nil>" in vocabulary(out)


def test_tokenizer_source_base_and_model(fam, tmp_path):
    out = merge(linear(fam, "tokenizer_source: base\n"), tmp_path / "base")
    assert vocabulary(out) == {w: i for i, w in enumerate(VOCABS["base"])}
    # Nothing was added or trimmed: the base's tokenizer files as they are.
    assert (out / "tokenizer.json").read_bytes() == (fam["base"] / "tokenizer.json").read_bytes()
    got, r = token_rows(out, "lm_head.weight"), rows(fam, "lm_head.weight")
    torch.testing.assert_close(got["the"], 0.5 * r["base"]["the"] + 0.3 * r["ft1"]["the"] + 0.2 * r["ft2"]["the"],
                               rtol=0, atol=1e-6)
    out = merge(linear(fam, f"tokenizer_source: {fam['ft1']}\n"), tmp_path / "ft1")
    assert vocabulary(out) == {w: i for i, w in enumerate(VOCABS["ft1"])}
    assert (out / "tokenizer.json").read_bytes() == (fam["ft1"] / "tokenizer.json").read_bytes()
    assert "cherry" not in token_rows(out, "lm_head.weight")
    # A donor that is not merged: only its tokenizer is read (its vocabulary differs from the merged models').
    two = (f"merge_method: linear\nmodels:\n  - model: {fam['base']}\n    parameters: {{weight: 1.0}}\n"
           f"  - model: {fam['ft1']}\n    parameters: {{weight: 1.0}}\ntokenizer: {{source: {fam['ft2']}}}\n")
    out = merge(two, tmp_path / "donor")
    got = token_rows(out, "model.embed_tokens.weight")
    assert sorted(got) == sorted(VOCABS["ft2"])
    assert torch.equal(got["cherry"], torch.zeros_like(got["cherry"]))  # in no merged model: zeros


def test_tied_head_union(tied, tmp_path):
    out = merge(task_arithmetic(tied, "tokenizer_source: union\n"), tmp_path / "out")
    state = tensors(out)
    assert "lm_head.weight" not in state and config(out)["tie_word_embeddings"] is True
    assert state["model.embed_tokens.weight"].shape[0] == len(UNION)
    r = rows(tied, "model.embed_tokens.weight")
    got = token_rows(out, "model.embed_tokens.weight")
    assert torch.equal(got["apple"], r["ft1"]["apple"])
    want = r["base"]["dog"] + 0.7 * (r["ft1"]["dog"] - r["base"]["dog"])  # ft2 lacks dog: base's row, τ = 0
    torch.testing.assert_close(got["dog"], want, rtol=0, atol=1e-6)


def test_gpt2_union_aligns_the_token_table_not_the_position_table(tmp_path):
    from tiny_vocab import build_vocab_family

    g = build_vocab_family(tmp_path / "gpt2", gpt2=True)
    out = merge(task_arithmetic(g, "tokenizer_source: union\n"), tmp_path / "out")
    state, wte = tensors(out), "transformer.wte.weight"
    assert state[wte].shape[0] == len(UNION) and "lm_head.weight" not in state
    r, got = rows(g, wte), token_rows(out, wte)
    assert torch.equal(got["apple"], r["ft1"]["apple"]) and torch.equal(got["cherry"], r["ft2"]["cherry"])
    # The position table keeps its shape and merges as any tensor.
    pos = {m: tensors(g[m])["transformer.wpe.weight"] for m in ("base", "ft1", "ft2")}
    want = pos["base"] + 0.7 * (pos["ft1"] - pos["base"]) + 0.4 * (pos["ft2"] - pos["base"])
    torch.testing.assert_close(state["transformer.wpe.weight"], want, rtol=0, atol=1e-6)


def test_base_tokens_past_vocab_size_are_trimmed(tmp_path):
    """mergekit's rule: a BPE base tokenizer loses the entries its embedding has no row for."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "a": 1, "b": 2, "ab": 3, "c": 4, "abc": 5}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c")], unk_token="<unk>"))
    folders = {}
    for seed, name in enumerate(("base", "ft")):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                                     num_key_value_heads=1, num_hidden_layers=2)).save_pretrained(tmp_path / name)
        PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>").save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    assert len(vocabulary(folders["base"])) == 6  # non-vacuity: two entries have no embedding row
    out = merge(f"merge_method: task_arithmetic\nbase_model: {folders['base']}\nmodels:\n"
                f"  - model: {folders['ft']}\n    parameters: {{weight: 1.0}}\ntokenizer_source: base\n",
                tmp_path / "out")
    assert vocabulary(out) == {"<unk>": 0, "a": 1, "b": 2, "ab": 3}
    assert config(out)["vocab_size"] == 4
    torch.testing.assert_close(tensors(out)["lm_head.weight"], tensors(folders["ft"])["lm_head.weight"],
                               rtol=0, atol=1e-6)  # weight 1: the fine-tune, rows in place


def test_plain_recipe_is_unchanged(fam, tmp_path):
    """No tokenizer key: the base's tokenizer files, and the same vocabulary is required."""
    same = (f"merge_method: linear\nmodels:\n  - model: {fam['base']}\n    parameters: {{weight: 1.0}}\n")
    out = merge(same, tmp_path / "out")
    assert (out / "tokenizer.json").read_bytes() == (fam["base"] / "tokenizer.json").read_bytes()
    with pytest.raises(WeightsmithError, match="different vocabularies"):
        merge(linear(fam), tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


# -- chat templates -----------------------------------------------------------------------------------

def test_chat_template_auto_name_and_literal(fam, tmp_path):
    from transformers import AutoTokenizer

    literal = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    for value, want in (("auto", TEMPLATE_B.strip()), ("chatml", BUNDLED["chatml"]), (literal, literal)):
        out = merge(linear(fam, f"tokenizer_source: union\nchat_template: {json.dumps(value)}\n"),
                    tmp_path / f"out-{len(want)}")
        assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == want
        assert not (out / "chat_template.jinja").exists()  # it would override tokenizer_config.json
        assert AutoTokenizer.from_pretrained(str(out)).chat_template == want
    # Without a tokenizer merge: the reference's tokenizer with the template (its own one was TEMPLATE_A).
    out = merge(f"merge_method: linear\nmodels:\n  - model: {fam['base']}\n    parameters: {{weight: 1.0}}\n"
                "chat_template: llama3\n", tmp_path / "plain")
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == BUNDLED["llama3"]
    assert AutoTokenizer.from_pretrained(str(fam["base"])).chat_template == TEMPLATE_A


@pytest.mark.parametrize("bad", ["chatmlx", "{{ x }}", 42])
def test_chat_template_refused(bad):
    with pytest.raises(WeightsmithError, match="chat_template"):
        MergeRecipe.from_dict({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}],
                               "chat_template": bad})


@needs_mergekit
@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_templates_render_as_mergekits(name):
    from tiny_vocab import word_tokenizer

    tok = word_tokenizer(["<unk>", "<s>", "</s>"])
    theirs = (MERGEKIT_TEMPLATES / f"{name}.jinja").read_text()
    assert theirs != BUNDLED[name]
    convs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital?"}],
             [{"role": "user", "content": "x"}, {"role": "assistant", "content": " y "}]]
    for conv in convs:
        for prompt in (True, False):
            ours, mk = (tok.apply_chat_template(conv, chat_template=t, tokenize=False, add_generation_prompt=prompt)
                        for t in (BUNDLED[name], theirs))
            assert ours == mk


# -- recipes ------------------------------------------------------------------------------------------

def test_recipe_round_trip():
    text = ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n"
            "    parameters: {weight: 1}\ntokenizer:\n  source: union\n  pad_to_multiple_of: 64\n  tokens:\n"
            "    <x>: {source: a, force: true}\n    <y>: {source: {kind: model_token, model: b, token_id: 3}}\n"
            "    <z>: {source: {kind: zero}}\nchat_template: chatml\n")
    r = MergeRecipe.from_yaml(text)
    assert r.tokenizer is not None and r.tokenizer.tokens["<x>"].force and r.tokenizer.pad_to_multiple_of == 64
    assert MergeRecipe.from_yaml(r.to_yaml()) == r
    assert r.model_refs() == ["a", "b"]
    renamed = r.with_models_renamed(str.upper)
    assert renamed.tokenizer.tokens["<y>"].source.model == "B" and r.tokenizer.tokens["<y>"].source.model == "b"
    donor = MergeRecipe.from_yaml(text.replace("source: union", "source: c"))
    assert donor.model_refs() == ["a", "b", "c"]


@pytest.mark.parametrize("extra, message", [
    ({"tokenizer": {"source": "union"}, "tokenizer_source": "base"}, "not both"),
    ({"tokenizer": {"tokens": {"<x>": {"source": "zz"}}}}, "not one of the merged models"),
    ({"tokenizer": {"sauce": "union"}}, "unknown key"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "positive integer"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "a", "token": "q",
                                                  "token_id": 1}}}}}, "exactly one of token, token_id"),
    ({"tokenizer": {"tokens": {"<x>": {"force": "yes"}}}}, "true or false"),
])
def test_bad_tokenizer_settings(extra, message):
    with pytest.raises(WeightsmithError, match=message):
        MergeRecipe.from_dict({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}],
                               **extra})


def test_new_token_without_a_source_is_refused_and_nothing_written(fam, tmp_path):
    with pytest.raises(WeightsmithError, match="give it a source"):
        merge(linear(fam, "tokenizer:\n  tokens:\n    <x>: {}\n"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir()]  # no staging folder left behind either


def test_merge_form_keeps_tokenizer_keys(fam):
    from ui.forms import merge_yaml_from_form

    current = linear(fam, "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\nchat_template: chatml\n")
    form = ["linear", "", [[str(fam["base"]), "0.5"], [str(fam["ft1"]), "0.5"]], [], False, True, 1.0, 0.0, "", ""]
    text, status = merge_yaml_from_form(*form, current)
    assert status == "✓ recipe is valid"
    r = MergeRecipe.from_yaml(text)
    assert r.tokenizer is not None and r.tokenizer.pad_to_multiple_of == 8 and r.chat_template == "chatml"
    assert [m.model for m in r.models] == [str(fam["base"]), str(fam["ft1"])]  # the form's models win
    assert MergeRecipe.from_yaml(merge_yaml_from_form(*form, "")[0]).tokenizer is None


# -- against mergekit 0.1.5 ---------------------------------------------------------------------------

def mergekit_yaml(recipe: Path, out: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(MERGEKIT_YAML), str(recipe), str(out), "--quiet"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]


@needs_mergekit
@pytest.mark.parametrize("case", ["union_tokens_pad_auto_template", "tied_task_arithmetic_union",
                                  "ties_tokenizer_source_base"])
def test_equals_mergekit(fam, tied, tmp_path, case):
    from transformers import AutoTokenizer

    text = mergekit_cases(fam, tied)[case]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text)
    mk = tmp_path / "mk"
    mergekit_yaml(recipe, mk)
    ws = merge(text, tmp_path / "ws")
    assert sorted(vocabulary(ws)) == sorted(vocabulary(mk))
    assert config(ws)["vocab_size"] == config(mk)["vocab_size"]
    diff, where = max_token_diff(ws, mk)
    assert diff <= 1e-5, f"max |Δ| {diff:.3g} at {where}"
    assert AutoTokenizer.from_pretrained(str(ws)).chat_template == AutoTokenizer.from_pretrained(str(mk)).chat_template
