"""Planning a merge from headers alone: which inputs make each output tensor, at which depth, with which parameters.

Nothing here reads a weight. :func:`resolve_models` finds the recipe's
checkpoints, :func:`check_compatible` checks architecture, layer count and
vocabulary, and :func:`plan_merge` turns the recipe into one
:class:`TensorPlan` per output tensor (for ``models:`` recipes, and for
``slices:`` that stack layer ranges), checking every input's shape against the
reference model. :func:`resolve_params` gives a plan's method parameters.

Example::

    ckpts = resolve_models(recipe)
    check_compatible(recipe, ckpts)
    plans, num_blocks = plan_merge(recipe, recipe.method, ckpts, ckpts[recipe.base_model])
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from checkpoints.arch import ArchSpec
from checkpoints.errors import WeightsmithError
from checkpoints.sources import LocalCheckpoint

from .lora_inputs import resolve_input
from .methods import MergeMethod
from .recipe import MergeRecipe
from .schedule import depth_t, resolve as resolve_setting


@dataclass
class TensorInput:
    """One input of an output tensor: a checkpoint and the name it stores the tensor under."""

    ckpt: LocalCheckpoint
    name: str  # tensor name inside that checkpoint
    scopes: list[dict[str, Any]]  # per-model parameter scopes, highest precedence first


@dataclass
class TensorPlan:
    """How one output tensor is made."""

    out_name: str
    block: int | None  # output block, for LiNeS and the norms plot
    t: float
    base: TensorInput | None
    inputs: list[TensorInput]
    shared_scopes: list[dict[str, Any]]
    out_dtype: torch.dtype


def first_model(recipe: MergeRecipe) -> str:
    """The reference model when the recipe has no base."""
    return recipe.models[0].model if recipe.models else recipe.slices[0].sources[0].model


def resolve_models(recipe: MergeRecipe, *, allow_local: bool = True,
                    trusted_roots: Sequence[Path] = ()) -> dict[str, LocalCheckpoint]:
    out: dict[str, LocalCheckpoint] = {}
    for ref in recipe.model_refs():
        try:
            out[ref] = resolve_input(ref, allow_local=allow_local, trusted_roots=trusted_roots)  # model[+lora]
        except WeightsmithError as e:
            raise WeightsmithError(f"model {ref!r} of the recipe: {e}") from None
    return out


def _vocab(ckpt: LocalCheckpoint) -> int | None:
    v = ckpt.config.get("vocab_size")
    return int(v) if isinstance(v, int) else None


def check_compatible(recipe: MergeRecipe, ckpts: dict[str, LocalCheckpoint]) -> None:
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


def _input(ckpt: LocalCheckpoint, name: str, scopes: list[dict[str, Any]], ref: LocalCheckpoint, ref_name: str) -> TensorInput:
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
    return TensorInput(ckpt, stored, scopes)


def plan_numel(plan: TensorPlan) -> int:
    """Elements of the plan's tensor (from the header)."""
    src = plan.base or plan.inputs[0]
    return math.prod(src.ckpt.reader().meta(src.name).shape)


def header_bound(plans: list[TensorPlan], skip: list[str]) -> int:
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


def plan_merge(recipe: MergeRecipe, method: MergeMethod, ckpts: dict[str, LocalCheckpoint],
               ref: LocalCheckpoint) -> tuple[list[TensorPlan], int]:
    """One plan per output tensor, in the reference model's order, and the output's block count."""
    spec = ref.spec
    names = ref.reader().keys()
    metas = ref.reader().metas()
    top = recipe.parameters
    plans: list[TensorPlan] = []
    if recipe.models:
        num_blocks = ref.num_layers
        base_ref = recipe.base_model if method.needs_base != "none" else None
        entries = [m for m in recipe.models if m.model != base_ref]
        for name in names:
            block = spec.block_of(name)
            inputs = [_input(ckpts[m.model], name, [m.parameters, top], ref, name) for m in entries]
            base = _input(ckpts[base_ref], name, [top], ref, name) if base_ref else None
            plans.append(TensorPlan(name, block, depth_t(block, num_blocks), base, inputs, [top],
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
        plans.append(TensorPlan(name, None, 0.0, base, inputs, [first.parameters, top], _out_dtype(recipe, metas[name].dtype)))
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
                plans.append(TensorPlan(out_name, out_block, t, base, inputs, [sl.parameters, top],
                                         _out_dtype(recipe, metas[tname].dtype)))
            out_block += 1
    for name in post:
        base, inputs = slice_inputs(len(recipe.slices) - 1, last, None, name, lambda src: name)
        plans.append(TensorPlan(name, None, 0.0, base, inputs, [last.parameters, top], _out_dtype(recipe, metas[name].dtype)))
    return plans, num_blocks


def _param_value(p, scopes, tensor_name: str, t: float, missing: str, where: str) -> Any:
    """One parameter's value for one tensor: the scoped setting, else its default (``missing`` if required)."""
    value = resolve_setting(p.name, scopes, tensor_name, t, default=None)
    if value is None:
        if p.required:
            raise WeightsmithError(missing)
        value = p.default
    return p.coerce(value, where) if value is not None else None


def resolve_params(method: MergeMethod, plan: TensorPlan) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The method's shared parameters and each input's parameters for this tensor."""
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
