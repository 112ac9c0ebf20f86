"""LiNeS layer-wise scaling (Wang et al. 2024, arXiv 2410.17146).

The merged task vector τ is scaled per transformer block: λ(ℓ) = α + β·ℓ/(L−1)
for block ℓ = 0…L−1; tensors outside the blocks (embeddings, final norm, head)
get α. The output is θ_base + λ(ℓ)·τ.

* Single model (the paper's remedy for forgetting): α = γ, β = 1 − γ, so the
  last block keeps its full update and shallow blocks move back toward the base.
* Several models: ``alpha: auto`` = ‖Σ_t τ_t‖₁ / (T·‖τ_merged‖₁), as in the
  authors' code (1/T for plain task arithmetic; for TIES-like methods Σ_t τ_t
  is taken after sparsification). Both norms run over the whole model, so the
  streaming engine makes two passes: the first merges each tensor, writes τ_merged
  to a float32 spill file and accumulates the two L1 norms; the second reads
  base and τ_merged back and writes θ_base + λ·τ_merged. Memory stays at one
  tensor; the cost is one extra model-sized write and read, not a second merge.

Example::

    lines_curve(0.2, 0.8, 30)[0], lines_curve(0.2, 0.8, 30)[-1]   # (0.2, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from checkpoints.errors import WeightsmithError

from .numbers import finite_float


@dataclass
class LinesConfig:
    """The recipe's ``lines:`` block. ``alpha`` is a number or ``"auto"``."""

    alpha: float | Literal["auto"] = "auto"
    beta: float = 0.0

    @classmethod
    def single_task(cls, gamma: float) -> "LinesConfig":
        """The paper's single-fine-tune setting: α = γ, β = 1 − γ."""
        return cls(alpha=float(gamma), beta=1.0 - float(gamma))

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta}

    @classmethod
    def from_dict(cls, data: object) -> "LinesConfig":
        if not isinstance(data, dict):
            raise WeightsmithError(f"lines: expected {{alpha, beta}}, got {data!r}")
        unknown = set(data) - {"alpha", "beta"}
        if unknown:
            raise WeightsmithError(f"lines: unknown key(s) {', '.join(sorted(unknown))} (use alpha and beta)")
        alpha = data.get("alpha", "auto")
        if alpha != "auto":
            alpha = _number(alpha, "lines.alpha")
        return cls(alpha=alpha, beta=_number(data.get("beta", 0.0), "lines.beta"))


def _number(value: object, where: str) -> float:
    if isinstance(value, bool):
        raise WeightsmithError(f"{where} must be a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise WeightsmithError(f"{where} must be a number (or 'auto' for alpha), got {value!r}") from None
    return finite_float(number, where)


def lines_scale(block: int | None, num_blocks: int, alpha: float, beta: float) -> float:
    """λ for a tensor in ``block`` (None = outside the blocks, which gets α)."""
    if block is None:
        return alpha
    if num_blocks <= 1:
        return alpha + beta
    return alpha + beta * block / (num_blocks - 1)


def lines_curve(alpha: float, beta: float, num_blocks: int) -> list[float]:
    """λ(ℓ) for ℓ = 0…L−1: the per-block scale curve, for plotting."""
    return [lines_scale(i, num_blocks, alpha, beta) for i in range(num_blocks)]


def auto_alpha(sum_tv_l1: float, merged_tv_l1: float, num_tasks: int) -> float:
    """‖Σ_t τ_t‖₁ / (T·‖τ_merged‖₁); 1/T when the merged vector is zero."""
    if num_tasks <= 0:
        raise WeightsmithError("lines: alpha auto needs at least one model besides the base")
    if merged_tv_l1 <= 0:
        return 1.0 / num_tasks
    return sum_tv_l1 / (num_tasks * merged_tv_l1)
