"""What every app endpoint does around its handler: typed arguments in, one line out.

``@endpoint`` wraps a handler (plain function or generator) so that

* each argument is checked against the handler's type hints *before* the
  handler runs (one mechanism for every endpoint, instead of checks scattered
  through the handlers): a wrong type, text that is too long or not valid text,
  a non-finite or out-of-range number gives one line naming the argument;
* a :class:`WeightsmithError` becomes a one-line ``gr.Error``; anything
  unexpected is logged with its traceback on the server and the page gets one
  line without the exception's text;
* no message shows a server path: a path inside a session workspace is shown
  as ``ws:<item>/…``, any other absolute path as ``<server path>``.

Hints understood: ``str``, ``float``, ``int``, ``bool``, ``Literal[...]``, ``X | None``,
``Files`` (uploaded file paths), ``FilePath`` (one uploaded file), ``Texts`` (a list of texts), and
``Annotated[float | None, Range(...)]``. Parameters named ``request``,
``progress`` and ``oauth_token`` are Gradio's and pass through untouched.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Union

import gradio as gr

from checkpoints.errors import WeightsmithError
from checkpoints.staging import output_error

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 200_000  # a recipe or a prompt; far above any real one, far below a memory problem
MAX_FILES = 64
GRADIO_PARAMS = frozenset({"self", "request", "progress", "oauth_token"})


class UserError(gr.Error):
    """A library error shown in the page as one line."""


@dataclass(frozen=True)
class Range:
    """Bounds (inclusive) for a number argument; ``integer``: whole numbers only."""

    low: float | None = None
    high: float | None = None
    integer: bool = False

    def check(self, name: str, value: float | None) -> None:
        if value is None:
            return
        if self.integer and value != int(value):
            raise UserError(f"{name} must be a whole number, not {value:g}")
        if self.low is not None and value < self.low:
            raise UserError(f"{name} must be at least {self.low:g}, not {value:g}")
        if self.high is not None and value > self.high:
            raise UserError(f"{name} must be at most {self.high:g}, not {value:g}")


class _FileMarker:
    """Annotated marker: the value is one uploaded file (a path, or Gradio's file object)."""


class _FilesMarker:
    """Annotated marker: the value is a list of uploaded files."""


class _TextsMarker:
    """Annotated marker: the value is a list of texts (a multiselect dropdown), or one text."""


FilePath = Annotated[Union[str, None], _FileMarker()]
Files = Annotated[Union[list, None], _FilesMarker()]
Texts = Annotated[Union[list, str, None], _TextsMarker()]


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {str: "text", bool: "true/false", int: "a number", float: "a number", list: "a list", tuple: "a list",
            dict: "a mapping", bytes: "bytes"}.get(type(value), type(value).__name__)


_EXPECTED = {str: "text", float: "a number", int: "a whole number", bool: "true or false"}


def _show(value: Any) -> str:
    """A short, safe rendering of a bad value for an error line."""
    if isinstance(value, str):
        return repr(value[:40] + ("…" if len(value) > 40 else ""))
    return _kind(value)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise UserError(f"{name} must be text, not {_kind(value)}")
    if len(value) > MAX_TEXT_CHARS:
        raise UserError(f"{name} is too long: {len(value):,} characters (at most {MAX_TEXT_CHARS:,})")
    if "\x00" in value:
        raise UserError(f"{name} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{name} is not valid text (it holds a lone surrogate character)") from None
    return value


def _number(name: str, value: Any, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be a number, not {_kind(value)}")
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, not {value}")
    if integer and value != int(value):
        raise UserError(f"{name} must be a whole number, not {value:g}")
    return int(value) if integer else value


def _file(name: str, value: Any) -> str:
    """Gradio hands files over as paths (``type="filepath"``) or objects with ``.name``/``.path``."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        value = getattr(value, "path", None) or getattr(value, "name", None) or (
            value.get("path") if isinstance(value, dict) else None)
    if not isinstance(value, str) or not value:
        raise UserError(f"{name} must be an uploaded file")
    return _text(name, value)


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against ``hint``; raises :class:`UserError` naming ``name``."""
    meta: tuple = ()
    if typing.get_origin(hint) is Annotated:
        hint, *meta = typing.get_args(hint)
    args = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), Any)
    if any(isinstance(m, _FilesMarker) for m in meta):
        if value is None:
            return []
        if isinstance(value, (str, os.PathLike, dict)) or not isinstance(value, (list, tuple)):
            value = [value]
        if len(value) > MAX_FILES:
            raise UserError(f"{name}: {len(value)} files (at most {MAX_FILES} at once)")
        return [_file(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if any(isinstance(m, _FileMarker) for m in meta):
        return None if value in (None, "") else _file(name, value)
    if any(isinstance(m, _TextsMarker) for m in meta):
        value = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name} must be a list of texts, not {_kind(value)}")
        if len(value) > MAX_FILES:
            raise UserError(f"{name}: {len(value)} entries (at most {MAX_FILES})")
        return [_text(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if value is None:
        if optional:
            return None
        if base is str:
            return ""  # a cleared textbox or dropdown
        if base is bool:
            return False
        raise UserError(f"{name} is missing (expected {_EXPECTED.get(base, 'a value')})")
    if typing.get_origin(base) is Literal:
        if value not in typing.get_args(base):
            raise UserError(f"{name} must be one of {', '.join(map(str, typing.get_args(base)))}, not {_show(value)}")
    elif base is str:
        value = _text(name, value)
    elif base is bool:
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, not {_kind(value)}")
    elif base in (int, float):
        value = _number(name, value, base is int or any(getattr(m, "integer", False) for m in meta))
    for m in meta:
        if isinstance(m, Range):
            m.check(name, value)
    return value


# An absolute POSIX path in a message (not a URL's //host, not a Hub id owner/name).
_ABS_PATH = re.compile(r"(?<![\w/:.~-])/(?:[^\s/'\"`:,;()\[\]<>]+/)*[^\s/'\"`:,;()\[\]<>]+/?")
# .../<workspace id>/items/<item>[/rest]: shown as the session's own ws: reference.
_WS_PATH = re.compile(r"/[A-Za-z0-9_-]{32}/items/([A-Za-z0-9][A-Za-z0-9._-]*)(/\S*)?$")


def scrub_paths(message: str) -> str:
    """Hide server paths in a user-facing message (workspace items keep their ``ws:`` name)."""
    def one(m: re.Match) -> str:
        ws = _WS_PATH.search(m.group(0))
        if ws:
            return f"ws:{ws.group(1)}{(ws.group(2) or '').rstrip('/')}"
        return "<server path>"

    return _ABS_PATH.sub(one, message)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


def _message(fn_name: str, e: BaseException) -> gr.Error:
    if isinstance(e, gr.Error):
        return e
    if isinstance(e, WeightsmithError):
        return UserError(scrub_paths(_one_line(e)))
    if isinstance(e, InterruptedError):
        return UserError(_one_line(e) or "stopped")
    if isinstance(e, OSError) and (fault := output_error(e)) is not None:  # disk full, read-only, ...
        log.warning("%s: %s", fn_name, fault)
        return UserError(scrub_paths(_one_line(fault)))
    # A bug: the traceback goes to the server log (tokens are redacted there); the page gets one line.
    log.exception("unexpected error in %s", fn_name)
    return UserError(f"{fn_name} failed on an unexpected server error (logged); nothing was saved")


def endpoint(fn: Callable) -> Callable:
    """Check ``fn``'s arguments against its type hints and turn every failure into one ``gr.Error`` line.

    Keeps the signature (Gradio reads it to inject ``gr.Request`` / ``gr.Progress``)
    and works for plain functions and generators alike.
    """
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    checked = [p for p in sig.parameters if p not in GRADIO_PARAMS and p in hints]

    def check(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            raise UserError(f"{fn.__name__}: wrong number of arguments "
                             f"(takes {', '.join(checked)})") from None
        for name in checked:
            if name in bound.arguments:
                bound.arguments[name] = coerce(name, bound.arguments[name], hints[name])
        return bound.args, bound.kwargs

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                args, kwargs = check(args, kwargs)
                yield from fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - every failure becomes one message; the server stays up
                raise _message(fn.__name__, e) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            args, kwargs = check(args, kwargs)
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise _message(fn.__name__, e) from None
    return wrapper


def _expected(component: Any) -> str:
    if isinstance(component, (gr.Number, gr.Slider)):
        return "a number"
    if isinstance(component, gr.Checkbox):
        return "true or false"
    if isinstance(component, gr.File):
        return "uploaded files (gradio_client.handle_file)"
    if isinstance(component, gr.Dataframe):
        return "a table"
    return "text"


def guard_preprocess(blocks: gr.Blocks) -> None:
    """Make Gradio's own parsing of each argument fail with one line naming it.

    Before a handler (and ``@endpoint``) runs, each input component parses its
    API value (a Slider takes a number, a File a file object); a value of the
    wrong type fails there, and Gradio hides the reason ("The upstream Gradio
    app has raised an exception"). Wrapping each input's ``preprocess`` turns
    that into "<label>: expected a number, not a list".
    """
    seen: set[int] = set()
    for fn in blocks.fns.values():
        for component in fn.inputs:
            if id(component) in seen or not hasattr(component, "preprocess"):
                continue
            seen.add(id(component))
            component.preprocess = _guarded(component, component.preprocess)
    # Files are checked against their data model before ``preprocess`` (pydantic), in Blocks.preprocess_data.
    validate = blocks.preprocess_data

    @functools.wraps(validate)
    async def preprocess_data(block_fn: Any, inputs: list, *args, **kwargs):
        try:
            return await validate(block_fn, inputs, *args, **kwargs)
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001
            raise _culprit(block_fn, inputs) from None

    blocks.preprocess_data = preprocess_data


def _culprit(block_fn: Any, inputs: list) -> UserError:
    """One line naming the first argument whose value does not fit its component's data model."""
    for component, value in zip(block_fn.inputs, inputs):
        model = getattr(component, "data_model", None)
        if model is None or value is None:
            continue
        try:
            model.model_validate(value)
        except Exception:  # noqa: BLE001
            label = getattr(component, "label", None) or type(component).__name__
            return UserError(f"{label}: expected {_expected(component)}, not {_show(value)}")
    return UserError("the arguments do not fit this endpoint (see its signature with view_api)")


def _guarded(component: Any, parse: Callable) -> Callable:
    label = getattr(component, "label", None) or type(component).__name__

    @functools.wraps(parse)
    def preprocess(payload: Any) -> Any:
        try:
            return parse(payload)
        except gr.Error as e:
            raise UserError(f"{label}: {_one_line(e.message if isinstance(e.message, str) else e)}") from None
        except Exception:  # noqa: BLE001 - a value Gradio cannot parse is the caller's mistake, not a crash
            raise UserError(f"{label}: expected {_expected(component)}, not {_show(payload)}") from None

    return preprocess
