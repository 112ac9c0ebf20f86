"""The one size parser: ``"5GB"`` is 5·10⁹ bytes, ``"5GiB"`` is 5·2³⁰ (as ``huggingface_hub`` and mergekit read them).

Accepted: a byte count (``1234``, ``"1234"``, ``"1234B"``), or a number with a
unit K, M, G or T, optionally followed by ``B``; an ``i`` after the letter
(``KiB``, ``MiB``, ``GiB``, ``TiB``, also ``Gi``) makes it binary. Case does
not matter (``"2gb"``). Decimal (``"1.5GB"``) numbers are fine. Negative,
non-finite and unparseable values give one line naming ``what``.

Example::

    parse_size("5GB")    # 5_000_000_000
    parse_size("5GiB")   # 5_368_709_120
    parse_size(None)     # None (no limit)
    format_size(12_288)  # "12.3 KB" (what parse_size reads back, to the digit shown)
"""

from __future__ import annotations

import math
import re

from .errors import WeightsmithError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?)b?|b)?\s*$", re.IGNORECASE)
_POWER = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(value: str | int | float | None, *, what: str = "size") -> int | None:
    """Bytes for ``value`` (see the module docstring); ``None`` or ``""`` -> ``None``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise WeightsmithError(f"{what} {value!r}: not a size (use e.g. 500MB, 2GB or 2GiB)")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise WeightsmithError(f"{what} {value!r}: not a size (a number of bytes >= 0)")
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise WeightsmithError(f"{what} {value!r}: not a size (use bytes, or e.g. 500MB, 2GB or 2GiB)")
    number, unit, binary = float(m.group(1)), (m.group(2) or "").lower(), bool(m.group(3))
    scale = (1024 if binary else 1000) ** _POWER[unit] if unit else 1
    return int(number * scale)


def format_size(n_bytes: int | float) -> str:
    """A byte count for people, in the parser's decimal units: "512 B", "12.3 KB", "4.2 MB", "1.50 GB".

    Below 0.1 MB the size is shown in KB, so a small adapter never reads as "0.0 MB".
    """
    n = float(n_bytes)
    if n < 1000:
        return f"{n:.0f} B"
    if n < 100_000:
        return f"{n / 1e3:.1f} KB"
    if n < 1e9:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e9:.2f} GB"
