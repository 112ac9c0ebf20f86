"""Tiny llamas with different vocabularies, for the tokenizer-merge tests and bench.

* ``base``: the special tokens, the common words and ``dog``;
* ``ft1``: the same words in another id order, plus ``apple`` and ``banana``;
* ``ft2``: the common words (without ``dog``), plus ``banana`` and ``cherry``.

The non-vocabulary weights of ft1/ft2 are the base's plus noise (fine-tunes);
each token's rows are the base's row plus noise where the base has the token,
fresh random rows where it does not.

:func:`token_rows` reads a merged folder back by token, so two outputs can be
compared even when they number added tokens differently (mergekit does so run to run).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>"]
COMMON = ["the", "capital", "of", "France", "is", "Paris", "city", "a", "river", "big"]
VOCABS = {
    "base": SPECIALS + COMMON + ["dog"],
    "ft1": SPECIALS + list(reversed(COMMON)) + ["apple", "dog", "banana"],
    "ft2": SPECIALS + COMMON + ["banana", "cherry"],
}
VOCAB_NAMES = ("model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight")
EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight")


def word_tokenizer(words: list[str], chat_template: str | None = None):
    """A whitespace word-level tokenizer over ``words`` (ids in list order), wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_vocab_family(root: Path, *, tie: bool = False, templates: dict[str, str] | None = None,
                       gpt2: bool = False) -> dict[str, Path]:
    """Save base, ft1 and ft2 (see the module's docstring) under ``root``; returns their folders.
    Llamas, or GPT-2s (``gpt2``: a tied head and a position table that is not a vocabulary weight)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    def model(words: list[str], seed: int):
        torch.manual_seed(seed)
        if gpt2:
            return GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                              bos_token_id=1, eos_token_id=2)).eval()
        cfg = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=24, num_attention_heads=2,
                          num_key_value_heads=1, num_hidden_layers=2, max_position_embeddings=32,
                          tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
        return LlamaForCausalLM(cfg).eval()

    base = model(VOCABS["base"], 0)
    base_state = base.state_dict()
    base_ids = {w: i for i, w in enumerate(VOCABS["base"])}
    out = {}
    for seed, (name, words) in enumerate(VOCABS.items()):
        m = base if name == "base" else model(words, 10 + seed)
        if name != "base":
            g = torch.Generator().manual_seed(100 + seed)
            with torch.no_grad():
                for key, p in m.state_dict().items():
                    if key in VOCAB_NAMES:
                        for i, w in enumerate(words):
                            if w in base_ids:
                                p[i] = base_state[key][base_ids[w]] + 0.05 * torch.randn(p.shape[1:], generator=g)
                    else:
                        p.copy_(base_state[key] + 0.05 * torch.randn(p.shape, generator=g))
        folder = root / name
        m.save_pretrained(folder, safe_serialization=True)
        word_tokenizer(words, (templates or {}).get(name)).save_pretrained(folder)
        out[name] = folder
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def vocabulary(folder: Path) -> dict[str, int]:
    """token -> id of the tokenizer saved in ``folder``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def token_rows(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """token -> row of vocabulary weight ``name`` in ``folder`` (a tied head reads the embedding)."""
    state = tensors(folder)
    weight = state[name] if name in state else next(state[e] for e in EMBEDDINGS if e in state)
    return {tok: weight[i] for tok, i in vocabulary(folder).items()}


def max_token_diff(a: Path, b: Path) -> tuple[float, str]:
    """Largest |a − b| over every tensor, vocabulary weights compared token by token; and where."""
    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        return float("inf"), f"tensor names differ: {sorted(set(ta) ^ set(tb))}"
    worst, where = 0.0, ""
    for name in sorted(ta):
        if name in VOCAB_NAMES:
            ra, rb = token_rows(a, name), token_rows(b, name)
            if set(ra) != set(rb):
                return float("inf"), f"vocabularies differ: {sorted(set(ra) ^ set(rb))}"
            pairs = [(ra[t], rb[t], f"{name}[{t!r}]") for t in ra]
            pad_a, pad_b = ta[name][len(ra):], tb[name][len(rb):]  # padding rows past the tokens
            pairs.append((pad_a, pad_b, f"{name} padding"))
        else:
            pairs = [(ta[name], tb[name], name)]
        for x, y, label in pairs:
            if x.shape != y.shape:
                return float("inf"), f"{label} shape {list(x.shape)} vs {list(y.shape)}"
            d = float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
            if d > worst:
                worst, where = d, label
    return worst, where


def config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def linear_recipe(f: dict[str, Path], extra: str = "") -> str:
    """linear over base, ft1, ft2 with weights 0.5, 0.3, 0.2 (and the base named), then ``extra`` keys."""
    return (f"merge_method: linear\nbase_model: {f['base']}\nmodels:\n"
            f"  - model: {f['base']}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {f['ft1']}\n    parameters: {{weight: 0.3}}\n"
            f"  - model: {f['ft2']}\n    parameters: {{weight: 0.2}}\n{extra}")


def task_arithmetic_recipe(f: dict[str, Path], extra: str = "") -> str:
    """task_arithmetic on base with ft1 (0.7) and ft2 (0.4), then ``extra`` keys."""
    return (f"merge_method: task_arithmetic\nbase_model: {f['base']}\nmodels:\n"
            f"  - model: {f['ft1']}\n    parameters: {{weight: 0.7}}\n"
            f"  - model: {f['ft2']}\n    parameters: {{weight: 0.4}}\n{extra}")


def mergekit_cases(f: dict[str, Path], tied: dict[str, Path]) -> dict[str, str]:
    """Tokenizer recipes compared with mergekit 0.1.5 (test_merge_tokenizer and the bench)."""
    return {
        "union_tokens_pad_auto_template": linear_recipe(f, (
            f"tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n"
            f"    the: {{source: {f['ft2']}, force: true}}\n"
            f"    <new>: {{source: {{kind: model_token, model: {f['ft1']}, token: apple}}}}\n"
            f"chat_template: auto\n")),
        "tied_task_arithmetic_union": task_arithmetic_recipe(tied, "tokenizer_source: union\n"),
        "ties_tokenizer_source_base": (
            f"merge_method: ties\nbase_model: {f['base']}\nmodels:\n"
            f"  - model: {f['ft1']}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
            f"  - model: {f['ft2']}\n    parameters: {{weight: 0.4, density: 0.5}}\ntokenizer_source: base\n"),
    }
