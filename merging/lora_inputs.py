"""LoRA inputs of a merge recipe: ``model: org/base+org/lora`` applies the adapter on the fly.

mergekit (0.1.5, ``ModelReference``) reads ``model+adapter`` as "this model with
this PEFT LoRA adapter merged in"; it builds the merged model with PEFT's
``merge_and_unload`` and saves a full copy in a cache folder before merging.
Here nothing is written first: :func:`resolve_input` gives a
:class:`~checkpoints.sources.LocalCheckpoint` whose reader
(:class:`AdaptedReader`) returns, for each tensor an adapter targets,
``W + scaling · B @ A`` (transposed for Conv1D layouts, from the architecture
map), computed when the engine reads that tensor; every other tensor is the
base's, read as before.

The sides are found the usual ways, under the caller's policy: the model by
:func:`checkpoints.sources.resolve`, the adapter by
:func:`merging.adapter_files.find_adapter_files` (a folder, a Hub id, a
workspace item once the app has mapped it); the adapter is read and checked by
:mod:`checkpoints.peft_adapter` (plain LoRA only, files inside its folder, every
factor fitting the base's stored shapes) before anything is merged.

Example::

    ckpt = resolve_input("demo+assets/adapters/caps")
    ckpt.reader().get("model.layers.0.self_attn.q_proj.weight")   # W + ΔW
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import torch

from checkpoints.peft_adapter import LoraAdapter, check_fits, load_adapter_files
from checkpoints.refs import join_lora_ref, split_lora_ref
from checkpoints.sources import LocalCheckpoint, resolve
from checkpoints.tensors import CheckpointReader

from .adapter_files import find_adapter_files

log = logging.getLogger(__name__)

LORA_KIND = "lora"  # LocalCheckpoint.kind of a model with an adapter applied


class AdaptedReader(CheckpointReader):
    """A base checkpoint's reader with a LoRA adapter merged into the tensors it targets.

    Targeted tensors have no byte extent in their header facts (they exist only
    once computed), so the engine's loader asks :meth:`get` for them; the
    others keep the base's extents and are read (or mapped) as before.
    """

    def __init__(self, base: CheckpointReader, adapter: LoraAdapter, targets: dict[str, str],
                 transposed: set[str], adapter_files: Sequence[Path] = ()):
        metas = base.metas()
        for tname in targets:
            metas[tname] = dataclasses.replace(metas[tname], data_offsets=None, data_base=None, file_size=None)
        super().__init__(metas, headers=base.headers())
        self._base = base
        self.adapter = adapter
        self._targets = targets  # stored tensor name -> adapted module
        self._transposed = transposed  # modules stored [in, out] (Conv1D)
        self.adapter_files = list(adapter_files)

    @property
    def files(self) -> list[Path]:
        """The base's files and the adapter's (everything the tensors are made from)."""
        return sorted({*self._base.files, *self.adapter_files})

    def get(self, name: str, *, dtype: torch.dtype | None = torch.float32,
            device: str | torch.device = "cpu") -> torch.Tensor:
        module = self._targets.get(name)
        if module is None:
            return self._base.get(name, dtype=dtype, device=device)
        weight = self._base.get(name, dtype=None)
        delta = self.adapter.delta(module)  # scaling · B @ A in float32, [out, in]
        if module in self._transposed:
            delta = delta.T
        # As PEFT's merge_and_unload on the model in its stored dtype: the float32 ΔW added to the
        # weight and rounded once to that dtype (exact float32 addition for a float32 model).
        merged = (weight.to(torch.float32) + delta).to(weight.dtype)
        if dtype is not None and merged.dtype != dtype:
            merged = merged.to(dtype)
        return merged.to(device)


def adapted(base: LocalCheckpoint, adapter: LoraAdapter, *, ref: str,
            adapter_files: Sequence[Path] = ()) -> LocalCheckpoint:
    """``base`` with ``adapter`` applied on read (checked to fit first); its name is ``base+adapter``."""
    check_fits([adapter], base)
    spec, metas = base.spec, base.reader().metas()
    targets = {spec.weight_name(module, metas): module for module in adapter.factors}
    transposed = {m for m in adapter.factors if spec.module_transposed(m)}
    reader = AdaptedReader(base.reader(), adapter, targets, transposed, adapter_files)  # type: ignore[arg-type]
    log.info("%s: %d tensors get the adapter %s on read", base.name, len(targets), adapter.name)
    return LocalCheckpoint(ref, join_lora_ref(base.hub_id or base.name, adapter.name), LORA_KIND, base.support_dir,
                           list(base.files), dict(base.config), _reader=reader)


def resolve_input(ref: str, *, allow_local: bool = True, trusted_roots: Sequence[Path] = ()) -> LocalCheckpoint:
    """A recipe's model reference as a checkpoint: plain ones through the resolver, ``model+adapter``
    as the model with the adapter applied on read (see the module docstring).

    ``allow_local``/``trusted_roots``: the caller's policy, for both sides. Raises
    :class:`WeightsmithError` (one line) for a bad reference, an adapter that is not
    a plain LoRA, or one that does not fit the model.
    """
    model_ref, lora_ref = split_lora_ref(ref)
    base = resolve(model_ref, allow_local=allow_local, trusted_roots=trusted_roots)
    if lora_ref is None:
        return base
    name, config, weights = find_adapter_files(lora_ref, allow_local=allow_local, trusted_roots=trusted_roots)
    return adapted(base, load_adapter_files(name, config, weights), ref=ref, adapter_files=(config, weights))


def source_files(ckpt: LocalCheckpoint) -> list[Path]:
    """Every file a checkpoint's tensors and config come from (the adapter's too), for cache keys."""
    files = list(ckpt.files)
    if ckpt.kind == LORA_KIND:
        files += ckpt.reader().adapter_files  # type: ignore[attr-defined]
    return [*files, ckpt.support_dir / "config.json"]
