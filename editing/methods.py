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
# Key-gated neurons, by measurement (bench/sequential_edits.py, README "Editing"). Tuning half, records 0-99
# edited in sequence: retention 1.00, paraphrase 0.96, neighbourhood 0.69 against 0.71 unedited and
# WikiText perplexity ×1.000, where MEMIT one fact at a time (the earlier default) had 0.97 / 0.90 / 0.71
# and ×1.009, and reached ×1.08 at 300 edits. A patch leaves the model's weights alone and fires only on
# its subject, so a long sequence does not wear ordinary text down. A session whose model cannot hold
# patches (no gated MLP, or no near-constant input direction at the layer) uses FALLBACK_METHOD instead
# when no method is named (EditSession._default_method), and says so in its log.
DEFAULT_METHOD = "patch"
FALLBACK_METHOD = "memit"


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
