"""Library jobs shown in the page: :func:`gradio_job` renders a :class:`checkpoints.jobs.Job` with
``gr.Progress``; :class:`StopEvents` holds the cancel event of each session's running job for its Stop button,
and tells the page when a stopped job has really ended ("Stopping…" becomes "Stopped").
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from checkpoints.jobs import Job

log = logging.getLogger(__name__)

ETA_AFTER_SECONDS = 2.0  # an estimate from the first instants of a job is noise
ETA_MIN_FRACTION = 0.02


def show_progress(progress: Any, fraction: float | None, text: str | None) -> None:
    """One update of a ``gr.Progress`` (or any callable of that shape); a display never breaks a job."""
    if progress is None:
        return
    try:
        progress(fraction, desc=text)
    except Exception:  # noqa: BLE001 - a progress display must never break a job
        log.debug("progress update failed", exc_info=True)


def eta_text(fraction: float, elapsed: float) -> str:
    """The time left (" · about N s left") from this job's own pace so far, never from earlier runs;
    "" while it is too early to tell."""
    if elapsed < ETA_AFTER_SECONDS or fraction < ETA_MIN_FRACTION or fraction >= 1.0:
        return ""
    left = elapsed * (1.0 - fraction) / fraction
    return f" · about {left:.0f} s left" if left < 120 else f" · about {left / 60:.0f} min left"


def gradio_job(progress: Any, cancel_event: threading.Event | None = None, *,
               clock: Any = time.monotonic) -> Job:
    """A job whose progress drives ``progress`` (a ``gr.Progress``; None: not shown) and whose
    cancel event is ``cancel_event`` (the Stop button's, see :meth:`StopEvents.start`).

    A step with an unknown fraction keeps the bar where it was and changes only its text
    (``gr.Progress(None)`` would hide the bar). The text ends with the time left, estimated
    from this job's elapsed time and fraction done.
    """
    last = [0.0]
    started = clock()

    def listener(fraction: float | None, text: str) -> None:
        if fraction is not None:
            last[0] = fraction
        show_progress(progress, last[0], text + eta_text(last[0], clock() - started))

    job = Job(listener=listener)
    if cancel_event is not None:
        job.cancel_event = cancel_event
    return job


class StopEvents:
    """Cancel events of running jobs, per session: the Stop button sets them, the libraries poll them."""

    def __init__(self):
        self._events: dict[str, tuple[threading.Event, threading.Event]] = {}  # session -> (cancel, ended)
        self._stopping: dict[str, threading.Event] = {}  # session -> ended event of the job Stop was pressed on
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        with self._lock:
            ev = threading.Event()
            self._events[session] = (ev, threading.Event())
            return ev

    def finish(self, session: str, ev: threading.Event) -> None:
        with self._lock:
            entry = self._events.get(session)
            if entry is not None and entry[0] is ev:
                del self._events[session]
                entry[1].set()

    def stop(self, session: str) -> bool:
        with self._lock:
            entry = self._events.get(session)
            if entry is not None:
                self._stopping[session] = entry[1]
        if entry is not None:
            entry[0].set()
        return entry is not None

    def wait_stopped(self, session: str, timeout: float) -> bool | None:
        """After :meth:`stop`: wait until that job has ended (True), or ``timeout`` passed (False);
        None when Stop found no job to stop."""
        with self._lock:
            ended = self._stopping.pop(session, None)
        if ended is None:
            return None
        return ended.wait(timeout)
