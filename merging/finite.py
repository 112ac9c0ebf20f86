"""Non-finite weights never pass through a merge unnoticed.

A NaN in one fine-tune, or a weight of ``1e38`` that overflows, would otherwise
fill the output with NaN/Inf and the merge would still report success. Every
input tensor is checked as it is read and every output tensor in the dtype it is
written in; a failure is one error naming the model and the tensor, before
anything is published. ``allow_nonfinite`` turns the error into a count that the
summary reports instead.

The test is one summation per tensor: a float32 sum is finite exactly when no
element is NaN/Inf, unless finite elements overflow it, which only
``torch.isfinite`` can then tell apart. On the demo model (134 M parameters)
the sums take ~0.1 s per pass, ``isfinite(...).all()`` ~1.2 s.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from checkpoints.errors import WeightsmithError

log = logging.getLogger(__name__)

_HINT = "pass --allow-nonfinite (allow_nonfinite=True) to merge anyway"


def all_finite(t: torch.Tensor) -> bool:
    """True when no element of ``t`` is NaN or ±Inf (integer tensors always are finite)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32  # fp16 sums overflow at 65504
    if math.isfinite(float(t.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(t).all())  # the sum may have overflowed on finite values


@dataclass
class FiniteCheck:
    """Checks of one merge's inputs and outputs; ``summary()`` is what the user is shown."""

    allow: bool = False
    outputs: int = 0
    bad_inputs: list[str] = field(default_factory=list)
    bad_outputs: list[str] = field(default_factory=list)

    def input(self, t: torch.Tensor, model: str, tensor: str) -> None:
        if all_finite(t):
            return
        if not self.allow:
            raise WeightsmithError(f"model {model}: tensor {tensor} holds NaN or Inf values; {_HINT}")
        self.bad_inputs.append(f"{model}:{tensor}")

    def output(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Check a tensor about to be written (in its output dtype); returns it."""
        self.outputs += 1
        if not all_finite(t):
            if not self.allow:
                raise WeightsmithError(
                    f"merged tensor {name} is not finite in {str(t.dtype).removeprefix('torch.')} "
                    f"(NaN or Inf: check the recipe's weights and the output dtype); nothing was written"
                )
            self.bad_outputs.append(name)
            log.warning("merged tensor %s holds NaN or Inf values", name)
        return t

    def summary(self) -> str:
        if not self.bad_inputs and not self.bad_outputs:
            return f"all {self.outputs} output tensors finite (inputs checked too)"
        return (f"{len(self.bad_outputs)} of {self.outputs} output tensors hold NaN/Inf"
                f" ({len(self.bad_inputs)} input tensors did); allowed by allow_nonfinite")
