"""Cheap checks after every edit: is the update finite, how large is it, did unrelated text move?

A *disabling edit* (Gupta et al. 2024, "Rebuilding ROME") is an update with a
huge norm that breaks the model; in sequential editing it shows as a norm far
above the session's usual one (on the demo model: 1,233 against a median of
32). Three signals, all shown to the user in the edit's ``checks``:

* ``update_norm`` ‖ΔW‖ (Frobenius, over all edited matrices) and
  ``relative_norm`` max ‖ΔW‖/‖W‖ per matrix, against an absolute bound for the
  first edits and against ``outlier_factor`` × the median of the session's
  earlier unflagged updates of the same method once there are ``min_history``
  of them (undone edits count: an evaluation edits and undoes record by record);
* ``unrelated_kl``: the mean KL(before ‖ after) of the next-token distribution
  over every position of a few fixed neutral texts, one batched forward pass
  before and one after the edit (about 0.1 s each on the demo model);
* ``finite``: a non-finite update is refused before anything changes
  (:func:`require_finite`).

Those three look at one edit. A long sequence can also wear the model down a
little at a time, with no single edit standing out (MEMIT one fact at a time on
the demo model: no edit flagged in 900, while WikiText perplexity rose to 3.2×).
So every edit also reports ``drift_kl``, KL(unedited ‖ now) on the same neutral
texts, from the same forward pass (the unedited model's log-probabilities are
taken once per session), and ``drifted`` when it passes ``max_drift_kl``.

A second question is whether the edit *took*: :func:`target_check` decodes ten
greedy tokens after the edited prompt and asks whether the new target is among
them (the rule the checks by generation use). r-ROME makes the
update exact at the mean key k*, so a prompt whose own key is far from k* gets
only part of δ and can keep its old answer; that shows as ``missed`` with the
continuation the model gives instead. A miss is a warning, not a disabling edit.

Example::

    before = neutral_logprobs(model, tok, settings.prompts)
    ... apply ...
    checks = update_checks(norms, before, neutral_logprobs(model, tok, settings.prompts), earlier, settings)
    checks["flag"]  # "" or a one-line warning
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from checkpoints.errors import WeightsmithError
from checkpoints.finite import all_finite

# Texts about nothing an edit should touch (no named entities): everyday scenes and arithmetic.
# Short (about 40 tokens in all): the forward pass costs ~8 ms of CPU per token on the demo model.
NEUTRAL_PROMPTS: tuple[str, ...] = (
    "It was cold, so she put on a warm",
    "To make tea, first boil some",
    "He opened the window because the room was",
    "Two plus two is four, and three plus three is",
    "After dinner, the children played in the",
)


DRIFT_KL_LIMIT = 0.05


@dataclass
class CheckSettings:
    """Thresholds of the disabling-edit checks (tune them on the tuning half, like other settings)."""

    prompts: tuple[str, ...] = NEUTRAL_PROMPTS
    # Flag when ‖ΔW‖ > outlier_factor × median of the earlier updates (same method), once there are
    # min_history of them. The disabling edit was 38× the median; the largest r-ROME
    # update in the same run 2.5×.
    outlier_factor: float = 5.0
    min_history: int = 3
    # ‖ΔW‖/‖W‖ of any edited matrix, for every edit (also the first); demo model, layer 4: ROME edits
    # 0.10-0.26 (‖W‖ = 171), the disabling edit 1,233/171 = 7.2.
    max_relative_norm: float = 1.0
    max_unrelated_kl: float = 0.1  # nats, mean over the neutral texts' positions (demo-model ROME edits: 0.0005-0.004)
    # KL(unedited ‖ now) on the neutral texts, over all the edits applied (calibration: see README,
    # "Drift"; chosen on tuning-half sequences).
    max_drift_kl: float = DRIFT_KL_LIMIT


@torch.no_grad()
def neutral_logprobs(model, tokenizer, prompts: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Next-token log-probabilities at every real position of ``prompts``: ``[positions, vocab]`` (one forward)."""
    device = next(model.parameters()).device
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    return F.log_softmax(logits[mask.bool().to(device)].float(), -1)


@torch.no_grad()
def target_check(model, tokenizer, text: str, target: str, *, window: int = 10) -> dict[str, Any]:
    """Does the model now say ``target`` after ``text``? Greedy decoding of ``window`` tokens.

    ``generates_target``: the target occurs in them as a whole word, case-insensitive (the
    rule of :func:`editing.generation_checks.mentions`, as the checks by generation score);
    ``continuation``: those tokens, decoded; ``target_prob``: the per-token mean probability
    of the target right after ``text`` (teacher-forced). Two short passes on the demo model.
    """
    from .generation_checks import greedy_continuations, mentions
    from .request import prompt_ids, target_ids

    device = next(model.parameters()).device
    pi, ti = prompt_ids(tokenizer, text), target_ids(tokenizer, target)
    ids = torch.tensor([pi + ti[:-1]], dtype=torch.long, device=device)
    logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0, len(pi) - 1:].float(), -1)
    prob = float(logp.gather(-1, torch.tensor(ti, device=device)[:, None]).mean().exp())
    said = tokenizer.decode(greedy_continuations(model, tokenizer, [text], window)[0], skip_special_tokens=True)
    return {"generates_target": mentions(said, target), "target_prob": round(prob, 5), "continuation": said}


class NeutralProbe:
    """:func:`neutral_logprobs` of a session's model, remembered per set of active edits.

    The "after" of one edit is the "before" of the next, and after an undo an earlier set of edits
    comes back (an evaluation's apply/undo loop), so one forward pass per edit instead of two; the
    two most recent states are kept. The unedited model's (the drift reference) is kept for the
    session: the empty state when it was seen, else one pass with the unedited weights swapped in.
    Only the session changes the weights it edits, so a state's log-probabilities stay valid."""

    def __init__(self, model, tokenizer, prompts: tuple[str, ...]):
        self.model, self.tokenizer, self.prompts = model, tokenizer, prompts
        self._recent: dict[tuple[int, ...], torch.Tensor] = {}
        self._unedited: torch.Tensor | None = None

    def at(self, state: tuple[int, ...]) -> torch.Tensor:
        """The log-probabilities with the edits ``state`` (their ids) applied, as the model is now."""
        lp = self._recent.pop(state, None)  # re-inserted last: the two most recent states stay
        if lp is None:
            lp = neutral_logprobs(self.model, self.tokenizer, self.prompts)
        self._recent[state] = lp
        while len(self._recent) > 2:
            self._recent.pop(next(iter(self._recent)))
        if not state:
            self._unedited = lp
        return lp

    def unedited(self, pristine_weights) -> torch.Tensor:
        """The unedited model's; ``pristine_weights()``: a context that swaps the unedited weights in."""
        if self._unedited is None:
            with pristine_weights():
                self._unedited = neutral_logprobs(self.model, self.tokenizer, self.prompts)
        return self._unedited


def unrelated_kl(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean over positions of KL(before ‖ after), from :func:`neutral_logprobs` outputs. Never negative:
    float32 sums give −1e-9 or so for identical distributions, which printed as "-0" in the app's history."""
    kl = float(F.kl_div(after, before, log_target=True, reduction="none").sum(-1).mean())
    return 0.0 if kl < 0 else kl  # NaN stays NaN: the checks flag it


def require_finite(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Refuse an update with NaN/inf entries before it touches the weights."""
    for module, (B, A) in factors.items():
        if not (all_finite(B) and all_finite(A)):
            raise WeightsmithError(f"the computed update of {module} is not finite (NaN or inf): nothing was changed; "
                                   "try another layer or a larger statistics corpus")


def update_norms(factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 weights: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(‖ΔW‖ over all modules, max per-module ‖ΔW‖/‖W‖) for ΔW = B A and W in ``weights[module]``."""
    total, rel = 0.0, 0.0
    for module, (B, A) in factors.items():
        # ‖BA‖²_F = Σ (BᵀB ∘ AAᵀ): r×r products instead of the [out, in] matrix (r = 1 for ROME).
        B64, A64 = B.double(), A.double()
        sq = float(((B64.T @ B64) * (A64 @ A64.T)).sum().clamp_min(0))
        n = sq ** 0.5
        total += sq
        rel = max(rel, n / max(float(weights[module].double().norm()), 1e-30))
    return total ** 0.5, rel


def update_checks(norm: float, relative: float, before: torch.Tensor | None, after: torch.Tensor | None,
                  earlier: list[float], settings: CheckSettings,
                  targets: list[tuple[str, dict[str, Any]]] | None = None, *,
                  unedited: torch.Tensor | None = None, active_edits: int = 1,
                  notes: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """The ``checks`` dict of an applied edit: ``flag`` (a possible disabling edit), ``missed`` (facts
    whose prompt does not yet produce the new target, from :func:`target_check` results in
    ``targets`` as (target, result) pairs), ``drifted`` (with ``unedited``, the unedited model's
    neutral log-probabilities: all ``active_edits`` together moved neutral text too far), ``notes``
    (a method's own findings, e.g. a patch neuron that opens at text starts) and ``warning``, "" or one
    line saying what was found."""
    out: dict[str, Any] = {"finite": True, "update_norm": round(norm, 4), "relative_norm": round(relative, 5)}
    reasons = []
    if relative > settings.max_relative_norm:
        reasons.append(f"‖ΔW‖/‖W‖ = {relative:.2f} > {settings.max_relative_norm:g}")
    if len(earlier) >= settings.min_history:
        med = statistics.median(earlier)
        out["median_earlier_norm"] = round(med, 4)
        if med > 0 and norm > settings.outlier_factor * med:
            reasons.append(f"‖ΔW‖ = {norm:.4g} is {norm / med:.1f}× the median {med:.4g} of {len(earlier)} earlier edits")
    if before is not None and after is not None:
        kl = unrelated_kl(before, after)
        out["unrelated_kl"] = round(kl, 5)
        if not kl <= settings.max_unrelated_kl:  # NaN flags too
            reasons.append(f"unrelated text moved: KL {kl:.3g} > {settings.max_unrelated_kl:g} nats")
    out["flag"] = bool(reasons)
    warnings = ["possible disabling edit: " + "; ".join(reasons) + " (undo it if the model misbehaves)"] if reasons else []
    if unedited is not None and after is not None:
        drift = unrelated_kl(unedited, after)
        out["drift_kl"] = round(drift, 5)
        out["drifted"] = not drift <= settings.max_drift_kl  # NaN counts as drifted
        if out["drifted"]:
            warnings.append(f"the {active_edits} edit(s) applied have moved the model away from the unedited one: "
                            f"KL {drift:.3g} > {settings.max_drift_kl:g} nats on neutral text (its perplexity on "
                            "ordinary text has likely risen; evaluate it, or undo edits)")
    if targets is not None:
        out["generates_target"] = sum(r["generates_target"] for _, r in targets)
        out["target_prob"] = round(min(r["target_prob"] for _, r in targets), 5) if targets else None
        missed = [(t, r) for t, r in targets if not r["generates_target"]]
        out["missed"] = len(missed)
        if missed:
            t, r = missed[0]
            more = f" (and {len(missed) - 1} more of {len(targets)})" if len(missed) > 1 else ""
            said = r["continuation"] if len(r["continuation"]) <= 60 else r["continuation"][:57] + "..."
            warnings.append(f"the edit did not take on its prompt: the model continues {said!r}, not "
                            f"{t!r} (P = {r['target_prob']:.2f}){more}; try another layer or method")
    if notes:
        out["notes"] = list(notes)
        warnings.extend(notes)
    out["warning"] = "; ".join(warnings)
    return out
