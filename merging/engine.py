"""The streaming merge engine: a recipe in, a complete Hugging Face folder out.

Steps:

1. resolve every model of the recipe and check them from their headers
   (architecture, layer count, vocabulary, every tensor's shape) before
   anything is computed: a mismatch is one error naming both models and the tensor;
2. plan each output tensor: its inputs, its depth ``t`` and its parameters
   (see :mod:`merging.schedule`);
3. merge tensor by tensor in float32 (each input read lazily from its shard),
   apply LiNeS when asked, and stream the result into a
   :class:`checkpoints.tensors.ShardedWriter`, so peak memory follows the
   largest tensor times the number of inputs;
4. add config, tokenizer, ``weightsmith_recipe.yml`` and a model card; the
   folder appears only when complete (a failure or a cancel leaves nothing).

Example::

    result = run_merge(MergeRecipe.from_yaml("recipe.yml"), Path("out"), progress=lambda d, n, name: None)
    result.tensors_changed, result.block_norms
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import mmap
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from checkpoints.arch import ArchSpec
from checkpoints.errors import WeightsmithError
from checkpoints.sources import LocalCheckpoint, public_name, resolve
from checkpoints.tensors import SUPPORT_FILES, ShardedWriter, tied_head_names

from .finite import FiniteCheck
from .lines import auto_alpha, lines_curve, lines_scale
from .methods import MergeMethod, TensorContext
from .recipe import MergeRecipe
from .schedule import depth_t, resolve as resolve_setting

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
DEFAULT_SHARD_BYTES = 5 * 10**9
RECIPE_NAME = "weightsmith_recipe.yml"
TOKENIZER_FILES = tuple(n for n in SUPPORT_FILES if n not in ("config.json", "generation_config.json"))


class MergeCancelled(WeightsmithError):
    """Raised when the ``cancel`` event is set; nothing is written."""


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


@dataclass
class _Input:
    ckpt: LocalCheckpoint
    name: str  # tensor name inside that checkpoint
    scopes: list[dict[str, Any]]  # per-model parameter scopes, highest precedence first


@dataclass
class _TensorPlan:
    out_name: str
    block: int | None  # output block, for LiNeS and the norms plot
    t: float
    base: _Input | None
    inputs: list[_Input]
    shared_scopes: list[dict[str, Any]]
    out_dtype: torch.dtype


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------

def run_merge(recipe: MergeRecipe, out_dir: Path | str, *, device: str = "cpu", progress: Progress | None = None,
              cancel: threading.Event | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              overwrite: bool = False, seed: int | None = None, collect_norms: bool = True,
              threads: int | None = None, exact_ties: bool = True, fsync: bool = False,
              allow_nonfinite: bool = False, allow_local: bool = True,
              trusted_roots: Sequence[Path] = ()) -> MergeResult:
    """Run ``recipe`` and write the merged model to ``out_dir``.

    Args:
        recipe: a validated :class:`MergeRecipe`.
        out_dir: destination folder; it must not exist unless ``overwrite``.
        device: "cpu", "cuda", "cuda:1" or "auto"; an unavailable GPU falls back to the CPU with a warning.
        progress: called as ``progress(done, total, tensor_name)`` after each tensor.
        cancel: when set, the merge stops at the next tensor and nothing is written.
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
    bad input, :class:`MergeCancelled` when cancelled.
    """
    if threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(max(1, int(threads)))
        try:
            return run_merge(recipe, out_dir, device=device, progress=progress, cancel=cancel,
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
    ckpts = _resolve_models(recipe, allow_local=allow_local, trusted_roots=trusted_roots)
    ref = ckpts[recipe.base_model] if recipe.base_model else ckpts[_first_model(recipe)]
    _check_compatible(recipe, ckpts)
    plans, num_blocks = _plan(recipe, method, ckpts, ref)
    finite = FiniteCheck(allow=allow_nonfinite)
    seed = recipe.seed if seed is None else seed
    lines = recipe.lines
    auto = lines is not None and lines.alpha == "auto"
    total_steps = len(plans) * (2 if auto else 1)
    norms = _NormTracker(recipe, ckpts, method, num_blocks, enabled=collect_norms)
    out_config = _output_config(recipe, ref, num_blocks)
    skip = tied_head_names(out_config, ref.spec)

    # The model card needs huggingface_hub, whose import costs ~0.2 s of pure Python; doing it
    # on a thread while torch merges (GIL released) takes it off the merge's wall time.
    card_import = threading.Thread(target=importlib.import_module, args=("checkpoints.cards",),
                                   name="merge-card-import", daemon=True)
    card_import.start()
    changed = 0
    alpha: float | None = None
    capacity = max((_numel(p) for p in plans), default=0)
    loader = _Loader(capacity=capacity)
    # Methods that only read their inputs get mapped views of the files (no read copy).
    mapped = dev.type == "cpu" and method.reads_inputs_only
    with _Prefetcher(plans, skip, recipe, dev, capacity, mapped=mapped, finite=finite) as prefetch, ShardedWriter(out_dir, max_shard_bytes=max_shard_bytes, skip=skip, overwrite=overwrite,
                       header_reserve=_header_bound(plans, skip), fsync=fsync) as writer:
        spill_dir = Path(tempfile.mkdtemp(prefix=".lines-spill-", dir=out_dir.parent)) if auto else None
        try:
            sum_l1 = merged_l1 = 0.0
            direct: set[int] = set()
            for i, plan in enumerate(plans):
                _check_cancel(cancel)
                if plan.out_name in skip:
                    _report(progress, i + 1, total_steps, plan.out_name)
                    continue
                inputs, buffers = prefetch.take(i)
                prefetch.start_after(i)  # read the next tensor while this one is merged and written
                merged, base = _merge_one(plan, method, recipe, dev, seed, norms, buffers, want_task_sum=auto,
                                          exact_ties=exact_ties, inputs=inputs)
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
                _report(progress, i + 1, total_steps, plan.out_name)
            if auto:
                alpha = auto_alpha(sum_l1, merged_l1, len(plans[0].inputs) if plans else 1)
                log.info("LiNeS auto alpha = %.6g (Σ‖τ_t‖₁ %.6g, ‖τ_merged‖₁ %.6g)", alpha, sum_l1, merged_l1)
                for i, plan in enumerate(plans):
                    _check_cancel(cancel)
                    loader.reset()
                    if plan.out_name not in skip and i not in direct:
                        base = _load(plan.base, recipe, dev, loader) if plan.base is not None else None
                        tau = _unspill(spill_dir, i, dev)
                        scale = lines_scale(plan.block, num_blocks, alpha, lines.beta)  # type: ignore[union-attr]
                        merged = base.clone() if scale == 0 else tau.mul_(scale).add_(base)
                        changed += _changed(merged, base, plan, recipe)
                        writer.add(plan.out_name, finite.output(plan.out_name, merged.to(plan.out_dtype)))
                        del base, tau, merged
                    _report(progress, len(plans) + i + 1, total_steps, plan.out_name)
        finally:
            if spill_dir is not None:
                shutil.rmtree(spill_dir, ignore_errors=True)
        _check_cancel(cancel)
        _write_support(writer, recipe, ckpts, ref, out_config)
        _write_card(writer, recipe, method, ckpts, alpha)
    if lines is not None and alpha is None:
        alpha = float(lines.alpha)
    files = sorted(p.name for p in out_dir.iterdir())
    return MergeResult(
        out_dir=out_dir, method=method.name, tensors_total=len(plans) - len([p for p in plans if p.out_name in skip]),
        tensors_changed=changed, seconds=time.perf_counter() - started, num_blocks=num_blocks,
        block_norms=norms.result(), lines_alpha=alpha, lines_beta=lines.beta if lines else None,
        lines_curve=lines_curve(alpha, lines.beta, num_blocks) if lines is not None and alpha is not None else None,
        output_bytes=sum(p.stat().st_size for p in out_dir.glob("*.safetensors")), files=files,
        finite_check=finite.summary(),
    )


def check_recipe(recipe: MergeRecipe, *, allow_local: bool = True,
                 trusted_roots: Sequence[Path] = ()) -> dict[str, Any]:
    """Resolve and header-check a recipe without merging; returns a summary (for the app's Check button)."""
    recipe.validate()
    ckpts = _resolve_models(recipe, allow_local=allow_local, trusted_roots=trusted_roots)
    ref = ckpts[recipe.base_model] if recipe.base_model else ckpts[_first_model(recipe)]
    _check_compatible(recipe, ckpts)
    plans, num_blocks = _plan(recipe, recipe.method, ckpts, ref)
    return {"method": recipe.merge_method, "architecture": ref.model_type, "blocks": num_blocks,
            "tensors": len(plans), "models": [c.name for c in ckpts.values()]}


# ---------------------------------------------------------------------------
# Resolution and header checks
# ---------------------------------------------------------------------------

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


def _first_model(recipe: MergeRecipe) -> str:
    return recipe.models[0].model if recipe.models else recipe.slices[0].sources[0].model


def _resolve_models(recipe: MergeRecipe, *, allow_local: bool = True,
                    trusted_roots: Sequence[Path] = ()) -> dict[str, LocalCheckpoint]:
    out: dict[str, LocalCheckpoint] = {}
    for ref in recipe.model_refs():
        try:
            out[ref] = resolve(ref, allow_local=allow_local, trusted_roots=trusted_roots)
        except WeightsmithError as e:
            raise WeightsmithError(f"model {ref!r} of the recipe: {e}") from None
    return out


def _vocab(ckpt: LocalCheckpoint) -> int | None:
    v = ckpt.config.get("vocab_size")
    return int(v) if isinstance(v, int) else None


def _check_compatible(recipe: MergeRecipe, ckpts: dict[str, LocalCheckpoint]) -> None:
    """Architecture, layer count and vocabulary agree (shapes are checked per tensor by the planner)."""
    items = list(ckpts.items())
    first_ref, first = items[0]
    for ref, c in items[1:]:
        if c.model_type != first.model_type:
            raise WeightsmithError(
                f"different architectures: {first.name} is {first.model_type} but {c.name} is {c.model_type}"
            )
        if _vocab(c) != _vocab(first):
            emb = next(iter(first.spec.embeddings), "embeddings")
            raise WeightsmithError(
                f"different vocabularies: {first.name} has vocab_size {_vocab(first)} but {c.name} has "
                f"{_vocab(c)} (tensor {emb}.weight)"
            )
        if recipe.models and c.num_layers != first.num_layers:
            raise WeightsmithError(
                f"different layer counts: {first.name} has {first.num_layers} layers but {c.name} has {c.num_layers}"
            )
    for ref, c in items:
        c.check_matches_config()


# ---------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------

_BLOCK_INDEX = re.compile(r"(^|\.)(\d+)\.")


def _rename_block(spec: ArchSpec, name: str, new_block: int) -> str:
    """``name`` with its block index replaced (the index the architecture map reports)."""
    block = spec.block_of(name)
    for m in _BLOCK_INDEX.finditer(name):
        if int(m.group(2)) == block:
            return name[: m.start(2)] + str(new_block) + name[m.end(2):]
    raise WeightsmithError(f"cannot find the block index in tensor name {name!r}")


def _tensor_in(ckpt: LocalCheckpoint, name: str, spec: ArchSpec) -> str | None:
    """The name under which ``ckpt`` stores ``name`` (a tied head is its embedding), or None."""
    reader = ckpt.reader()
    if name in reader:
        return name
    if name in ckpt.tied_names():
        for emb in spec.embeddings[:1]:
            for cand in (f"{emb}.weight", f"{spec.strip_optional_prefix(emb)}.weight"):
                if cand in reader:
                    return cand
    return None


def _input(ckpt: LocalCheckpoint, name: str, scopes: list[dict[str, Any]], ref: LocalCheckpoint, ref_name: str) -> _Input:
    """Input ``name`` of ``ckpt``, checked against the shape of ``ref_name`` in the reference model."""
    stored = _tensor_in(ckpt, name, ref.spec)
    if stored is None:
        raise WeightsmithError(f"tensor {name} is in {ref.name} but not in {ckpt.name}")
    have = ckpt.reader().meta(stored).shape
    want_name = _tensor_in(ref, ref_name, ref.spec)
    if want_name is not None:
        want = ref.reader().meta(want_name).shape
        if have != want:
            raise WeightsmithError(
                f"shape mismatch in tensor {name}: {ref.name} has {list(want)} but {ckpt.name} has {list(have)}"
            )
    return _Input(ckpt, stored, scopes)


def _numel(plan: _TensorPlan) -> int:
    src = plan.base or plan.inputs[0]
    return math.prod(src.ckpt.reader().meta(src.name).shape)


def _header_bound(plans: list[_TensorPlan], skip: list[str]) -> int:
    """Bytes a shard header can need if every planned tensor lands in it (so the writer can
    reserve that much and finish shards in place rather than copy them)."""
    total = 512  # "__metadata__" and the length prefix
    for plan in plans:
        if plan.out_name in skip:
            continue
        src = plan.base or plan.inputs[0]
        shape = src.ckpt.reader().meta(src.name).shape
        total += len(json.dumps(plan.out_name)) + len(json.dumps(list(shape))) + 80
    return total


def _out_dtype(recipe: MergeRecipe, stored: torch.dtype) -> torch.dtype:
    if recipe.out_dtype:
        return recipe.torch_dtype("out_dtype")  # type: ignore[return-value]
    if recipe.dtype:
        return recipe.torch_dtype("dtype")  # type: ignore[return-value]
    return stored


def _plan(recipe: MergeRecipe, method: MergeMethod, ckpts: dict[str, LocalCheckpoint],
          ref: LocalCheckpoint) -> tuple[list[_TensorPlan], int]:
    spec = ref.spec
    names = ref.reader().keys()
    metas = ref.reader().metas()
    top = recipe.parameters
    plans: list[_TensorPlan] = []
    if recipe.models:
        num_blocks = ref.num_layers
        base_ref = recipe.base_model if method.needs_base != "none" else None
        entries = [m for m in recipe.models if m.model != base_ref]
        for name in names:
            block = spec.block_of(name)
            inputs = [_input(ckpts[m.model], name, [m.parameters, top], ref, name) for m in entries]
            base = _input(ckpts[base_ref], name, [top], ref, name) if base_ref else None
            plans.append(_TensorPlan(name, block, depth_t(block, num_blocks), base, inputs, [top],
                                     _out_dtype(recipe, metas[name].dtype)))
        return plans, num_blocks

    # slices: output blocks are the concatenation of every slice's blocks
    num_blocks = sum(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0] for sl in recipe.slices)
    block_names: dict[int, list[str]] = {}
    pre, post = [], []
    for name in names:
        loc = spec.locate(name)
        if loc.kind == "block":
            block_names.setdefault(loc.block, []).append(name)  # type: ignore[arg-type]
        elif loc.kind in ("final_norm", "head"):
            post.append(name)
        else:
            pre.append(name)
    template_block = min(block_names) if block_names else 0

    def slice_inputs(i: int, sl, src_block_of, ref_name: str, t_name_of):
        base_ref = (sl.base_model or recipe.base_model) if method.needs_base != "none" else None
        inputs, base = [], None
        for src in sl.sources:
            ck = ckpts[src.model]
            if src.layer_range[1] > ck.num_layers or src.layer_range[0] < 0:
                raise WeightsmithError(
                    f"slices[{i}]: layer_range {list(src.layer_range)} is outside {ck.name}'s {ck.num_layers} layers"
                )
            name = t_name_of(src)
            if src.model == base_ref:
                base = _input(ck, name, [sl.parameters, top], ref, ref_name)
            else:
                inputs.append(_input(ck, name, [src.parameters, sl.parameters, top], ref, ref_name))
        if base_ref and base is None:
            raise WeightsmithError(f"slices[{i}]: the base model {base_ref} must be one of the slice's sources")
        return base, inputs

    first, last = recipe.slices[0], recipe.slices[-1]
    for name in pre:
        base, inputs = slice_inputs(0, first, None, name, lambda src: name)
        plans.append(_TensorPlan(name, None, 0.0, base, inputs, [first.parameters, top], _out_dtype(recipe, metas[name].dtype)))
    out_block = 0
    for i, sl in enumerate(recipe.slices):
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            for tname in block_names.get(template_block, []):
                out_name = _rename_block(spec, tname, out_block)

                def name_of(src, tname=tname, offset=offset):
                    return _rename_block(spec, tname, src.layer_range[0] + offset)

                base, inputs = slice_inputs(i, sl, None, tname, name_of)
                plans.append(_TensorPlan(out_name, out_block, t, base, inputs, [sl.parameters, top],
                                         _out_dtype(recipe, metas[tname].dtype)))
            out_block += 1
    for name in post:
        base, inputs = slice_inputs(len(recipe.slices) - 1, last, None, name, lambda src: name)
        plans.append(_TensorPlan(name, None, 0.0, base, inputs, [last.parameters, top], _out_dtype(recipe, metas[name].dtype)))
    return plans, num_blocks


# ---------------------------------------------------------------------------
# Merging one tensor
# ---------------------------------------------------------------------------

class _Loader:
    """Reads one tensor at a time with ``readinto`` into reusable buffers (one run's state).

    ``safe_open`` returns tensors backed by a memory map, so the first arithmetic
    on them pays a page fault per 4 KB page, and every fresh 100 MB buffer pays
    them again; on this kind of machine that was most of a merge's time. Here a
    plain read copies at memory speed into buffers that are allocated once per
    run (as many as one tensor's inputs, each the size of the largest tensor)
    and handed out again for every tensor after :meth:`reset`. Anything a method
    returns that aliases a buffer must be written before the next ``reset``.
    Pickled checkpoints go through the normal reader.
    """

    def __init__(self, capacity: int = 0, *, mapped: bool = False) -> None:
        self.mapped = mapped  # hand out read-only inputs as mapped views (see get)
        self.capacity = capacity  # elements of the largest tensor
        self._slots: list[torch.Tensor] = []
        self._used = 0
        self._raw: torch.Tensor | None = None

    def reset(self) -> None:
        self._used = 0

    def empty(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """A float32 CPU tensor of ``shape`` from the pool (fresh memory when it is too big)."""
        numel = math.prod(shape)
        if numel > self.capacity:
            return torch.empty(shape, dtype=torch.float32)
        if self._used == len(self._slots):
            self._slots.append(torch.empty(numel, dtype=torch.float32))
        elif self._slots[self._used].numel() < numel:
            self._slots[self._used] = torch.empty(numel, dtype=torch.float32)  # grow: slots hold the largest seen
        slot = self._slots[self._used]
        self._used += 1
        return slot[:numel].view(shape)

    def get(self, inp: _Input, compute_dtype: torch.dtype | None) -> torch.Tensor:
        """The tensor as float32 (rounded through ``compute_dtype`` first, as mergekit reads it).

        With ``mapped`` a float32 tensor that needs no conversion comes back as a
        copy-on-write view of the file's pages (no copy at all; the method must only
        read it, or pay a page copy per write); others are converted straight from
        the mapped bytes into a pool buffer.
        """
        reader = inp.ckpt.reader()
        meta = reader.meta(inp.name)
        if inp.ckpt.kind == "pickle" or meta.file.suffix != ".safetensors" or not meta.dtype.is_floating_point:
            return _to_compute(reader.get(inp.name, dtype=None), compute_dtype)
        # Byte extent as validated by read_safetensors_header (inside the file, matching the shape).
        start, begin, end = meta.data_start, 0, meta.nbytes
        direct = meta.dtype == torch.float32 and compute_dtype in (None, torch.float32)
        raw = _map(meta.file, start + begin, end - begin, meta.dtype, meta.shape)
        if raw is not None:
            if direct and self.mapped:
                return raw
            out = self.empty(meta.shape)
            rounded = compute_dtype in (None, torch.float32, meta.dtype)
            return out.copy_(raw if rounded else raw.to(compute_dtype))  # copy_ converts to float32
        out = self.empty(meta.shape)
        if direct:
            target = out
        else:
            nbytes = end - begin
            if self._raw is None or self._raw.numel() < nbytes:
                self._raw = torch.empty(max(nbytes, self.capacity * meta.dtype.itemsize), dtype=torch.uint8)
            target = self._raw[:nbytes].view(meta.dtype).view(meta.shape)
        if end > begin:
            view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
            with open(meta.file, "rb", buffering=0) as f:
                f.seek(start + begin)
                got = 0
                while got < end - begin:
                    n = f.readinto(view[got:])
                    if not n:
                        raise WeightsmithError(f"{meta.file.name}: truncated while reading tensor {inp.name}")
                    got += n
        if not direct:
            rounded = compute_dtype in (None, torch.float32, meta.dtype)
            out.copy_(target if rounded else target.to(compute_dtype))  # copy_ converts to float32
        return out


def _map(path: Path, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A copy-on-write (MAP_PRIVATE) view of ``nbytes`` at ``offset`` in ``path``, or None when
    the bytes are not aligned for ``dtype`` or empty (the caller then reads them).

    Reading mapped page-cache pages costs a minor fault per 16 pages (the kernel maps
    neighbours around a fault), several times less than copying them with ``read``.
    The mapping lives as long as the tensor; writing to it copies the touched pages
    and never reaches the file.
    """
    if nbytes <= 0 or offset % dtype.itemsize:
        return None
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), nbytes + offset - aligned, access=mmap.ACCESS_COPY, offset=aligned)
    except (OSError, ValueError):
        return None
    return torch.frombuffer(m, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset - aligned).view(shape)


def _to_compute(t: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    # Round to the recipe's dtype first (as mergekit reads it), then compute in float32.
    if compute_dtype is not None and t.dtype != compute_dtype:
        t = t.to(compute_dtype)
    return t.to(torch.float32)


def _load(inp: _Input, recipe: MergeRecipe, dev: torch.device, loader: _Loader | None = None) -> torch.Tensor:
    loader = loader if loader is not None else _Loader()
    return loader.get(inp, recipe.torch_dtype("dtype")).to(dev)


def _param_value(p, scopes, tensor_name: str, t: float, missing: str, where: str) -> Any:
    """One parameter's value for one tensor: the scoped setting, else its default (``missing`` if required)."""
    value = resolve_setting(p.name, scopes, tensor_name, t, default=None)
    if value is None:
        if p.required:
            raise WeightsmithError(missing)
        value = p.default
    return p.coerce(value, where) if value is not None else None


def _resolve_params(method: MergeMethod, plan: _TensorPlan) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    shared = {
        p.name: _param_value(p, plan.shared_scopes, plan.out_name, plan.t,
                             f"{method.name} needs parameter {p.name} for tensor {plan.out_name}",
                             f"tensor {plan.out_name}")
        for p in method.shared_parameters
    }
    per_model = [
        {
            p.name: _param_value(p, inp.scopes, inp.name, plan.t,
                                 f"model {inp.ckpt.name} has no {p.name} for tensor {plan.out_name}",
                                 f"model {inp.ckpt.name}, tensor {plan.out_name}")
            for p in method.model_parameters
        }
        for inp in plan.inputs
    ]
    return shared, per_model


def _read_inputs(plan: _TensorPlan, recipe: MergeRecipe, dev: torch.device, loader: _Loader,
                 finite: FiniteCheck | None = None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    base = _load(plan.base, recipe, dev, loader) if plan.base is not None else None
    tensors = [_load(inp, recipe, dev, loader) for inp in plan.inputs]
    if finite is not None:
        for inp, t in ((plan.base, base), *zip(plan.inputs, tensors)):
            if t is not None:
                finite.input(t, inp.ckpt.name, inp.name)
    return base, tensors


class _Prefetcher:
    """Reads the next tensor's inputs on one background thread while the current one is
    merged and written (file reads and torch release the GIL).

    Two buffer pools take turns, so the thread never writes into memory still in
    use. A read-ahead that would hold two large tensors at once (together more than
    the largest one) is skipped, so peak memory stays at one large tensor's inputs.
    """

    def __init__(self, plans: list[_TensorPlan], skip: list[str], recipe: MergeRecipe, dev: torch.device,
                 capacity: int, *, mapped: bool = False, finite: FiniteCheck | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.finite = finite
        self.plans, self.skip, self.recipe, self.dev = plans, set(skip), recipe, dev
        self.capacity = capacity
        self.loaders = [_Loader(capacity, mapped=mapped), _Loader(capacity, mapped=mapped)]
        self.last = self.loaders[0]  # the pool of the tensor being merged
        self.pending: dict[int, tuple[Any, _Loader]] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-read")

    def __enter__(self) -> "_Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        for future, _ in self.pending.values():
            future.cancel()
        self.pool.shutdown(wait=True)

    def start_after(self, i: int) -> None:
        j = i + 1
        while j < len(self.plans) and self.plans[j].out_name in self.skip:
            j += 1
        if i < 0 or j >= len(self.plans) or j in self.pending:
            return
        if _numel(self.plans[i]) + _numel(self.plans[j]) > self.capacity:
            return  # two large tensors at once: read j when it is its turn instead
        loader = self.loaders[1] if self.last is self.loaders[0] else self.loaders[0]
        loader.reset()
        self.pending[j] = (self.pool.submit(_read_inputs, self.plans[j], self.recipe, self.dev, loader, self.finite), loader)

    def take(self, i: int) -> tuple[tuple[torch.Tensor | None, list[torch.Tensor]], _Loader]:
        if i in self.pending:
            future, loader = self.pending.pop(i)
            self.last = loader
            return future.result(), loader
        # Not read ahead: the previous tensor is written, so its pool is free.
        self.last.reset()
        return _read_inputs(self.plans[i], self.recipe, self.dev, self.last, self.finite), self.last


def _merge_one(plan: _TensorPlan, method: MergeMethod, recipe: MergeRecipe, dev: torch.device, seed: int | None,
               norms: "_NormTracker", loader: _Loader, *, want_task_sum: bool,
               exact_ties: bool = True,
               inputs: tuple[torch.Tensor | None, list[torch.Tensor]] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    base, tensors = inputs if inputs is not None else _read_inputs(plan, recipe, dev, loader)
    first = base if base is not None else tensors[0]
    if not first.is_floating_point():
        # Integer buffers (position ids...) are not merged: keep the base's (or first model's).
        return first, base
    shared, per_model = _resolve_params(method, plan)
    norms.last_task_sum_l1 = 0.0
    ctx = TensorContext(plan.out_name, seed=seed or 0, device=dev,
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


def _changed(merged: torch.Tensor, base: torch.Tensor | None, plan: _TensorPlan, recipe: MergeRecipe) -> int:
    if base is None:
        if not plan.inputs:
            return 0
        first = _load(plan.inputs[0], recipe, merged.device)
        return int(not torch.equal(merged.to(first.dtype), first))
    return int(not torch.equal(merged, base))


def _spill(folder: Path, index: int, tensor: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file({"t": tensor.detach().to("cpu").contiguous()}, str(folder / f"{index:06d}.safetensors"))


def _unspill(folder: Path, index: int, dev: torch.device) -> torch.Tensor:
    from safetensors import safe_open

    path = folder / f"{index:06d}.safetensors"
    with safe_open(str(path), framework="pt", device="cpu") as f:
        t = f.get_tensor("t")
    path.unlink()
    return t.to(dev)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise MergeCancelled("merge cancelled; nothing was written")


def _report(progress: Progress | None, done: int, total: int, name: str) -> None:
    if progress is not None:
        progress(done, total, name)


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

    def add(self, plan: _TensorPlan, i: int, delta: torch.Tensor) -> None:
        if self.enabled and plan.block is not None and plan.block < self.num_blocks:
            self.squares[i][plan.block] += float(torch.linalg.vector_norm(delta)) ** 2

    def set_task_sum(self, total: torch.Tensor) -> None:
        self.last_task_sum_l1 = float(total.abs().sum(dtype=torch.float64))

    def result(self) -> dict[str, list[float]]:
        return {name: [math.sqrt(s) for s in sq] for name, sq in zip(self.names, self.squares)}


# ---------------------------------------------------------------------------
# Config, tokenizer, recipe and card
# ---------------------------------------------------------------------------

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _output_config(recipe: MergeRecipe, ref: LocalCheckpoint, num_blocks: int) -> dict[str, Any]:
    config = json.loads(json.dumps(ref.config))
    key = next((k for k in (ref.spec.num_layers_key, "num_hidden_layers", "n_layer") if k in config), None)
    if key is not None and config[key] != num_blocks:
        config[key] = num_blocks
    out = recipe.torch_dtype("out_dtype") or recipe.torch_dtype("dtype")
    if out is not None:
        for k in ("torch_dtype", "dtype"):
            if k in config or k == "dtype":
                config[k] = _DTYPE_NAMES[out]
    return config


def _write_support(writer: ShardedWriter, recipe: MergeRecipe, ckpts: dict[str, LocalCheckpoint],
                   ref: LocalCheckpoint, config: dict[str, Any]) -> None:
    writer.copy_support_files(ref.support_dir)
    if recipe.tokenizer_source not in (None, "base", "union"):
        tok = ckpts[recipe.tokenizer_source]
        for n in TOKENIZER_FILES:
            if (writer.staging / n).exists():
                (writer.staging / n).unlink()
        writer.copy_support_files(tok.support_dir, names=TOKENIZER_FILES)
    writer.write_text("config.json", json.dumps(config, indent=2) + "\n")
    public = recipe.with_models_renamed(lambda r: _public(r, ckpts))
    writer.write_text(RECIPE_NAME, public.to_yaml())


def _public(ref: str, ckpts: dict[str, LocalCheckpoint]) -> str:
    c = ckpts.get(ref)
    if c is not None and c.hub_id:
        return c.hub_id
    return public_name(ref) if c is None else c.name


def _write_card(writer: ShardedWriter, recipe: MergeRecipe, method: MergeMethod,
                ckpts: dict[str, LocalCheckpoint], alpha: float | None) -> None:
    from checkpoints.cards import CardInfo, write_card

    public = recipe.with_models_renamed(lambda r: _public(r, ckpts))
    names = public.model_refs()
    link = f"[{method.label}]({method.paper_url})" if method.paper_url else method.label
    summary = f"This model is a merge of {len(names)} checkpoints made with Weightsmith, using the {link} merge method."
    tags = ["merge", "weightsmith"]
    sections = {"Merge method": f"{link}: {method.description}." if method.description else link}
    if public.base_model:
        sections["Merge method"] += f"\n\nBase model: {public.base_model}."
    if recipe.lines is not None:
        tags.append("lines")
        a = f"{alpha:.4g}" if alpha is not None else str(recipe.lines.alpha)
        auto = " (auto: ‖Σ τ_t‖₁ / (T·‖τ_merged‖₁))" if recipe.lines.alpha == "auto" else ""
        sections["LiNeS layer scaling"] = (
            "The merged task vector was scaled per block with "
            "[LiNeS](https://arxiv.org/abs/2410.17146): λ(ℓ) = α + β·ℓ/(L−1), "
            f"α = {a}{auto}, β = {recipe.lines.beta:g}; embeddings, final norm and head use α."
        )
    models = public.non_base_models() if public.models else []
    if models:
        sections["Models merged"] = "\n".join(f"- {m.model}" for m in models)
    info = CardInfo(title=writer.out_dir.name, relation="merge", base_models=names, summary=summary, tags=tags,
                    recipe_yaml=public.to_yaml(), extra_sections=sections)
    write_card(writer.staging, info)
