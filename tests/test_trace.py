"""Causal tracing on tiny random llama and gpt2: shapes, identities, files."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints.errors import WeightsmithError
from editing.hooks import capture_input, start_from_block
from editing.trace import TraceResult, causal_trace, plot_trace, save_trace

PROMPT = "The Eiffel Tower is located in the city of"


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(params=["llama", "gpt2"])
def pair(request, tiny_llama_dir, tiny_gpt2_dir):
    return load(tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir)


def test_hidden_trace_shape_and_identities(pair):
    model, tok = pair
    r = causal_trace(model, tok, PROMPT, "Eiffel Tower", samples=2)
    T, L = len(tok(PROMPT)["input_ids"]), model.config.num_hidden_layers
    assert isinstance(r, TraceResult) and r.scores.shape == (T, L) and len(r.tokens) == T
    assert r.subject_range == (1, 3) and r.tokens[1:3] == [" Eiffel", " Tower"]
    assert 0 <= r.low_score <= 1 and 0 <= r.high_score <= 1 and r.low_score != r.high_score
    # Tokens before the subject are not corrupted: restoring them changes nothing.
    assert torch.all(r.scores[0] == r.low_score)
    # Restoring the last token's final hidden state restores the clean output.
    assert r.scores[T - 1, L - 1] == pytest.approx(r.high_score, abs=1e-5)
    # Restoring every corrupted token at layer 0 would too; one token alone gives something in between.
    assert not torch.allclose(r.scores[1:], torch.full_like(r.scores[1:], r.low_score))
    assert 0 <= r.suggest_layer() < L
    assert r.answer == tok.decode([r.answer_id])


@pytest.mark.parametrize("kind", ["mlp", "attn"])
def test_window_trace_shape(tiny_llama_dir, kind):
    model, tok = load(tiny_llama_dir)
    r = causal_trace(model, tok, "The {} is located in", "Eiffel Tower", kind=kind, samples=2, window=2)
    assert r.scores.shape == (len(tok("The Eiffel Tower is located in")["input_ids"]), 4)
    assert r.kind == kind and r.window == 2
    assert torch.all(r.scores[0] == r.low_score)


def test_start_from_block_reproduces_clean_run(tiny_llama_dir):
    # The shortcut the trace relies on: starting at block j from the cached input of block j
    # gives exactly the full forward pass.
    model, tok = load(tiny_llama_dir)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    blocks = [f"model.layers.{i}" for i in range(4)]
    with torch.no_grad():
        full = model(ids).logits
        with capture_input(model, blocks[2]) as seen:
            model(ids)
        with start_from_block(model, blocks, 2, seen.value):
            started = model(ids).logits
        with start_from_block(model, blocks, 2, seen.value * 0.5):
            other = model(ids).logits
        again = model(ids).logits  # hooks removed: the normal forward is back
    torch.testing.assert_close(started, full, atol=1e-5, rtol=1e-5)
    assert (other - full).abs().max() > 1e-3
    assert torch.equal(again, full)


def test_plot_and_files(tiny_gpt2_dir, tmp_path):
    model, tok = load(tiny_gpt2_dir)
    r = causal_trace(model, tok, PROMPT, "Eiffel Tower", samples=1)
    fig = plot_trace(r)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[1].endswith("*") and labels[2].endswith("*") and not labels[0].endswith("*")
    png, js = save_trace(r, tmp_path / "t.png")
    assert png.stat().st_size > 1000
    data = json.loads(js.read_text())
    assert data["tokens"] == r.tokens and len(data["scores"]) == len(r.tokens) and data["answer"] == r.answer


def test_trace_bad_input(tiny_llama_dir):
    model, tok = load(tiny_llama_dir)
    with pytest.raises(WeightsmithError, match="does not occur"):
        causal_trace(model, tok, PROMPT, "Louvre")
    with pytest.raises(WeightsmithError, match="unknown trace kind"):
        causal_trace(model, tok, PROMPT, "Eiffel Tower", kind="mlpx")  # type: ignore[arg-type]


def _result(kind: str, scores: torch.Tensor, subject_range=(1, 3)) -> TraceResult:
    return TraceResult("p", "s", kind, scores, ["t"] * scores.shape[0], subject_range, " a", 0, 0.1, 0.9, 3, 3.0, 10,
                       extra={"model_type": "llama"})


def test_suggest_layer_rules():
    from editing.rome import default_layer, plausible_layers

    T, L = 5, 30
    rng = plausible_layers("llama", L)
    assert rng == range(3, 15) and default_layer("llama", L) in rng
    low = torch.full((T, L), 0.1)
    # MLP trace with a clear peak at the subject's last token (row 2): that peak, as in the paper.
    s = low.clone()
    s[2, 7], s[1, 3] = 0.8, 0.5
    assert _result("mlp", s).suggest_layer() == 7
    # A flat last-token row (<1/4 of the strongest subject effect): the strongest subject token decides.
    s = low.clone()
    s[1, 4], s[2, 9] = 0.9, 0.2
    assert _result("mlp", s).effect_profile()[4] == pytest.approx(1.0)
    assert _result("mlp", s).suggest_layer() == 4
    # Peaks outside the plausible range are ignored (here the last layers and layer 0)...
    s = low.clone()
    s[2, 27], s[2, 0], s[2, 6] = 0.9, 0.9, 0.5
    assert _result("mlp", s).suggest_layer() == 6
    assert _result("mlp", s).suggest_layer(range(0, L)) == 0
    # ...hidden traces use the subject tokens' maximum (their rows fall with depth)...
    s = low.clone()
    s[1, :] = torch.linspace(0.9, 0.1, L)
    s[1, 5] = 0.95
    assert _result("hidden", s).suggest_layer() == 5
    # ...and no effect at all falls back to the default layer.
    assert _result("mlp", low.clone()).suggest_layer() == default_layer("llama", L)


@pytest.mark.parametrize("build", ["llama", "gpt2"])
def test_forward_with_cache_continues_the_sequence_under_the_current_keyword(build):
    """Decoding the last token from the cache gives the full pass's logits, and the model is called
    with the keyword its own signature names (transformers 5 deprecates ``past_key_values``)."""
    import inspect

    from editing.hooks import forward_with_cache
    from tests.conftest import build_tiny_gpt2, build_tiny_llama

    model = (build_tiny_llama if build == "llama" else build_tiny_gpt2)(3)
    ids = torch.tensor([[5, 9, 17, 23, 8, 40]])
    keywords: list[set[str]] = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: keywords.append(set(kwargs)), with_kwargs=True)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[0, -1]
        _, cache = forward_with_cache(model, None, input_ids=ids[:, :-1])
        step, _ = forward_with_cache(model, cache, input_ids=ids[:, -1:])
        alone, _ = forward_with_cache(model, None, input_ids=ids[:, -1:])
    assert cache is not None
    torch.testing.assert_close(step.logits[0, -1], full, atol=1e-5, rtol=1e-5)
    # non-vacuity: without the cache the last token alone predicts something else
    assert (alone.logits[0, -1] - full).abs().max() > 1e-3
    expected = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert all(expected in kw for kw in keywords[1:]) and len(keywords) == 4
    assert not any({"cache", "past_key_values"} - {expected} & kw for kw in keywords)
