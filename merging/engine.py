"""The streaming merge engine: a recipe in, a complete Hugging Face folder out.

Steps:

1. resolve every model of the recipe and check them from their headers
   (architecture, layer count, vocabulary, every tensor's shape) before
   anything is computed: a mismatch is one error naming both models and the tensor;
2. plan each output tensor: its inputs, its depth ``t`` and its parameters
   (:mod:`merging.planning`, :mod:`merging.schedule`);
3. merge tensor by tensor in float32, each input read at the extent its checked
   header gave, the next tensor's inputs read ahead on a thread
   (:mod:`checkpoints.tensor_loading`); apply LiNeS when asked, and stream the
   result into a :class:`checkpoints.tensors.ShardedWriter`, so peak memory
   follows the largest tensor times the number of inputs;
4. add config, tokenizer, ``weightsmith_recipe.yml`` and a model card
   (:mod:`merging.merge_files`); the folder appears only when complete (a
   failure or a cancel leaves nothing).

Progress, cancel and log go through one :class:`checkpoints.jobs.Job`.

Example::

    with tqdm_job("merging") as job:
        result = run_merge(MergeRecipe.from_yaml("recipe.yml"), Path("out"), job=job)
    result.tensors_changed, result.block_norms
"""

from __future__ import annotations

import importlib
import logging
import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Cancelled, Job, StepCallback, legacy_job
from checkpoints.sources import LocalCheckpoint
from checkpoints.tensor_loading import Prefetcher, TensorLoader
from checkpoints.tensors import CheckpointReader, ShardedWriter

from .finite import FiniteCheck
from .lines import auto_alpha, lines_curve, lines_scale
from .merge_files import output_config, write_card, write_support
from .methods import MergeMethod, TensorContext
from .planning import (TensorInput, TensorPlan, check_compatible, first_model, header_bound, plan_merge, plan_numel,
                       resolve_models, resolve_params)
from .recipe import MergeRecipe
from .tokenizer_merge import merge_vocabularies

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 10**9

# Cancelling a merge raises the one job protocol's Cancelled; the old name still catches it.
MergeCancelled = Cancelled


@dataclass
class MergeResult:
    """What a merge did. ``block_norms`` maps each model's public name to the L2 norm
    of its task vector (θ − θ_base) in each block, for plotting; empty without a base."""

    out_dir: Path
    method: str
    tensors_total: int
    tensors_changed: int
    seconds: float
    num_blocks: int
    block_norms: dict[str, list[float]] = field(default_factory=dict)
    lines_alpha: float | None = None
    lines_beta: float | None = None
    lines_curve: list[float] | None = None
    output_bytes: int = 0
    files: list[str] = field(default_factory=list)
    finite_check: str = ""  # e.g. "all 272 output tensors finite (inputs checked too)"


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------

def run_merge(recipe: MergeRecipe, out_dir: Path | str, *, job: Job | None = None, device: str = "cpu",
              progress: StepCallback | None = None, cancel: threading.Event | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              overwrite: bool = False, seed: int | None = None, collect_norms: bool = True,
              threads: int | None = None, exact_ties: bool = True, fsync: bool = False,
              allow_nonfinite: bool = False, allow_local: bool = True,
              trusted_roots: Sequence[Path] = ()) -> MergeResult:
    """Run ``recipe`` and write the merged model to ``out_dir``.

    Args:
        recipe: a validated :class:`MergeRecipe`.
        out_dir: destination folder; it must not exist unless ``overwrite``.
        device: "cpu", "cuda", "cuda:1" or "auto"; an unavailable GPU falls back to the CPU with a warning.
        job: progress (one step per output tensor, named), cancel and log (see
            :mod:`checkpoints.jobs`); a cancelled job stops the merge at the next
            tensor and nothing is written.
        progress, cancel: the older ``progress(done, total, tensor_name)`` callback and
            cancel event, for callers not yet passing ``job`` (not both).
        max_shard_bytes: shard size of the output safetensors.
        seed: overrides the recipe's ``seed`` for random methods (dare, della).
        collect_norms: fill ``MergeResult.block_norms`` (per-block task-vector norms, for
            plotting). It costs two extra passes over each input, so the CLI turns it off.
        threads: torch intra-op threads for the duration of the merge (None: leave as is).
            The work is memory-bound; on a shared machine one thread is much faster
            than two fighting for cores, so the CLI defaults to 1. This sets a
            process-wide torch setting: leave it None in a multi-user server.
        exact_ties: when equal magnitudes straddle a TIES/breadcrumbs density cut, keep the
            ones mergekit's sort keeps (identical output; found by replaying the part of
            torch's sort that decides the cut, see ``sparsify.sorted_prefix_mask``); False
            takes them in index order (same number kept, differs from mergekit at those ties).
        fsync: wait until the weights are on disk before publishing the folder (survives a
            power loss; ~0.35 s per 0.5 GB on this machine's disk). Off by default, as in
            mergekit and ``save_pretrained``: the temp folder + rename already mean a failed,
            cancelled or killed merge never leaves a partial output.
        allow_nonfinite: merge inputs holding NaN/Inf and write non-finite outputs (counted in
            ``MergeResult.finite_check``) instead of stopping with an error naming the tensor.
        allow_local, trusted_roots: the resolver's policy for the recipe's models
            (see :func:`checkpoints.sources.resolve`).

    Returns a :class:`MergeResult`. Raises :class:`WeightsmithError` (one line) for
    bad input, :class:`checkpoints.jobs.Cancelled` (``MergeCancelled``) when cancelled.
    """
    if threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(max(1, int(threads)))
        try:
            return run_merge(recipe, out_dir, job=job, device=device, progress=progress, cancel=cancel,
                             max_shard_bytes=max_shard_bytes, overwrite=overwrite, seed=seed,
                             collect_norms=collect_norms, threads=None, exact_ties=exact_ties, fsync=fsync,
                             allow_nonfinite=allow_nonfinite, allow_local=allow_local, trusted_roots=trusted_roots)
        finally:
            torch.set_num_threads(previous)
    started = time.perf_counter()
    recipe.validate()
    method = recipe.method
    dev = _pick_device(device)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise WeightsmithError(f"{out_dir} already exists (choose another folder or allow overwrite)")
    if job is not None:
        job.progress(0.0, "checking models")
    ckpts = resolve_models(recipe, allow_local=allow_local, trusted_roots=trusted_roots)
    ckpts, vocab = merge_vocabularies(recipe, ckpts)  # tokenizer: union etc.: models seen in the output's vocabulary
    ref = ckpts[recipe.base_model] if recipe.base_model else ckpts[first_model(recipe)]
    check_compatible(recipe, ckpts)
    plans, num_blocks = plan_merge(recipe, method, ckpts, ref)
    finite = FiniteCheck(allow=allow_nonfinite)
    seed = recipe.seed if seed is None else seed
    lines = recipe.lines
    auto = lines is not None and lines.alpha == "auto"
    total_steps = len(plans) * (2 if auto else 1)
    job = legacy_job(job, progress, cancel, total_steps)
    norms = _NormTracker(recipe, ckpts, method, num_blocks, enabled=collect_norms)
    out_config = output_config(recipe, ref, num_blocks)
    skip = ref.spec.tied_head_names(out_config)

    # The model card needs huggingface_hub, whose import costs ~0.2 s of pure Python; doing it
    # on a thread while torch merges (GIL released) takes it off the merge's wall time.
    card_import = threading.Thread(target=importlib.import_module, args=("checkpoints.cards",),
                                   name="merge-card-import", daemon=True)
    card_import.start()
    changed = 0
    alpha: float | None = None
    capacity = max((plan_numel(p) for p in plans), default=0)
    # Scratch for every step's results, apart from the prefetcher's read buffers: a step's result
    # is written before the next step computes, so one pool serves them all (fresh memory's first
    # touch cost ~0.25 s per 100 MB buffer here; each read buffer used to carry its own).
    loader = TensorLoader(capacity=capacity)
    # Methods that only read their inputs get mapped views of the files (no read copy).
    mapped = dev.type == "cpu" and method.reads_inputs_only

    def read(i: int, pool: TensorLoader) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        return _read_inputs(plans[i], recipe, dev, pool, finite)

    skipped = {i for i, p in enumerate(plans) if p.out_name in skip}
    with Prefetcher([plan_numel(p) for p in plans], read, capacity, skip=skipped.__contains__,
                    mapped=mapped) as prefetch, \
            ShardedWriter(out_dir, max_shard_bytes=max_shard_bytes, skip=skip, overwrite=overwrite,
                          header_reserve=header_bound(plans, skip), fsync=fsync) as writer:
        spill_dir = Path(tempfile.mkdtemp(prefix=".lines-spill-", dir=out_dir.parent)) if auto else None
        try:
            sum_l1 = merged_l1 = 0.0
            direct: set[int] = set()
            for i, plan in enumerate(plans):
                job.check("the merge")
                if i in skipped:
                    job.step(i + 1, total_steps, plan.out_name)
                    continue
                inputs, _ = prefetch.take(i)
                prefetch.start_after(i)  # read the next tensor while this one is merged and written
                loader.reset()
                merged, base = _merge_one(plan, method, inputs, dev, seed, norms, loader, want_task_sum=auto,
                                          exact_ties=exact_ties)
                del inputs
                if not merged.is_floating_point():  # integer buffers are copied, never scaled
                    writer.add(plan.out_name, merged)
                    direct.add(i)
                elif auto:
                    tau = merged.sub_(base) if base is not None else merged
                    sum_l1 += float(norms.last_task_sum_l1)
                    merged_l1 += float(tau.abs().sum(dtype=torch.float64))
                    _spill(spill_dir, i, tau)
                else:
                    if lines is not None and base is not None:
                        merged = _apply_lines(merged, base, lines_scale(plan.block, num_blocks, float(lines.alpha), lines.beta))
                    changed += _changed(merged, base, plan, recipe)
                    writer.add(plan.out_name, finite.output(plan.out_name, merged.to(plan.out_dtype)))
                del merged, base
                job.step(i + 1, total_steps, plan.out_name)
            if auto:
                alpha = auto_alpha(sum_l1, merged_l1, len(plans[0].inputs) if plans else 1)
                log.info("LiNeS auto alpha = %.6g (Σ‖τ_t‖₁ %.6g, ‖τ_merged‖₁ %.6g)", alpha, sum_l1, merged_l1)
                for i, plan in enumerate(plans):
                    job.check("the merge")
                    loader.reset()
                    if i not in skipped and i not in direct:
                        base = _load(plan.base, recipe, dev, loader) if plan.base is not None else None
                        tau = _unspill(spill_dir, i, dev)
                        scale = lines_scale(plan.block, num_blocks, alpha, lines.beta)  # type: ignore[union-attr]
                        merged = base.clone() if scale == 0 else tau.mul_(scale).add_(base)
                        changed += _changed(merged, base, plan, recipe)
                        writer.add(plan.out_name, finite.output(plan.out_name, merged.to(plan.out_dtype)))
                        del base, tau, merged
                    job.step(len(plans) + i + 1, total_steps, plan.out_name)
        finally:
            if spill_dir is not None:
                shutil.rmtree(spill_dir, ignore_errors=True)
        job.check("the merge")
        write_support(writer, recipe, ckpts, ref, out_config, vocab)
        write_card(writer, recipe, method, ckpts, alpha)
    if lines is not None and alpha is None:
        alpha = float(lines.alpha)
    files = sorted(p.name for p in out_dir.iterdir())
    return MergeResult(
        out_dir=out_dir, method=method.name, tensors_total=len(plans) - len(skipped),
        tensors_changed=changed, seconds=time.perf_counter() - started, num_blocks=num_blocks,
        block_norms=norms.result(), lines_alpha=alpha, lines_beta=lines.beta if lines else None,
        lines_curve=lines_curve(alpha, lines.beta, num_blocks) if lines is not None and alpha is not None else None,
        output_bytes=sum(p.stat().st_size for p in out_dir.glob("*.safetensors")), files=files,
        finite_check=finite.summary(),
    )


def check_recipe(recipe: MergeRecipe, *, allow_local: bool = True,
                 trusted_roots: Sequence[Path] = ()) -> dict[str, object]:
    """Resolve and header-check a recipe without merging; returns a summary (for the app's Check button)."""
    recipe.validate()
    ckpts = resolve_models(recipe, allow_local=allow_local, trusted_roots=trusted_roots)
    ckpts, _ = merge_vocabularies(recipe, ckpts)
    ref = ckpts[recipe.base_model] if recipe.base_model else ckpts[first_model(recipe)]
    check_compatible(recipe, ckpts)
    plans, num_blocks = plan_merge(recipe, recipe.method, ckpts, ref)
    return {"method": recipe.merge_method, "architecture": ref.model_type, "blocks": num_blocks,
            "tensors": len(plans), "models": [c.name for c in ckpts.values()]}


def _pick_device(device: str) -> torch.device:
    d = (device or "cpu").strip()
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available; using the CPU", d)
        d = "cpu"
    try:
        return torch.device(d)
    except RuntimeError:
        raise WeightsmithError(f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)") from None


# ---------------------------------------------------------------------------
# Merging one tensor
# ---------------------------------------------------------------------------

def _load(inp: TensorInput, recipe: MergeRecipe, dev: torch.device, loader: TensorLoader) -> torch.Tensor:
    return loader.get(inp.ckpt.reader(), inp.name, recipe.torch_dtype("dtype")).to(dev)


def _read_inputs(plan: TensorPlan, recipe: MergeRecipe, dev: torch.device, loader: TensorLoader,
                 finite: FiniteCheck | None = None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    base = _load(plan.base, recipe, dev, loader) if plan.base is not None else None
    tensors = [_load(inp, recipe, dev, loader) for inp in plan.inputs]
    if finite is not None:
        for inp, t in ((plan.base, base), *zip(plan.inputs, tensors)):
            if t is not None:
                finite.input(t, inp.ckpt.name, inp.name)
    return base, tensors


def _merge_one(plan: TensorPlan, method: MergeMethod, inputs: tuple[torch.Tensor | None, list[torch.Tensor]],
               dev: torch.device, seed: int | None, norms: _NormTracker, loader: TensorLoader, *,
               want_task_sum: bool, exact_ties: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge one tensor from its inputs (base, others); returns (merged, base)."""
    base, tensors = inputs
    first = base if base is not None else tensors[0]
    if not first.is_floating_point():
        # Integer buffers (position ids...) are not merged: keep the base's (or first model's).
        return first, base
    shared, per_model = resolve_params(method, plan)
    norms.last_task_sum_l1 = 0.0
    # Which side of a stored 2-D weight is its output comes from the architecture map (GPT-2's
    # Conv1D stores [in, out]); Iso-CTS projects on the output side.
    spec = (plan.base or plan.inputs[0]).ckpt.spec
    transposed = first.dim() == 2 and spec.module_transposed(spec.module_name(plan.out_name))
    ctx = TensorContext(plan.out_name, seed=seed or 0, device=dev, transposed=transposed,
                        new_tensor=loader.empty if dev.type == "cpu" else None, exact_ties=exact_ties)
    if base is not None and (norms.enabled or want_task_sum):
        if method.observes:
            if norms.enabled:
                ctx.observe_delta = lambda i, d: norms.add(plan, i, d)
            if want_task_sum:
                ctx.observe_task_sum = norms.set_task_sum
        else:
            total = torch.zeros_like(base) if want_task_sum else None
            for i, t in enumerate(tensors):
                d = t - base
                norms.add(plan, i, d)
                if total is not None:
                    total.add_(d)
                del d
            if total is not None:
                norms.set_task_sum(total)
                del total
    merged = method.func(base, tensors, shared, per_model, ctx)
    return merged, base


def _apply_lines(merged: torch.Tensor, base: torch.Tensor, scale: float) -> torch.Tensor:
    """θ_base + scale·(merged − θ_base); exact at scale 1 (merged) and 0 (base)."""
    if scale == 1:
        return merged
    if scale == 0:
        return base.clone()
    return merged.sub_(base).mul_(scale).add_(base)


def _changed(merged: torch.Tensor, base: torch.Tensor | None, plan: TensorPlan, recipe: MergeRecipe) -> int:
    if base is None:
        if not plan.inputs:
            return 0
        first = _load(plan.inputs[0], recipe, merged.device, TensorLoader())
        return int(not torch.equal(merged.to(first.dtype), first))
    return int(not torch.equal(merged, base))


def _spill(folder: Path, index: int, tensor: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file({"t": tensor.detach().to("cpu").contiguous()}, str(folder / f"{index:06d}.safetensors"))


def _unspill(folder: Path, index: int, dev: torch.device) -> torch.Tensor:
    path = folder / f"{index:06d}.safetensors"
    t = CheckpointReader.from_files([path]).get("t", dtype=None)
    path.unlink()
    return t.to(dev)


class _NormTracker:
    """Per-block L2 norms of each model's task vector, accumulated as squares."""

    def __init__(self, recipe: MergeRecipe, ckpts: dict[str, LocalCheckpoint], method: MergeMethod, num_blocks: int,
                 *, enabled: bool = True):
        self.enabled = (enabled and bool(recipe.models) and recipe.base_model is not None
                        and method.needs_base != "none")
        self.names = [ckpts[m.model].name for m in recipe.non_base_models()] if self.enabled else []
        self.num_blocks = num_blocks
        self.squares = [[0.0] * num_blocks for _ in self.names]
        self.last_task_sum_l1 = 0.0

    def add(self, plan: TensorPlan, i: int, delta: torch.Tensor) -> None:
        if self.enabled and plan.block is not None and plan.block < self.num_blocks:
            self.squares[i][plan.block] += float(torch.linalg.vector_norm(delta)) ** 2

    def set_task_sum(self, total: torch.Tensor) -> None:
        self.last_task_sum_l1 = float(total.abs().sum(dtype=torch.float64))

    def result(self) -> dict[str, list[float]]:
        return {name: [math.sqrt(s) for s in sq] for name, sq in zip(self.names, self.squares)}
