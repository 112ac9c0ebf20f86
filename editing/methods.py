"""The editing methods a session offers, by name, and how each maps onto ROME/MEMIT settings.

* ``rome``: ROME as in the authors' code: ΔW exact at the bare prompt's key k(s)
  (``RomeHyperParams.update_at`` as configured, default "prompt");
* ``r-rome``: "Rebuilding ROME" (Gupta et al. 2024): ΔW exact at the mean key k*,
  the key v* was optimised for (``update_at="mean"``; ``value_from`` picks v*'s base);
* ``alphaedit``: AlphaEdit at ROME's single layer: r-ROME's k*/v*, update projected
  onto the null space of the preserved keys and of the session's earlier edits;
* ``memit``: MEMIT, several facts over several layers;
* ``alphaedit-memit``: AlphaEdit as published: MEMIT's targets, projected updates;
* ``patch``: one new MLP neuron per fact that fires only on its subject (key-gated neurons,
  :mod:`editing.patch`; Transformer-Patcher's idea with a whitened detector): the model's own
  weights are untouched, so a long sequence does not wear ordinary text down.

``DEFAULT_METHOD`` is what a session uses when no method is named; it is chosen by
measurement on the CounterFact tuning half (bench/), so switching it is this one line.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from checkpoints.errors import WeightsmithError

if TYPE_CHECKING:  # the CLI imports this module to build its parser: no torch at import time
    from .rome import RomeHyperParams

METHODS: tuple[str, ...] = ("rome", "r-rome", "alphaedit", "memit", "alphaedit-memit", "patch")
SINGLE_LAYER: tuple[str, ...] = ("rome", "r-rome", "alphaedit", "patch")
MULTI_LAYER: tuple[str, ...] = ("memit", "alphaedit-memit")
# MEMIT one fact at a time, by measurement on the tuning half (records 0-199 edited in sequence): at 200
# edits retention 0.965, paraphrase 0.895, neighbourhood 0.685 against 0.69 unedited and perplexity 1.036x,
# where r-ROME reached 1.240x and ROME made disabling edits (tuning record 258: ‖ΔW‖ 42× ‖W‖). Spreading a
# fact over four layers makes each layer's update a quarter as large, so later edits disturb less of what
# earlier ones and ordinary text rely on. Single edits score as r-ROME's (records 500-524: 1.00/0.88/0.72).
# README, "Editing", has the tables.
DEFAULT_METHOD = "memit"


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
    if m == "patch":  # a batch of patches is one neuron per fact, as one history entry
        return m
    if m in MULTI_LAYER or m == "alphaedit":
        return "alphaedit-memit" if m == "alphaedit" else m
    return "memit"


def rome_hparams_for(method: str, hparams: "RomeHyperParams") -> "RomeHyperParams":
    """ROME settings that realise ``method`` (r-ROME and AlphaEdit make the update at k*)."""
    if method in ("r-rome", "alphaedit"):
        return replace(hparams, update_at="mean")
    return hparams
