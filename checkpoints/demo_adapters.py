"""The bundled demo LoRA adapters (``assets/adapters/<name>``) and their reference scheme ``demo-adapter:<name>``.

A model picker offers ``demo``; an adapter picker offers ``demo-adapter:caps``. This module turns
such a reference into the adapter's folder, which callers then treat as a trusted root (it ships
with the code, like the demo model).

Example::

    demo_adapter_refs()                      # ["demo-adapter:caps", "demo-adapter:pirate"]
    demo_adapter_path("demo-adapter:caps")   # Path(".../assets/adapters/caps")
"""

from __future__ import annotations

from pathlib import Path

from .errors import WeightsmithError
from .peft_adapter import is_adapter_folder

DEMO_ADAPTER_PREFIX = "demo-adapter:"


def demo_adapters() -> dict[str, Path]:
    """The bundled demo adapters, by name (none when the assets were not trained)."""
    root = Path(__file__).resolve().parents[1] / "assets" / "adapters"
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if is_adapter_folder(p)}


def demo_adapter_refs() -> list[str]:
    """``demo-adapter:<name>`` for each bundled adapter (what the app's adapter pickers offer)."""
    return [DEMO_ADAPTER_PREFIX + name for name in demo_adapters()]


def is_demo_adapter_ref(ref: object) -> bool:
    return isinstance(ref, str) and ref.strip().startswith(DEMO_ADAPTER_PREFIX)


def demo_adapter_path(ref: str) -> Path:
    """The folder of ``demo-adapter:<name>``; one error line naming the adapters there are."""
    name = ref.strip()[len(DEMO_ADAPTER_PREFIX):]
    found = demo_adapters().get(name)
    if found is None:
        raise WeightsmithError(f"{ref.strip()}: no such demo adapter (have: {', '.join(demo_adapters()) or 'none'})")
    return found
