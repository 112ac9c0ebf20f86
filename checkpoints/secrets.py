"""Keep tokens out of every line a person or a log file can see.

One mechanism for the CLI and the app: :func:`install_redaction` replaces the
``logging`` record factory, so every record created by any logger (ours,
``huggingface_hub``, ``httpx``/``httpcore`` at DEBUG, gradio, uvicorn), whatever
handler later receives it, has its message, arguments and exception text
scrubbed of every secret registered with :func:`register_secret`, before any
handler or formatter sees it. A record factory rather than a handler filter:
filters on a logger do not see records propagated from its children, and
handlers added later (pytest's, gradio's) would miss a filter.

A secret is scrubbed in the forms a client could print it: as is, escaped
(``repr`` of the text or of its bytes, JSON), URL-quoted and base64-encoded,
and each whitespace-separated piece of a token that holds whitespace. Any
``hf_…`` token-shaped string is scrubbed too, registered or not.

:func:`check_token` refuses a malformed token (control characters,
whitespace inside, non-ASCII, absurd length) with one line that never
repeats it.

Example::

    install_redaction()            # once, at start-up (CLI main, app start)
    token = check_token(register_secret(user_input))
    log.debug("sent %s", token)    # logged as "sent ***"
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import sys
import threading
from collections import OrderedDict
from typing import Any
from urllib.parse import quote, quote_plus

from .errors import WeightsmithError

MASK = "***"
# Hub user tokens are "hf_" + 34 letters/digits (OAuth: "hf_oauth_…"); scrub them even when nobody registered them.
_HF_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")
# Shorter forms are not scrubbed on their own: masking every "a" would garble every line. Pieces of a token
# split at whitespace need more: a pasted "Bearer hf_..." should not mask every "Bearer" in the logs.
_MIN_FORM = 6
_MIN_PIECE = 10
# Real tokens are ~40 characters; a JWT-style OAuth token can be ~1-2 KB.
MAX_TOKEN_CHARS = 4096
# A server sees many users' tokens: remember the most recent ones, not all of them forever.
_MAX_SECRETS = 512


class _Registry:
    """The registered secrets and the one pattern that matches all their printable forms.

    Process-wide by necessity (``logging`` is process-wide); bounded (see
    ``_MAX_SECRETS``) and guarded by a lock because app requests register
    tokens from several threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: OrderedDict[str, None] = OrderedDict()
        self._pattern: re.Pattern[str] | None = None

    def add(self, secret: str) -> None:
        with self._lock:
            if secret in self._secrets:
                self._secrets.move_to_end(secret)
                return
            self._secrets[secret] = None
            while len(self._secrets) > _MAX_SECRETS:
                self._secrets.popitem(last=False)
            forms = {f for s in self._secrets for f in secret_forms(s)}
            # Longest first, so a whole token is masked before any piece of it.
            alternatives = sorted(forms, key=len, reverse=True)
            self._pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def redact(self, text: str) -> str:
        pattern = self._pattern
        if pattern is not None:
            text = pattern.sub(MASK, text)
        return _HF_TOKEN_SHAPE.sub("hf_" + MASK, text)


_REGISTRY = _Registry()


def secret_forms(secret: str) -> set[str]:
    """Every printable form of ``secret`` worth scrubbing (see the module docstring)."""
    forms = {secret, secret.strip()}
    forms.add(repr(secret)[1:-1])
    raw = secret.encode("utf-8", "surrogatepass")
    forms.add(repr(raw)[2:-1])
    forms.add(json.dumps(secret)[1:-1])
    forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
    forms.update({quote(secret, safe=""), quote(secret), quote_plus(secret)})
    forms.update(_base64_cores(raw))
    # A token broken by whitespace may be printed one line at a time.
    forms.update(piece for piece in re.split(r"\s+", secret) if len(piece) >= _MIN_PIECE)
    return {f for f in forms if len(f) >= _MIN_FORM}


def _base64_cores(raw: bytes) -> set[str]:
    """The parts of base64(prefix + raw + suffix) that depend only on ``raw``, for the three alignments.

    Basic auth, for one, prints base64("user:" + token); the middle of that
    encoding is fixed by the token whatever the prefix, once aligned.
    """
    out = set()
    for k in range(3):
        data = b"\0" * k + raw
        full_groups = len(data) // 3
        first = 1 if k else 0
        if full_groups <= first:
            continue
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            out.add(encode(data)[4 * first:4 * full_groups].decode("ascii"))
    return out


def register_secret(secret: str | None) -> str | None:
    """Scrub ``secret`` from every log record and :func:`redact` call from now on; returns it unchanged."""
    if isinstance(secret, str) and secret.strip():
        _REGISTRY.add(secret)
        if secret.strip() != secret:
            _REGISTRY.add(secret.strip())
    return secret


def redact(text: Any) -> str:
    """``str(text)`` with every registered secret (and any ``hf_…`` token) replaced by ``***``."""
    return _REGISTRY.redact(str(text))


def check_token(token: str) -> str:
    """``token`` without surrounding whitespace, or one line saying it is malformed (never repeating it).

    Well formed: 8 to ``MAX_TOKEN_CHARS`` printable ASCII characters without
    spaces, which is what an HTTP ``Authorization`` header can carry.
    """
    register_secret(token)
    value = token.strip()
    problems = []
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        problems.append("control characters (a newline?)")
    if any(c.isspace() for c in value) and not problems:
        problems.append("whitespace inside it")
    if any(ord(c) > 127 for c in value):
        problems.append("non-ASCII characters")
    if len(value) > MAX_TOKEN_CHARS:
        problems.append(f"more than {MAX_TOKEN_CHARS} characters")
    elif len(value) < 8:
        problems.append("fewer than 8 characters")
    if problems:
        raise WeightsmithError(
            f"the Hugging Face token is malformed ({'; '.join(problems)}): copy it again from "
            "https://huggingface.co/settings/tokens"
        )
    return value


# --------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------
def _scrub_record(record: logging.LogRecord) -> None:
    """Scrub the record's message and exception text in place, when they hold a secret.

    A clean record is left exactly as made (some formatters, uvicorn's access
    log for one, read ``record.args`` themselves); a record holding a secret
    gets its message formatted now and replaced by the scrubbed text.
    """
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: the handler reports it, from scrubbed text
        message = f"{record.msg} {record.args}"
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[0] is not None:
        text = logging.Formatter().formatException(record.exc_info)
        clean = redact(text)
        if clean != text:
            # exc_text is what formatters print; dropping exc_info keeps any handler from re-formatting the original.
            record.exc_text, record.exc_info = clean, None
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


class _RedactingFactory:
    """A ``logging`` record factory that scrubs each record it makes."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, *args, **kwargs) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)
        _scrub_record(record)
        return record


def install_redaction() -> None:
    """Scrub secrets from every log record, warning and uncaught traceback in this process. Idempotent.

    Also registers the token in ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN``
    (the server's own, on a Space).
    """
    import threading
    import warnings

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        register_secret(os.environ.get(name))
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(factory))
    if not getattr(sys.excepthook, "_weightsmith_redacting", False):
        sys.excepthook = _redacting(sys.excepthook, lambda exc_type, exc, tb: (exc_type, exc, tb))
    if not getattr(threading.excepthook, "_weightsmith_redacting", False):
        threading.excepthook = _redacting(threading.excepthook,
                                          lambda args: (args.exc_type, args.exc_value, args.exc_traceback))
    if not getattr(warnings.formatwarning, "_weightsmith_redacting", False):
        original = warnings.formatwarning

        def formatwarning(*args, **kwargs) -> str:
            return redact(original(*args, **kwargs))

        formatwarning._weightsmith_redacting = True  # type: ignore[attr-defined]
        warnings.formatwarning = formatwarning


def _redacting(inner, unpack):
    """An except hook that prints the traceback scrubbed (``unpack`` gets (type, value, tb) from its arguments)."""
    def hook(*args) -> None:
        import traceback

        exc_type, exc, tb = unpack(*args)
        if exc_type is SystemExit:  # threading's own hook stays silent for it
            return
        sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))

    hook._weightsmith_redacting = True  # type: ignore[attr-defined]
    hook.inner = inner  # type: ignore[attr-defined]
    return hook
