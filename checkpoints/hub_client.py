"""Bounded waits for every Hub call: a Hub that stops answering ends the call with one line.

``huggingface_hub`` (>= 1.0) sends every request through one shared
``httpx`` client made by a factory (:func:`huggingface_hub.set_client_factory`).
Its default client has no timeout at all, so ``create_repo``, ``preupload``,
``create_commit`` or ``whoami`` against a Hub that accepts the connection and
never answers wait forever, and some calls pass ``timeout=None`` explicitly
(downloads pass their own 10 s timeouts, ``HF_HUB_ETAG_TIMEOUT``/``HF_HUB_DOWNLOAD_TIMEOUT``). :func:`configure_hub_client`
installs a client whose connect, read, write and pool timeouts are
:func:`hub_timeout` seconds (``WEIGHTSMITH_HUB_TIMEOUT``, default 30): a
request gives up after that long *without progress*, so a large upload that
keeps moving is never cut off; requests that ask for no timeout get this one.

``huggingface_hub`` retries timed-out requests (up to 5 times, pausing
1+2+4+8+8 s). Waiting the full timeout on each retry would make a hung Hub
cost six timeouts; the client's transport remembers a timeout for one more
timeout period and fails the retries at once (still as a timeout, so
``snapshot_download`` falls back to the local cache as usual). A hung Hub
therefore ends a push after about one timeout plus the retry pauses
(~55 s by default).

Uploads through ``hf_xet`` (when installed and the Hub offers it) do not use
this client; they have their own timeouts.

Example::

    configure_hub_client()   # idempotent; push_folder and the app call it
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any

from .errors import WeightsmithError

log = logging.getLogger(__name__)

DEFAULT_HUB_TIMEOUT = 30.0
ENV_VAR = "WEIGHTSMITH_HUB_TIMEOUT"

_LOCK = threading.Lock()


def hub_timeout() -> float:
    """Seconds a Hub request may go without progress: ``WEIGHTSMITH_HUB_TIMEOUT`` or 30."""
    raw = (os.environ.get(ENV_VAR) or "").strip()
    if not raw:
        return DEFAULT_HUB_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise WeightsmithError(f"{ENV_VAR}={raw!r}: give the Hub timeout as a positive number of seconds")
    return value


def _guard_class():
    import httpx2

    class StallGuard(httpx2.BaseTransport):
        """Wraps the real transport: after a timeout, fail the next requests at once for one timeout period."""

        def __init__(self, inner: httpx2.BaseTransport, timeout: float) -> None:
            self.inner = inner
            self.timeout = timeout
            self._hung_until = 0.0

        def handle_request(self, request: httpx2.Request) -> httpx2.Response:
            if time.monotonic() < self._hung_until:
                raise httpx2.ConnectTimeout(
                    f"the Hub did not answer within {self.timeout:g} s a moment ago; not waiting again", request=request)
            # huggingface_hub passes timeout=None explicitly on some calls (repo_info inside snapshot_download),
            # overriding the client default; others pass their own (10 s): none may exceed ours.
            limits = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {k: self.timeout if limits.get(k) is None else min(limits[k], self.timeout)
                                             for k in ("connect", "read", "write", "pool")}
            try:
                response = self.inner.handle_request(request)
            except httpx2.TimeoutException:
                self._hung_until = time.monotonic() + self.timeout
                raise
            self._hung_until = 0.0
            return response

        def close(self) -> None:
            self.inner.close()

    return StallGuard


def make_client(timeout: float | None = None) -> Any:
    """An ``httpx`` client like ``huggingface_hub``'s default one, with bounded waits (see the module docstring)."""
    import httpx2
    from huggingface_hub.utils._http import default_client_factory

    seconds = hub_timeout() if timeout is None else timeout
    template = default_client_factory()  # its event hooks: offline check, request ids, debug log
    hooks = template.event_hooks
    template.close()
    return httpx2.Client(event_hooks=hooks, follow_redirects=True, timeout=httpx2.Timeout(seconds),
                         transport=_guard_class()(httpx2.HTTPTransport(), seconds))


def configure_hub_client() -> float:
    """Make ``huggingface_hub`` use :func:`make_client` from now on; returns the timeout. Idempotent.

    Reads ``WEIGHTSMITH_HUB_TIMEOUT`` again on each call, and replaces the
    shared client only when the timeout changed.
    """
    from huggingface_hub import set_client_factory

    seconds = hub_timeout()
    with _LOCK:
        current = getattr(configure_hub_client, "_installed", None)
        if current != seconds:
            set_client_factory(lambda: make_client(seconds))
            configure_hub_client._installed = seconds  # type: ignore[attr-defined]
            log.debug("Hub requests give up after %g s without an answer", seconds)
    return seconds


def restore_default_hub_client() -> None:
    """Go back to ``huggingface_hub``'s own client (no timeouts): for tests that must undo the change."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    with _LOCK:
        set_client_factory(default_client_factory)
        configure_hub_client._installed = None  # type: ignore[attr-defined]


def is_timeout(err: BaseException) -> bool:
    """True when ``err`` (or what caused it) is a request that ran out of time."""
    import httpx2

    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, (httpx2.TimeoutException, TimeoutError)):
            return True
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
        seen += 1
    return False
