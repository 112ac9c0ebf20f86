"""The editing methods a session offers, by name, and how each maps onto ROME/MEMIT settings.

* ``rome``: ROME as in the authors' code: ΔW exact at the bare prompt's key k(s)
  (``RomeHyperParams.update_at`` as configured, default "prompt");
* ``r-rome``: "Rebuilding ROME" (Gupta et al. 2024): ΔW exact at the mean key k*,
  the key v* was optimised for (``update_at="mean"``; ``value_from`` picks v*'s base);
* ``alphaedit``: AlphaEdit at ROME's single layer: r-ROME's k*/v*, update projected
  onto the null space of the preserved keys and of the session's earlier edits;
* ``memit``: MEMIT, several facts over several layers;
* ``alphaedit-memit``: AlphaEdit as published: MEMIT's targets, projected updates.

``DEFAULT_METHOD`` is what a session uses when no method is named; it is chosen by
measurement on the CounterFact tuning half (bench/), so switching it is this one line.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from checkpoints.errors import WeightsmithError

if TYPE_CHECKING:  # the CLI imports this module to build its parser: no torch at import time
    from .rome import RomeHyperParams

METHODS: tuple[str, ...] = ("rome", "r-rome", "alphaedit", "memit", "alphaedit-memit")
SINGLE_LAYER: tuple[str, ...] = ("rome", "r-rome", "alphaedit")
MULTI_LAYER: tuple[str, ...] = ("memit", "alphaedit-memit")
# r-ROME, not ROME, by measurement: ROME's update (exact at the bare prompt's key) made disabling edits on
# both halves of CounterFact (tuning record 258: ‖ΔW‖ 42× ‖W‖, "The capital of France is" -> ", the, [,,,,";
# report half, 60 sequential edits: perplexity ×1.52, two flagged updates up to 226 against a median of 29),
# where r-ROME kept perplexity within ×1.05 with retention 1.00 and no flag. The price on single edits
# (records 500-524): paraphrase 0.88 against 0.96. README, "Editing", has the tables.
DEFAULT_METHOD = "r-rome"


def check_method(method: str | None) -> str:
    """The method's canonical name, or one clear error listing the choices."""
    m = (method or DEFAULT_METHOD).strip().lower().replace("_", "-")
    if m == "rrome":
        m = "r-rome"
    if m not in METHODS:
        raise WeightsmithError(f"unknown editing method {method!r}: choose one of {', '.join(METHODS)}")
    return m


def batch_method(method: str | None) -> str:
    """The method that applies a batch for a user who chose ``method`` for single edits.

    ROME and r-ROME edit one fact at a time, so a batch goes to MEMIT; an AlphaEdit
    choice keeps its null-space projection (``alphaedit-memit``).
    """
    m = check_method(method)
    if m in MULTI_LAYER or m == "alphaedit":
        return "alphaedit-memit" if m == "alphaedit" else m
    return "memit"


def rome_hparams_for(method: str, hparams: "RomeHyperParams") -> "RomeHyperParams":
    """ROME settings that realise ``method`` (r-ROME and AlphaEdit make the update at k*)."""
    if method in ("r-rome", "alphaedit"):
        return replace(hparams, update_at="mean")
    return hparams
