"""The app's before/after continuations of an edit come from one batched generation that takes the edit
back out of row 0: they must equal two separate generations, without the edit and with it."""

from __future__ import annotations

import pytest
import torch

from editing.before_after import continuations_before_after
from editing.generation_checks import greedy_continuations
from editing.request import EditRequest
from test_edit import EIFFEL, corpus_file, session_for, sharp_dirs, stats  # noqa: F401  (fixtures)


@pytest.mark.parametrize("kind,method", [("llama", "r-rome"), ("llama", "memit"), ("gpt2", "r-rome")])
def test_before_after_equal_separate_generations(sharp_dirs, corpus_file, stats, kind, method):  # noqa: F811
    s = session_for(sharp_dirs[kind], corpus_file, stats, method=method)
    s.apply(EditRequest("{} is the capital of", "Madrid", "Italy", layer=1))  # an earlier edit stays in "before"
    prompt = EIFFEL.text
    decode = lambda ids: s.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    expected_before = decode(greedy_continuations(s.model, s.tokenizer, [prompt], 12)[0])
    edit = s.apply(EditRequest(EIFFEL.prompt, EIFFEL.subject, "Rome", layer=1))
    expected_after = decode(greedy_continuations(s.model, s.tokenizer, [prompt], 12)[0])
    assert expected_before != expected_after  # non-vacuity: the edit changes the continuation
    weights = {k: v.clone() for k, v in s.model.state_dict().items()}
    assert continuations_before_after(s, prompt, edit, max_new_tokens=12) == (expected_before, expected_after)
    assert all(torch.equal(v, s.model.state_dict()[k]) for k, v in weights.items())  # nothing left behind
