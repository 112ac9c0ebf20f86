"""The ways of combining LoRA adapters (PEFT's ``add_weighted_adapter``), as data the app and CLI show.

Which methods are exact in ΔW space: ``cat`` gives ΔW = Σ wᵢ·ΔWᵢ exactly;
``svd`` is that sum truncated to a rank. The other methods combine the A and B
factors separately (with weights √|wᵢ·scalingᵢ|), so with two or more adapters
the result contains cross terms Bᵢ·Aⱼ and is not the weighted sum of the ΔW.
The ``*_svd`` variants apply their rule to the full ΔWᵢ and then truncate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from merging.lines import lines_scale

@dataclass(frozen=True)
class AdapterMethod:
    """One way of combining adapters, as PEFT's ``add_weighted_adapter`` implements it.

    ``exact_in_delta_w``: the mixed ΔW equals Σ wᵢ·ΔWᵢ (for ``svd``: up to the
    rank truncation). ``space``: ``"delta_w"`` when the rule acts on the full
    ΔWᵢ = scalingᵢ·BᵢAᵢ, ``"factors"`` when it acts on A and B separately.
    ``parameters`` maps each recipe parameter the method uses to its default.
    """

    name: str
    label: str
    exact_in_delta_w: bool
    space: str
    rank: str
    parameters: Mapping[str, Any]
    description: str


_DENSITY = {"density": 0.5}
_SIGN = {"majority_sign_method": "total"}
_SEED = {"seed": 0}
_RANK = {"rank": None}  # None: the largest input rank (PEFT's default)

ADAPTER_METHODS: dict[str, AdapterMethod] = {
    m.name: m
    for m in (
        AdapterMethod("cat", "Concatenate (exact)", True, "delta_w", "sum of input ranks", {},
                      "Stacks the weighted A factors and the B factors: ΔW = Σ wᵢ·ΔWᵢ exactly."),
        AdapterMethod("svd", "SVD of the exact sum", True, "delta_w", "chosen rank (default: largest input rank)",
                      dict(_RANK), "Σ wᵢ·ΔWᵢ, truncated to the chosen rank by SVD: exact up to truncation."),
        AdapterMethod("linear", "Linear on A and B (approximate)", False, "factors", "input rank (all equal)", {},
                      "Weighted sums of the A factors and of the B factors; the product has cross terms BᵢAⱼ, "
                      "so it is not Σ wᵢ·ΔWᵢ. Needs equal ranks."),
        AdapterMethod("ties", "TIES on A and B", False, "factors", "input rank (all equal)",
                      {**_DENSITY, **_SIGN}, "TIES (trim, elect sign, disjoint merge) on the A and B factors."),
        AdapterMethod("dare_linear", "DARE + linear on A and B", False, "factors", "input rank (all equal)",
                      {**_DENSITY, **_SEED}, "Random drop and rescale, then weighted sum, on the A and B factors."),
        AdapterMethod("dare_ties", "DARE + TIES on A and B", False, "factors", "input rank (all equal)",
                      {**_DENSITY, **_SIGN, **_SEED}, "Random drop and rescale, then TIES, on the A and B factors."),
        AdapterMethod("magnitude_prune", "Magnitude prune on A and B", False, "factors", "input rank (all equal)",
                      dict(_DENSITY), "Keep the largest entries, then weighted sum, on the A and B factors."),
        AdapterMethod("ties_svd", "TIES on ΔW, then SVD", False, "delta_w",
                      "chosen rank (default: largest input rank)", {**_DENSITY, **_SIGN, **_RANK},
                      "TIES on the full ΔWᵢ, truncated to the chosen rank."),
        AdapterMethod("dare_linear_svd", "DARE + linear on ΔW, then SVD", False, "delta_w",
                      "chosen rank (default: largest input rank)", {**_DENSITY, **_SEED, **_RANK},
                      "DARE then weighted sum on the full ΔWᵢ, truncated to the chosen rank."),
        AdapterMethod("dare_ties_svd", "DARE + TIES on ΔW, then SVD", False, "delta_w",
                      "chosen rank (default: largest input rank)", {**_DENSITY, **_SIGN, **_SEED, **_RANK},
                      "DARE then TIES on the full ΔWᵢ, truncated to the chosen rank."),
        AdapterMethod("magnitude_prune_svd", "Magnitude prune on ΔW, then SVD", False, "delta_w",
                      "chosen rank (default: largest input rank)", {**_DENSITY, **_RANK},
                      "Magnitude pruning then weighted sum on the full ΔWᵢ, truncated to the chosen rank."),
    )
}


def lines_lambda(block: int | None, num_layers: int, alpha: float, beta: float) -> float:
    """LiNeS scale of block ``block`` of ``num_layers``: α + β·ℓ/(L−1); α outside the blocks.

    The merge engine's schedule (:func:`merging.lines.lines_scale`), so merges and mixes agree.
    """
    return lines_scale(block, num_layers, alpha, beta)

