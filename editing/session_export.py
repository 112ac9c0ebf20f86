"""Writing an edit session's result: the full model (in the checkpoint's own dtype) or a LoRA adapter.

The model is written in the dtype the checkpoint was stored in (a bfloat16 model from the Hub stays
bfloat16, not twice its size in the float32 the session computes in). Rounding can undo part of an
edit, so a model stored in a narrower dtype than the session's is first checked at that precision
(:mod:`editing.stored_precision`): a fact that held in float32 and is lost when stored refuses the
export, with the dtype that keeps it; the check's line goes into the card and the export's result.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from checkpoints.cards import build_card, write_card
from checkpoints.errors import WeightsmithError
from checkpoints.peft_adapter import factors_from_state, tensor_key, unit_scale_config, write_adapter
from checkpoints.tensors import ShardedWriter

from .edit_card import edit_card
from .stored_precision import check_stored_precision

log = logging.getLogger(__name__)


def narrower(dtype: torch.dtype, than: torch.dtype) -> bool:
    """Whether storing ``than``-precision numbers in ``dtype`` rounds them (fewer mantissa bits)."""
    return torch.finfo(dtype).eps > torch.finfo(than).eps


class ExportEdits:
    """Mixin of :class:`editing.session.EditSession` (uses its model, spec, edits, history and ``store_dtype``)."""

    def export_model(self, out_dir: str | Path, *, scores: dict[str, Any] | None = None,
                     overwrite: bool = False, dtype: torch.dtype | None = None, widen: bool = False,
                     progress: Callable[[float, str], None] | None = None) -> Path:
        """Write the edited model as a full folder (weights, config, tokenizer, card); returns it.

        ``dtype``: of the stored weights; default the session's ``store_dtype`` (the checkpoint's own),
        else the model's. Narrower than the model's, the edits are checked at that precision first
        (:attr:`precision_report`), and a fact lost to the rounding raises before anything is written,
        or with ``widen`` (the app, whose Save has no dtype choice) writes the model's dtype instead; the
        report then keeps the lost facts, and its line says what was done. ``progress(fraction, text)``:
        the check's, fact by fact (the writing that follows streams tensor by tensor).
        """
        if not self._edits:
            raise WeightsmithError("no edits to export")
        from .patch import folded_state

        computed = next(self.model.parameters()).dtype
        dtype = dtype or self.store_dtype or computed
        self.precision_report = None
        if narrower(dtype, computed):
            report = check_stored_precision(self, dtype, progress=progress)
            log.info("%s (%.1f s)", report.line(), report.seconds)
            self.precision_report = report
            if not report.ok:
                if not widen:
                    raise WeightsmithError(f"{report.line()}: save in {str(computed).removeprefix('torch.')} instead")
                report.saved_in = str(computed).removeprefix("torch.")
                dtype = computed
        config = copy.deepcopy(self.model.config)
        config.dtype = dtype
        skip = set(self.spec.tied_head_names(config.to_dict()))
        state, width = folded_state(self.model, self.spec)  # patch neurons become rows of the MLP matrices
        if width is not None:
            config.intermediate_size = width
        with ShardedWriter(Path(out_dir), skip=skip, overwrite=overwrite, dtype=dtype) as w:
            for name, t in state.items():
                if name not in skip:
                    w.add(name, t.detach().cpu())
            w.write_text("config.json", config.to_json_string())
            gen = getattr(self.model, "generation_config", None)
            if gen is not None:
                w.write_text("generation_config.json", gen.to_json_string())
            with tempfile.TemporaryDirectory() as tmp:  # the tokenizer saves into a folder; the writer takes files
                self.tokenizer.save_pretrained(tmp)
                for f in sorted(Path(tmp).iterdir()):
                    w.add_file(f.name, f)
            w.write_text("edit_log.json", json.dumps(self.history, indent=2, default=str))
            card = edit_card(self, "finetune", scores, "transformers", precision=self.precision_report)
            w.add_file("README.md", str(build_card(card)).encode("utf-8"))
        return Path(out_dir)

    def stacked_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The active edits' update of ``module`` as one pair (B ``[out, r]``, A ``[r, in]``), ΣΔ = B·A
        exactly (float32), or None if no active edit touches it."""
        facs = [e.factors[module] for e in self._edits if module in e.factors]
        if not facs:
            return None
        return (torch.cat([b for b, _ in facs], dim=1).float().contiguous(),
                torch.cat([a for _, a in facs], dim=0).float().contiguous())

    def adapter_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """PEFT LoRA tensors (``base_model.model.<module>.lora_A/B.weight``) and rank per module."""
        modules = dict.fromkeys(module for e in self._edits for module in e.factors)  # first-edited order
        tensors, ranks = {}, {}
        for module in modules:
            B, A = self.stacked_factors(module)  # type: ignore[misc]
            tensors[tensor_key(module, "A")] = A
            tensors[tensor_key(module, "B")] = B
            ranks[module] = A.shape[0]
        return tensors, ranks

    def export_adapter(self, out_dir: str | Path, *, scores: dict[str, Any] | None = None,
                       overwrite: bool = False) -> Path:
        """Write the edits as a PEFT LoRA adapter (rank 1 per edit, ΔW = B·A); returns the folder.

        The factors stay float32: PEFT computes B·A in the adapter's dtype and adds it to the base's
        output, so the base model's storage does not round the update the way it rounds merged weights."""
        if not self._edits:
            raise WeightsmithError("no edits to export")
        if any(e.method == "patch" for e in self._edits):
            raise WeightsmithError("patch edits add neurons, which a LoRA adapter cannot hold: export the model, "
                                   "or use rome, r-rome or memit for an adapter")
        tensors, ranks = self.adapter_tensors()
        factors = factors_from_state(self.base_name, tensors)  # checked: finite, chaining
        # Scaling 1 for every module (lora_alpha = r per module), so PEFT's ΔW is B·A exactly.
        config = unit_scale_config(ranks, base_model=self.base_name, spec=self.spec)

        def extra(folder: Path) -> None:
            (folder / "edit_log.json").write_text(json.dumps(self.history, indent=2, default=str), encoding="utf-8")
            write_card(folder, edit_card(self, "adapter", scores, "peft"))

        return write_adapter(Path(out_dir), config, factors, extra=extra, overwrite=overwrite)

