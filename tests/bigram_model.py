"""A tiny llama turned into an exact bigram model, for hand-computed evaluation tests.

With every attention output and MLP down projection set to zero, each block
adds nothing, so the final hidden state at a position is the RMS-normalised
embedding of that position's token. Giving a token a one-hot embedding e_j
(and the final norm's epsilon 0; the blocks keep theirs, as the padding
token's embedding is zero) makes that state exactly sqrt(hidden)·e_j, so the
next-token logits after the token are column j of the head times sqrt(hidden):
we write those columns, and P(next | token) = softmax(our logits) — numbers a
test can compute by hand (zeros elsewhere: each other token has e^0 = 1).
"""

from __future__ import annotations

import math

import pytest
import torch


def bigram_model(tokenizer, rows: dict[str, dict[str, float]]):
    """A model whose next-token logits after token ``ctx`` are ``rows[ctx]`` (token -> logit, 0 elsewhere).

    Tokens are vocabulary strings (``"ĠRome"``). Returns the model (eval mode).
    """
    from conftest import build_tiny_llama

    model = build_tiny_llama(0)
    hidden = model.config.hidden_size
    assert len(rows) <= hidden
    with torch.no_grad():
        model.model.norm.variance_epsilon = 0.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        head = model.lm_head.weight
        for slot, (ctx, logits) in enumerate(rows.items()):
            t = tokenizer.convert_tokens_to_ids(ctx)
            assert t != tokenizer.unk_token_id, ctx
            emb[t] = 0.0
            emb[t, slot] = 1.0
            head[:, slot] = 0.0
            for tok, value in logits.items():
                head[tokenizer.convert_tokens_to_ids(tok), slot] = value / math.sqrt(hidden)
    return model.eval()


def bigram_fixture(rows: dict[str, dict[str, float]]):
    """A module-scoped fixture ``model``: :func:`bigram_model` of ``rows`` on conftest's ``tiny_tokenizer``."""

    @pytest.fixture(scope="module")
    def model(tiny_tokenizer):
        return bigram_model(tiny_tokenizer, rows)

    return model
