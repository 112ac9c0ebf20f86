"""The patch method's part of an edit session: neuron slots, growth, and computing patches.

An :class:`editing.session.EditSession` keeps every edit as factors on named parameters; patch
neurons (:mod:`editing.patch`) are parameters too, so undo, replay and the checks treat them as any
edit. What is particular to them lives here: which slots are free, growing a layer's neurons when
they are full (which re-pads every edit that wrote them, so the refold stays exact), and fitting a
saved edit's factors to the layer's current width.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from checkpoints.errors import WeightsmithError

from .hooks import get_module
from .methods import DEFAULT_METHOD, FALLBACK_METHOD
from .patch import (
    ROLES,
    attach,
    bias_spread,
    check_patchable,
    compute_patch,
    neurons_at,
    pad_factor,
    patch_module_name,
    slot_factors,
    slots_of,
    text_start_inputs,
    text_start_warning,
)
from .request import EditRequest

log = logging.getLogger(__name__)


class PatchEdits:
    """Mixin of :class:`editing.session.EditSession` (uses its model, spec, edits and pristine copies)."""

    def _patch_room(self, layer: int, needed: int = 1, factors: dict | None = None) -> list[int]:
        """Free neuron slots at ``layer`` (growing its patch neurons when full, and re-padding every
        edit that wrote them); with ``factors``, first grows to their width (a replayed edit)."""
        neurons = attach(self.model, self.spec, layer, self.patch_hparams.capacity)
        names = {patch_module_name(self.spec, layer, role): role for role in ROLES}
        used = {j for e in self._edits for m, f in e.factors.items() if names.get(m) == "gate_proj" for j in slots_of(f)}
        width = max([neurons.capacity] + [f[0].shape[0] for m, f in (factors or {}).items() if names.get(m) == "gate_proj"])
        while width - len(used) < needed:
            width *= 2
        if width > neurons.capacity:
            neurons.grow(width)
            for module in names:
                pname = self._param_name(module)
                if pname in self._pristine:
                    self._pristine[pname] = torch.zeros_like(self.model.get_parameter(pname))
            for e in self._edits:
                if any(m in names for m in e.factors):
                    e.factors = {m: pad_factor(names[m], *f, width) if m in names else f for m, f in e.factors.items()}
                    e.deltas = self._deltas(e.factors)
            log.info("patch neurons at layer %d: room for %d", layer, width)
        return [j for j in range(width) if j not in used][:needed]

    def _compute_patches(self, requests: list[EditRequest], layer: int, stages: Any
                         ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
        """Key-gated neurons (:mod:`editing.patch`) for ``requests`` at ``layer``, each computed on the
        model as it is (they fire on different subjects, so a batch's neurons do not see each other)."""
        check_patchable(self.model, self.spec)
        t0 = time.time()
        M = self.statistics(layer, progress=stages.first, kind="M")[layer]
        t_stats = time.time() - t0
        act = get_module(self.model, self.spec.module("mlp", layer)).act_fn
        made, infos, notes = [], [], []
        for i, r in enumerate(requests):
            det, down, info = compute_patch(self.model, self.tokenizer, self.spec, r, M, layer=layer,
                                            prefixes=self.prefixes(), rome_hparams=self.hparams,
                                            hparams=self.patch_hparams, act=act,
                                            progress=stages.rest if len(requests) == 1 else None)
            made.append((det, down))
            infos.append(info)
            notes.append(text_start_warning(det, self._text_starts(layer), self.tokenizer, r.subject))
            if len(requests) > 1:
                stages.rest((i + 1) / len(requests), f"neuron {i + 1} of {len(requests)}")
        # Only now are neurons added to the model: a refused patch leaves it exactly as it was.
        slots = self._patch_room(layer, len(requests))
        facs = slot_factors(made, slots, neurons_at(self.model, self.spec, layer).capacity)
        info = dict(infos[0]) if len(infos) == 1 else {"facts": infos}
        info.update({"slots": slots, "seconds_stats": round(t_stats, 3), "corpus": self.corpus.describe(),
                     "stats_tokens": self.stats_tokens})
        if any(notes):  # shown with the edit's checks (editing.checks.update_checks' ``notes``)
            info["notes"] = [n for n in notes if n]
        return {patch_module_name(self.spec, layer, role): f for role, f in facs.items()}, info

    def _text_starts(self, layer: int) -> tuple[torch.Tensor, list[int]]:
        """The layer's text-start inputs (:func:`editing.patch.text_start_inputs`), kept for the session:
        the base model's (patches only add to the MLP's output, so the inputs at their layer never change)."""
        if layer not in self._text_start_banks:
            with self._pristine_weights():
                self._text_start_banks[layer] = text_start_inputs(self.model, self.tokenizer, self.spec, layer)
        return self._text_start_banks[layer]

    def _default_method(self, layer: int) -> str:
        """What an edit uses when no method is named: ``patch`` where the model can hold it (a gated MLP
        with a near-constant input direction at ``layer``), else ``memit``; logged once per layer."""
        if layer not in self._defaults:
            reason = ""
            try:
                check_patchable(self.model, self.spec)
                spread = bias_spread(self.statistics(layer, kind="M")[layer], self.patch_hparams)
                if not spread <= self.patch_hparams.max_bias_spread:
                    reason = f"layer {layer}'s inputs have no near-constant direction (spread {spread:.0%})"
            except WeightsmithError as e:
                reason = str(e)
            self._defaults[layer] = FALLBACK_METHOD if reason else DEFAULT_METHOD
            log.info("default editing method at layer %d: %s%s", layer, self._defaults[layer],
                     f" (patch is not possible: {reason})" if reason else "")
        return self._defaults[layer]

    def _fit_patch_factors(self, layer: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
                           ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """A saved patch edit's factors at the layer's current width (growing the layer if they are wider)."""
        self._patch_room(layer, 0, factors)
        width = neurons_at(self.model, self.spec, layer).capacity
        return {m: pad_factor(m.rsplit(".", 1)[1], *f, width) for m, f in factors.items()}
