"""The one range check for numeric recipe values: finite, and representable in float32.

Merges compute in float32: ``.inf``/``.nan`` would silently fill the output
with NaN/Inf, and a finite Python float above float32's range (``1e39``)
makes torch raise "value cannot be converted to type float without overflow"
deep inside a method. Both are refused here with one line naming the value.
"""

from __future__ import annotations

import math

from checkpoints.errors import WeightsmithError

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch here


def finite_float(number: float, what: str) -> float:
    """``number`` when finite and within float32's range; else one line starting with ``what``."""
    if not math.isfinite(number):
        raise WeightsmithError(f"{what} must be a finite number, got {number}")
    if abs(number) > FLOAT32_MAX:
        raise WeightsmithError(f"{what} must be at most {FLOAT32_MAX:.3g} in magnitude (float32), got {number:g}")
    return number
