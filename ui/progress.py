"""Library jobs shown in the page: :func:`gradio_job` renders a :class:`checkpoints.jobs.Job` with
``gr.Progress``; :class:`StopEvents` holds the cancel event of each session's running job for its Stop button.

``progress_adapter`` and ``cancellable`` serve the library calls that still take a progress callback
instead of ``job=``; they go when the last of those calls switches to the Job protocol.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from checkpoints.jobs import Job

log = logging.getLogger(__name__)


def show_progress(progress: Any, fraction: float | None, text: str | None) -> None:
    """One update of a ``gr.Progress`` (or any callable of that shape); a display never breaks a job."""
    if progress is None:
        return
    try:
        progress(fraction, desc=text)
    except Exception:  # noqa: BLE001 - a progress display must never break a job
        log.debug("progress update failed", exc_info=True)


def gradio_job(progress: Any, cancel_event: threading.Event | None = None) -> Job:
    """A job whose progress drives ``progress`` (a ``gr.Progress``; None: not shown) and whose
    cancel event is ``cancel_event`` (the Stop button's, see :meth:`StopEvents.start`).

    A step with an unknown fraction keeps the bar where it was and changes only its text
    (``gr.Progress(None)`` would hide the bar).
    """
    last = [0.0]

    def listener(fraction: float | None, text: str) -> None:
        if fraction is not None:
            last[0] = fraction
        show_progress(progress, last[0], text)

    job = Job(listener=listener)
    if cancel_event is not None:
        job.cancel_event = cancel_event
    return job


def progress_adapter(progress: Any) -> Callable[..., None]:
    """Map a library progress callback onto ``gr.Progress``.

    Accepts ``(done, total[, desc])``, ``(fraction[, desc])`` and keyword forms,
    so any of the libraries' callbacks can drive the bar.
    """

    def report(*args, **kwargs) -> None:
        desc = kwargs.get("desc") or kwargs.get("message")
        nums = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        texts = [a for a in args if isinstance(a, str)]
        desc = desc or (texts[0] if texts else None)
        done = kwargs.get("done", nums[0] if nums else None)
        total = kwargs.get("total", nums[1] if len(nums) > 1 else None)
        if done is not None and total:
            show_progress(progress, min(1.0, float(done) / float(total)), desc)
        elif done is not None:
            show_progress(progress, min(1.0, float(done)), desc)
        elif desc:
            show_progress(progress, 0.0, desc)

    return report


def cancellable(progress: Any, cancel: threading.Event) -> Callable[..., None]:
    """A progress callback that also stops a library call when the Stop button sets ``cancel``.

    For libraries that take only a progress callback: raising from it aborts
    the call before anything is committed.
    """
    report = progress_adapter(progress)

    def call(*args, **kwargs):
        if cancel.is_set():
            raise InterruptedError("stopped")
        report(*args, **kwargs)

    return call


class StopEvents:
    """Cancel events of running jobs, per session: the Stop button sets them, the libraries poll them."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        with self._lock:
            ev = threading.Event()
            self._events[session] = ev
            return ev

    def finish(self, session: str, ev: threading.Event) -> None:
        with self._lock:
            if self._events.get(session) is ev:
                del self._events[session]

    def stop(self, session: str) -> bool:
        with self._lock:
            ev = self._events.get(session)
        if ev is not None:
            ev.set()
        return ev is not None
