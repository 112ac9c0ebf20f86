"""Read the text files users hand us (recipes, edit requests, notes) and parse YAML, safely.

One reader and one YAML loader for the whole project, so every surface (CLI,
app, library) refuses the same bad inputs with the same one line:

* :func:`read_text`: UTF-8 (a BOM is allowed), at most ``max_bytes``; a file
  that is not UTF-8, too large, missing or not a file gives one line naming the
  file (its name only: an uploaded file's server path is nobody's business).
* :func:`load_yaml`: ``yaml.safe_load`` semantics (no Python objects), with
  aliases allowed only while the document they expand to stays small: a
  "billion laughs" document (aliases of aliases, each doubling the size) is
  refused in time linear in its text, before anything walks the expanded
  data. Recursive aliases and nesting deeper than Python can follow are
  refused too.

Example::

    data = load_yaml(read_text(Path("recipe.yml"), what="recipe"), what="recipe")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import WeightsmithError

DEFAULT_MAX_BYTES = 64 * 2**20


class UnsafeYaml(WeightsmithError):
    """YAML refused for its shape (alias bomb, recursive alias, nesting too deep), not its syntax.

    A caller that falls back to plain text on a syntax error (a table cell) must still refuse these.
    """

# Nodes the document may expand to, aliases followed: recipes hold tens to hundreds.
MAX_YAML_NODES = 100_000


def read_text(path: str | Path, *, what: str = "file", max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The UTF-8 text of ``path``, or one :class:`WeightsmithError` line naming ``what`` and the file."""
    p = Path(path)
    name = p.name or str(p)
    try:
        with open(p, "rb") as f:
            raw = f.read(max_bytes + 1)
    except IsADirectoryError:
        raise WeightsmithError(f"{what} {name}: is a folder, not a file") from None
    except OSError as e:
        raise WeightsmithError(f"{what} {name}: cannot read ({e.strerror or type(e).__name__})") from None
    if len(raw) > max_bytes:
        raise WeightsmithError(f"{what} {name}: larger than {max_bytes // 2**20} MiB")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise WeightsmithError(
            f"{what} {name}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that checks the composed node graph before building any Python object."""

    def compose_document(self):  # type: ignore[override]
        node = super().compose_document()
        _check_expansion(node)
        return node


def _check_expansion(root: yaml.Node) -> None:
    """Count the nodes ``root`` expands to (aliases followed) without expanding it; refuse cycles and bombs.

    Aliases make the node graph a DAG whose shared parts count once per use;
    sizes are memoised per node, so this is linear in the text.
    """
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            on_path.discard(key)
            total = 1 + sum(size[id(c)] for c in children)
            if total > MAX_YAML_NODES:
                raise UnsafeYaml(
                    f"expands to more than {MAX_YAML_NODES} values through aliases (*name): "
                    "refused (a YAML bomb?); write the values out"
                )
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise UnsafeYaml("holds a recursive alias (an anchor that contains itself)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)
        for c in children:
            if id(c) in on_path:
                raise UnsafeYaml("holds a recursive alias (an anchor that contains itself)")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def load_yaml(text: str, *, what: str = "YAML") -> Any:
    """``yaml.safe_load(text)`` with bounded alias expansion; one :class:`WeightsmithError` line on bad input.

    Bombs, recursive aliases and too-deep nesting raise :class:`UnsafeYaml` (a WeightsmithError).

    ``what`` names the document in the message (e.g. ``"recipe"``, ``"recipe my.yml"``).
    """
    return _parse(lambda: yaml.load(text or "", Loader=_BoundedLoader), what)  # noqa: S506 - a SafeLoader subclass


def load_yaml_file_or_text(text_or_path: "str | Path", *, what: str) -> Any:
    """A YAML file (a ``Path``, or one line ending in .yml/.yaml, read with :func:`read_text`) or YAML text,
    loaded with :func:`load_yaml`: recipes and search files are given either way."""
    text = str(text_or_path)
    if isinstance(text_or_path, Path) or ("\n" not in text and text.endswith((".yml", ".yaml"))):
        text = read_text(Path(text_or_path), what=what)
    return load_yaml(text, what=what)


def load_yaml_documents(text: str, *, what: str = "YAML") -> list[Any]:
    """Every document of a ``---``-separated YAML stream, each loaded as :func:`load_yaml` loads one
    (aliases bounded per document); one :class:`WeightsmithError` line on bad input."""
    return _parse(lambda: list(yaml.load_all(text or "", Loader=_BoundedLoader)), what)  # noqa: S506


def _parse(load, what: str) -> Any:
    try:
        return load()
    except UnsafeYaml as e:
        raise UnsafeYaml(f"{what} {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise WeightsmithError(f"{what} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise UnsafeYaml(f"{what} is nested too deeply") from None
