"""Shared fixtures: tiny random models built from a config, nothing downloaded.

Every fixture saves with ``save_pretrained`` under a session temp folder, so
tests exercise the same folder layout users have.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# No test may reach the internet, and caches go to a temp home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _tiny_tokenizer(vocab_size: int):
    """A word-level tokenizer over a fixed vocabulary, wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [
        "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", "ĠRome", "ĠEiffel", "ĠTower", "Ġlocated",
        "Ġin", "Ġcity", "ĠBerlin", "ĠGermany", "ĠItaly", "Ġa", "ĠThe", "The", "Ġspeaks", "ĠFrench",
        "ĠEnglish", "Ġplays", "Ġfootball", "Ġtennis", "ĠMadrid", "ĠSpain", "Ġtower", "Ġ.", ".", ",",
    ]
    words += [f"Ġw{i}" for i in range(vocab_size - len(words))]
    vocab = {w: i for i, w in enumerate(words[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def build_tiny_llama(seed: int = 0, *, layers: int = 4, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=layers, max_position_embeddings=128,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


def build_tiny_gpt2(seed: int = 0, *, layers: int = 4):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=4, n_positions=128,
                        bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def save_model(model, folder: Path, **kw) -> Path:
    model.save_pretrained(folder, safe_serialization=True, **kw)
    _tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def perturbed(model, seed: int, scale: float = 0.02):
    """A 'fine-tune' of ``model``: the same weights plus seeded noise."""
    import copy

    g = torch.Generator().manual_seed(seed)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return clone


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tiny_tokenizer(64)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_model(build_tiny_llama(0), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_tied_dir(tmp_path_factory) -> Path:
    return save_model(build_tiny_llama(0, tie=True), tmp_path_factory.mktemp("tiny-llama-tied"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return save_model(build_tiny_gpt2(0), tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_family(tmp_path_factory) -> dict[str, Path]:
    """A base tiny llama and three seeded fine-tunes of it, saved as folders."""
    base = build_tiny_llama(0)
    out = {"base": save_model(base, tmp_path_factory.mktemp("fam-base"))}
    for i in (1, 2, 3):
        out[f"ft{i}"] = save_model(perturbed(base, seed=i), tmp_path_factory.mktemp(f"fam-ft{i}"))
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_family(tmp_path_factory) -> dict[str, Path]:
    base = build_tiny_gpt2(0)
    out = {"base": save_model(base, tmp_path_factory.mktemp("g-base"))}
    for i in (1, 2):
        out[f"ft{i}"] = save_model(perturbed(base, seed=i), tmp_path_factory.mktemp(f"g-ft{i}"))
    return out


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The real bundled demo model (converted once into the user's cache)."""
    from checkpoints.demo import demo_model_path

    return demo_model_path()
