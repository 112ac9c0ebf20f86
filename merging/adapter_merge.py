"""Fold LoRA factors into a base checkpoint: a full model streamed one tensor at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from checkpoints.cards import CardInfo, build_card
from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Job, ensure
from checkpoints.sources import LocalCheckpoint
from checkpoints.tensors import ShardedWriter


def write_merged_model(base: LocalCheckpoint, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                       out_dir: Path, card: CardInfo | None, *, job: Job | None = None,
                       overwrite: bool = False) -> Path:
    """Stream ``base`` tensor by tensor into ``out_dir``, adding B @ A to each targeted module's weight.

    ``factors`` maps module paths to ``(A [r, in], B [out, r])`` with scaling
    already folded in. A Conv1D weight (stored ``[in, out]``) gets the
    transposed ΔW, through the architecture map. Tensors keep their stored dtype;
    the sum is computed in float32. ``job`` reports per tensor and is checked
    before each; a cancelled job leaves nothing behind.
    """
    job = ensure(job)
    reader = base.reader()
    spec = base.spec
    names = reader.keys()
    by_tensor: dict[str, str] = {}
    for module in factors:
        tname = spec.weight_name(module, names)
        if tname is None:
            raise WeightsmithError(f"{base.name} has no weight for module {module}")
        by_tensor[tname] = module
    with ShardedWriter(out_dir, skip=base.tied_names(), overwrite=overwrite) as writer:
        for i, name in enumerate(names):
            job.check("the merge into the base")
            tensor = reader.get(name, dtype=None)
            module = by_tensor.get(name)
            if module is not None:
                a, b = factors[module]
                delta = b.to(torch.float32) @ a.to(torch.float32)  # [out, in]
                if spec.module_transposed(module):
                    delta = spec.from_out_in(delta)
                tensor = (tensor.to(torch.float32) + delta).to(tensor.dtype)
            writer.add(name, tensor)
            if i % 16 == 0:
                job.step(i, len(names), f"writing tensor {i + 1}/{len(names)}")
        writer.copy_support_files(base.support_dir)
        if card is not None:
            writer.add_file("README.md", str(build_card(card)).encode("utf-8"))
    return Path(out_dir)
