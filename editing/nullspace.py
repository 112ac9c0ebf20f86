"""AlphaEdit's null-space projector of a layer's key statistics (Fang et al., ICLR 2025).

Its own module because both the statistics cache (which stores P beside C) and
the AlphaEdit update use it, and neither should import the other.
"""

from __future__ import annotations

import torch

from checkpoints.errors import WeightsmithError


def nullspace_projector(C: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """P = Û Ûᵀ over C's eigenvectors with eigenvalue < ``threshold``; returns (P float32, their number).

    C is symmetric, so ``eigh`` gives what the authors' SVD gives (singular values of
    a positive semi-definite matrix are its eigenvalues); solved in float64.
    """
    evals, evecs = torch.linalg.eigh(C.double())
    keep = evals < threshold
    n = int(keep.sum())
    if n == 0:
        raise WeightsmithError(f"AlphaEdit: no eigenvalue of the statistics is below the null-space threshold "
                               f"{threshold:g} (smallest {float(evals.min()):.3g}): raise nullspace_threshold")
    U = evecs[:, keep]
    return (U @ U.T).float(), n
