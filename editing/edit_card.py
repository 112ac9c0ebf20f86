"""The card of an edited model or adapter, made from an :class:`EditSession`'s history."""

from __future__ import annotations

import json
from typing import Any

from checkpoints.cards import CardInfo


def edit_card(session: Any, relation: str, scores: dict[str, Any] | None, library: str, *,
              precision: Any = None) -> CardInfo:
    """The model card of an edit session's active edits (``EditSession``): what was rewritten, how,
    every edit's checks, and ``precision`` (a :class:`editing.stored_precision.PrecisionReport`: the
    edits checked in the dtype the weights are stored in). Typed Any: the session imports this module."""
    log_rows = []
    for e in session.edits:
        for r in e.requests:
            row = r.as_dict()
            row["layer"] = ",".join(map(str, e.layers))
            row["method"] = e.method
            row["check"] = e.warning or "ok"
            log_rows.append(row)
    facts = "; ".join(f"{r['subject']} → {r['target_new']}" for r in log_rows)
    methods = sorted({e.method for e in session.edits})
    summary = (f"{session.base_name} with {len(log_rows)} fact(s) rewritten by "
               f"{'ROME (rank-one MLP edits)' if methods == ['rome'] else ', '.join(methods)}: {facts}.\n\n"
               f"Statistics corpus: {session.corpus.name}.")
    checks = [e.info.get("checks", {}) for e in session.edits]
    flagged = [e.id for e, c in zip(session.edits, checks) if c.get("flag")]
    missed = [e.id for e, c in zip(session.edits, checks) if c.get("missed")]
    if flagged:
        summary += (f"\n\n**Warning:** edit(s) {', '.join(map(str, flagged))} looked like disabling edits "
                    "(see the check column of the edit log).")
    if missed:
        summary += (f"\n\n**Warning:** edit(s) {', '.join(map(str, missed))} did not take on their own prompt "
                    "(see the check column of the edit log).")
    if "patch" in methods:
        summary += ("\n\nEdits by the patch method are new MLP neurons, one per fact, that fire only on their "
                    "subject (key-gated neurons); they are stored as extra rows of the MLP matrices, so the model "
                    "config's `intermediate_size` is larger than the base model's.")
    if precision is not None:
        summary += f"\n\nChecked after rounding the edited weights for storage: {precision.line()}."
    if relation == "adapter":
        summary += ("\n\nThe edits are stored as a LoRA adapter on the edited down projection(s), "
                    "rank 1 per edit, with ΔW = B·A exactly.")
    return CardInfo(title=f"{session.base_name.split('/')[-1]}-edited", relation=relation,  # type: ignore[arg-type]
                    base_models=[session.base_name], summary=summary, library_name=library,  # type: ignore[arg-type]
                    tags=["weightsmith", *sorted({e.method for e in session.edits}), "knowledge-editing"],
                    edit_log=log_rows, scores=scores,
                    extra_sections={"Edit details": "```json\n" + json.dumps(session.history, indent=1, default=str) + "\n```"})
