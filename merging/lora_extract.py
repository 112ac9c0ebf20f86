"""Extract a LoRA adapter from a fine-tune: truncated SVD of each weight delta.

For every 2-D projection weight inside the transformer blocks, Δ = W_ft − W_base
(viewed ``[out, in]`` through the architecture map, so GPT-2's Conv1D is handled)
is factored as U·S·Vᵀ and truncated to rank r, chosen per module either as a
fixed rank or as the smallest rank keeping a share ``energy`` of Σσ². The
factors are split evenly, B = U·√S and A = √S·Vᵀ, and the adapter is written
with scaling 1 (``lora_alpha = r``, per module through ``rank_pattern`` /
``alpha_pattern`` when ranks differ) so PEFT loads it unchanged.

Tensors the adapter cannot carry (embeddings, norms, biases, the head) are
reported when they differ, never silently dropped.

Example::

    res = extract_lora("ft-folder", "demo", Path("out/extracted"), rank=16)
    res.max_relative_error, res.layers[0]
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from checkpoints.cards import CardInfo, write_card
from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Job
from checkpoints.peft_adapter import compact_targets, unit_scale_config, write_adapter
from checkpoints.sources import LocalCheckpoint, resolve

from .adapter_mix import Cancel, Progress, few_threads, job_from_callbacks, public_base

log = logging.getLogger(__name__)


@dataclass
class LayerError:
    """Reconstruction of one module: its rank, the share of Σσ² kept, ‖Δ − BA‖_F / ‖Δ‖_F."""

    module: str
    block: int | None
    rank: int
    full_rank: int
    energy: float
    relative_error: float


@dataclass
class ExtractResult:
    """What :func:`extract_lora` wrote: per-module errors, and deltas an adapter cannot hold."""

    out_dir: Path
    rank: int  # largest module rank (the config's r)
    layers: list[LayerError]
    not_captured: dict[str, float] = field(default_factory=dict)  # tensor -> ‖Δ‖/‖W_base‖
    unchanged: int = 0  # projection weights identical in both models (left out)
    seconds: float = 0.0

    @property
    def max_relative_error(self) -> float:
        return max((e.relative_error for e in self.layers), default=0.0)

    @property
    def mean_relative_error(self) -> float:
        return sum(e.relative_error for e in self.layers) / len(self.layers) if self.layers else 0.0


def choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """Rank to keep for singular values ``s`` (descending): ``rank``, or the energy threshold, or both (min)."""
    full = int(s.numel())
    r = full if rank is None else min(rank, full)
    if energy is not None:
        sq = s.double() ** 2
        cum = torch.cumsum(sq, 0) / sq.sum().clamp_min(1e-300)
        # smallest k with cum[k-1] >= energy (tiny slack for rounding of exactly 1.0)
        k = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1
        r = min(r, max(1, min(k, full)))
    return max(1, r)


def _check_pair(ft: LocalCheckpoint, base: LocalCheckpoint) -> None:
    if ft.model_type != base.model_type:
        raise WeightsmithError(f"{ft.name} is a {ft.model_type} model but the base {base.name} is {base.model_type}")
    fm, bm = ft.reader().metas(), base.reader().metas()
    for name, meta in bm.items():
        if name in fm and fm[name].shape != meta.shape:
            raise WeightsmithError(
                f"{ft.name} is not a fine-tune of {base.name}: {name} is {list(fm[name].shape)} vs {list(meta.shape)}"
            )
    missing = [n for n in bm if n not in fm and n not in base.tied_names()]
    if missing:
        raise WeightsmithError(f"{ft.name} lacks {len(missing)} tensor(s) of {base.name}, e.g. {missing[0]}")


def extract_lora(finetuned: str | Path, base: str | Path, out_dir: Path, rank: int | None = None,
                 energy: float | None = None, *, device: str | torch.device = "cpu", job: Job | None = None,
                 progress: Progress | None = None, cancel: Cancel | None = None,
                 overwrite: bool = False) -> ExtractResult:
    """Write a PEFT LoRA adapter approximating ``finetuned − base`` to ``out_dir``.

    Args:
        finetuned, base: anything :func:`checkpoints.sources.resolve` accepts.
        rank: keep at most this rank per module.
        energy: keep the smallest rank whose singular values hold this share (0–1] of Σσ².
            With both, the smaller rank wins; one of them is required.
        device: where the SVDs run.
        job: progress, cancel and log (:class:`checkpoints.jobs.Job`); ``progress``/``cancel``
            are the old keywords, kept for this session.

    Returns an :class:`ExtractResult` with the relative Frobenius error per module.
    """
    job = job_from_callbacks(job, progress, cancel)
    t0 = time.time()
    if rank is None and energy is None:
        raise WeightsmithError("extract-lora needs --rank or --energy")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise WeightsmithError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and not 0.0 < float(energy) <= 1.0:
        raise WeightsmithError(f"energy must be in (0, 1], got {energy!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise WeightsmithError(f"{out_dir} already exists (choose another folder)")
    ft_ckpt, base_ckpt = resolve(finetuned), resolve(base)
    _check_pair(ft_ckpt, base_ckpt)
    spec = base_ckpt.spec
    ft_reader, base_reader = ft_ckpt.reader(), base_ckpt.reader()
    names = base_reader.keys()

    layers: list[LayerError] = []
    not_captured: dict[str, float] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    unchanged = 0
    for i, name in enumerate(names):
        job.check("the extraction")
        if name not in ft_reader:
            continue
        w_base = base_reader.get(name, device=device)
        delta = ft_reader.get(name, device=device) - w_base
        loc = spec.locate(name)
        projection = loc.kind == "block" and name.endswith(".weight") and delta.ndim == 2
        if not projection:
            if not w_base.is_floating_point():
                continue
            norm = float(delta.norm())
            if norm > 0:
                not_captured[name] = norm / max(float(w_base.norm()), 1e-12)
            continue
        if not torch.any(delta):
            unchanged += 1
            continue
        d = spec.as_out_in(delta)  # [out, in]
        with few_threads(device):
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
        r = choose_rank(s, rank, energy)
        root = s[:r].sqrt()
        b = u[:, :r] * root  # [out, r]
        a = root[:, None] * vh[:r]  # [r, in]
        err = float((d - b @ a).norm() / d.norm())
        kept = float((s[:r].double() ** 2).sum() / (s.double() ** 2).sum())
        module = spec.module_name(name)  # as the loaded model names it (gpt2: transformer.h.N...), which PEFT matches
        layers.append(LayerError(module, loc.block, r, int(s.numel()), kept, err))
        factors[module] = (a, b)
        if i % 8 == 0:
            job.progress(0.9 * i / len(names), f"SVD of {name} (rank {r})")
    if not layers:
        raise WeightsmithError(f"{ft_ckpt.name} and {base_ckpt.name} have identical projection weights: nothing to extract")
    if not_captured:
        log.warning("%d tensor(s) outside the block projections differ and are not in the adapter (largest: %s)",
                    len(not_captured), max(not_captured, key=not_captured.get))

    max_rank = max(e.rank for e in layers)
    all_modules = _model_modules(base_ckpt, [e.module for e in layers])
    config = unit_scale_config({e.module: e.rank for e in layers}, base_model=public_base(base_ckpt), spec=spec,
                               target_modules=compact_targets([e.module for e in layers], all_modules))
    result = ExtractResult(out_dir, max_rank, layers, not_captured, unchanged)
    how = f"rank ≤ {rank}" if energy is None else (f"energy ≥ {energy:g}" + (f", rank ≤ {rank}" if rank else ""))
    summary = (f"A LoRA adapter extracted from the fine-tune {ft_ckpt.hub_id or ft_ckpt.name} by a truncated SVD "
               f"of each projection's weight delta ({how}; ranks {min(e.rank for e in layers)}–{max_rank}).")
    if not_captured:
        summary += (f"\n\n{len(not_captured)} other tensor(s) of the fine-tune differ from the base (embeddings, "
                    "norms or biases) and are not in this adapter.")
    card = CardInfo(title=out_dir.name, relation="adapter", base_models=[public_base(base_ckpt)], summary=summary,
                    library_name="peft", tags=["lora", "weightsmith", "extracted"],
                    scores={"modules": len(layers), "max rank": max_rank,
                            "mean relative error": result.mean_relative_error,
                            "max relative error": result.max_relative_error})
    job.progress(0.95, "writing adapter")
    write_adapter(out_dir, config, factors, extra=lambda folder: write_card(folder, card), overwrite=overwrite)
    result.seconds = time.time() - t0
    job.progress(1.0, f"extracted {len(layers)} modules (max rank {max_rank}) in {result.seconds:.1f} s")
    return result


def _model_modules(base: LocalCheckpoint, fallback: list[str]) -> list[str]:
    """All module paths of the base model (from a meta-device skeleton), for compact target lists."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(base.support_dir), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return [n for n, _ in model.named_modules()]
    except Exception:  # an unknown architecture: list the modules one by one instead
        return list(fallback)
