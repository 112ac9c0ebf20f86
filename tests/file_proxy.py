"""A file object that forwards everything to a real one: tests subclass it to count or fail reads and writes."""

from __future__ import annotations

from typing import Any


class FileProxy:
    """Wraps an open file ``f``; a subclass overrides ``read``/``write``/... and the rest passes through."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def __enter__(self) -> "FileProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()
