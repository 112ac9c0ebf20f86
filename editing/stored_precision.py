"""Do the edits survive being stored in the checkpoint's own dtype?

A session computes in float32, but a model from the Hub is usually stored in bfloat16, and the
edited model is saved the way it came (twice the size in float32). Rounding the edited matrices
to 8 bits of mantissa moves every update by up to 2⁻⁹ of the weight it is added to, and a patch
neuron's gate is a whitened direction whose pre-activation is a difference of large terms, so
whether an edit still holds in 16 bits is a question to measure, not to assume. The check is
cheap: only the tensors the edits touched are rounded (the others came from the stored dtype
and are exact in float32), in place and put back afterwards, and each fact checked costs
:func:`editing.checks.target_check`'s two short passes at each precision.

Example::

    report = check_stored_precision(session, torch.bfloat16)
    report.lost          # facts that give their target in float32 but not when stored in bf16
    report.neutral_kl    # KL(float32 ‖ stored) on neutral text
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .checks import NEUTRAL_PROMPTS, neutral_logprobs, target_check, unrelated_kl

# Enough facts to see a systematic loss, few enough that a 1,000-edit export does not wait minutes.
MAX_CHECKED_FACTS = 16


@dataclass
class PrecisionReport:
    """What rounding the edited tensors to ``dtype`` did to the edits' facts and to neutral text."""

    dtype: str
    checked: int = 0  # facts whose prompt gives the target at the session's precision
    held: int = 0  # of those, the facts that still do when stored in ``dtype``
    lost: list[dict[str, Any]] = field(default_factory=list)  # {"edit", "subject", "target", "continuation"}
    neutral_kl: float = 0.0  # KL(session precision ‖ stored) on neutral text, nats per token
    seconds: float = 0.0
    saved_in: str = ""  # set when the export wrote a wider dtype instead, because facts were lost

    @property
    def ok(self) -> bool:
        return not self.lost

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One line for the CLI, the app and the card."""
        text = (f"stored in {self.dtype}: {self.held} of {self.checked} checked facts still give their target; "
                f"KL on neutral text {self.neutral_kl:.2g} nats from the computed weights")
        if self.lost:
            first = self.lost[0]
            text += (f"; lost: {len(self.lost)} (edit {first['edit']}, {first['subject']} → {first['target']}, "
                     f"now continues {first['continuation'][:40]!r})")
        if self.saved_in:
            text += f"; so the model was saved in {self.saved_in}"
        return text


def checked_facts(session: Any, limit: int = MAX_CHECKED_FACTS) -> list[tuple[int, Any]]:
    """Up to ``limit`` (edit id, request) pairs spread evenly over the active edits, the latest included."""
    facts = [(e.id, r) for e in session.edits for r in e.requests]
    if len(facts) <= limit:
        return facts
    step = (len(facts) - 1) / (limit - 1)
    return [facts[round(i * step)] for i in range(limit)]


@torch.no_grad()
def check_stored_precision(session: Any, dtype: torch.dtype, *, limit: int = MAX_CHECKED_FACTS,
                           progress: Callable[[float, str], None] | None = None) -> PrecisionReport:
    """Round every tensor the active edits touched to ``dtype`` (in place, restored before returning) and
    compare the facts' greedy continuations and the neutral-text distribution with the session's own.

    ``session``: an :class:`editing.session.EditSession` (typed Any: the session imports this module);
    ``progress(fraction, text)``: called before each fact's check (two short passes per fact and precision:
    about 0.9 s a fact on the demo model).
    """
    t0 = time.time()
    model, tok = session.model, session.tokenizer
    report = PrecisionReport(str(dtype).removeprefix("torch."))
    facts = checked_facts(session, limit)
    steps = 2 * len(facts)

    def step(done: int, where: str) -> None:
        if progress is not None:
            progress(done / steps, f"checking the edits in {report.dtype}: fact {done % len(facts) + 1} of "
                                   f"{len(facts)} {where}")

    computed = {}
    for i, (_, r) in enumerate(facts):
        step(i, "as computed")
        computed[i] = target_check(model, tok, r.text, r.target)
    neutral = neutral_logprobs(model, tok, NEUTRAL_PROMPTS)
    names = sorted({n for e in session.edits for n in e.deltas})
    kept = {n: model.get_parameter(n).detach().clone() for n in names}
    try:
        for n in names:
            p = model.get_parameter(n)
            p.copy_(p.to(dtype).to(p.dtype))
        report.neutral_kl = round(unrelated_kl(neutral, neutral_logprobs(model, tok, NEUTRAL_PROMPTS)), 6)
        for i, (edit_id, r) in enumerate(facts):
            if not computed[i]["generates_target"]:
                continue  # a fact the edit never reached is the edit's own warning, not the dtype's
            step(len(facts) + i, "rounded")
            report.checked += 1
            stored = target_check(model, tok, r.text, r.target)
            if stored["generates_target"]:
                report.held += 1
            else:
                report.lost.append({"edit": edit_id, "subject": r.subject, "target": r.target,
                                    "continuation": stored["continuation"]})
    finally:
        for n, w in kept.items():
            model.get_parameter(n).copy_(w)
    report.seconds = round(time.time() - t0, 2)
    return report
