"""What an edit changed in the model's own words: greedy continuations without and with it, in one pass.

The app shows the continuation of the edited prompt before and after an edit. Generating them one
after the other costs two generations (about 2.4 s each for 24 tokens of the demo model on 2 cores:
small models are dominated by per-token overhead, not arithmetic). The edit is known in factored
form (ΔW = B·A per module), so both continuations come from one batched generation: the batch holds
the prompt twice, and in row 0 every edited module's output has ΔW·x taken back out, which is the
model as it was just before the edit (earlier edits included).

Example::

    edit = session.apply(request)
    before, after = continuations_before_after(session, request.text, edit, max_new_tokens=24)
"""

from __future__ import annotations

import contextlib

import torch

from .generation_checks import greedy_continuations
from .hooks import patch_output_from_input


def _without_edit_in_row0(B: torch.Tensor, A: torch.Tensor):
    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # ΔW = B A in (out, in) orientation whatever the weight's storage layout (Conv1D included).
        undo = (x[:1].float() @ A.T.to(x.device)) @ B.T.to(x.device)
        return torch.cat([y[:1] - undo.to(y.dtype), y[1:]], dim=0)
    return fn


def continuations_before_after(session, prompt: str, edit, *, max_new_tokens: int = 24) -> tuple[str, str]:
    """Greedy continuations of ``prompt`` (text after it) without and with ``edit``, the session's latest
    edit, from one batched generation."""
    with contextlib.ExitStack() as stack:
        for module, (B, A) in edit.factors.items():
            stack.enter_context(patch_output_from_input(session.model, module, _without_edit_in_row0(B, A)))
        rows = greedy_continuations(session.model, session.tokenizer, [prompt, prompt], max_new_tokens)
    before, after = (session.tokenizer.decode(r, skip_special_tokens=True) for r in rows)
    return before, after
