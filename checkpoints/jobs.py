"""One progress, cancel and log protocol for every piece of long work.

Merging, adapter mixing, editing, evaluation and export all take a
``job: Job | None`` argument and report through it; nothing else. Who runs the
work decides how the job is shown:

* the CLI: :func:`tqdm_job` (a bar on stderr);
* the app: ``ui.progress.gradio_job`` (a ``gr.Progress`` and a Stop button's event);
* tests: :meth:`Job.recording`, which keeps every event in ``job.events``.

Fractions are of the whole job. A step of the work that owns part of the
fraction takes a :meth:`Job.part`: a child job that maps its own 0..1 into
that span and shares the parent's cancel event and log, so a helper function
never needs to know where it sits in a larger run.

Cancelling is cooperative: the caller sets the event (:meth:`Job.cancel`), the
work calls :meth:`Job.check` between steps and stops with :class:`Cancelled`
before it writes anything.

Example::

    job = Job.recording()
    for i, name in enumerate(names):
        job.check()
        job.step(i, len(names), f"merging {name}")
    job.events[-1]          # (fraction, "merging ...")
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .errors import WeightsmithError

log = logging.getLogger(__name__)

Listener = Callable[[float | None, str], None]  # (fraction of the whole job or None when unknown, text)


class Cancelled(WeightsmithError):
    """The job's cancel event was set; the work stopped and wrote nothing."""


@dataclass
class Job:
    """Progress, cancel and log of one run. ``listener`` is told each progress event."""

    listener: Listener | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    messages: list[str] = field(default_factory=list)
    events: list[tuple[float | None, str]] | None = None  # kept only by Job.recording()
    start: float = 0.0  # the span of the parent's fraction this job reports into
    span: float = 1.0
    parent: Job | None = None
    started_at: float = field(default_factory=time.monotonic)

    @classmethod
    def recording(cls) -> Job:
        """A job that keeps every progress event in ``events`` (for tests)."""
        return cls(events=[])

    # -- progress -------------------------------------------------------------
    def progress(self, fraction: float | None, text: str) -> None:
        """Report ``fraction`` (0..1 of this job, None when unknown) with a line of text."""
        if fraction is not None:
            fraction = self.start + self.span * min(1.0, max(0.0, float(fraction)))
        if self.parent is not None:
            # Children report through the root so one listener sees one monotone job.
            self.parent.progress(fraction, text)
            return
        if self.events is not None:
            self.events.append((fraction, text))
        if self.listener is not None:
            self.listener(fraction, text)

    def step(self, done: int, total: int, text: str) -> None:
        """Report ``done`` of ``total`` units (a zero total reports 0)."""
        self.progress(done / total if total else 0.0, text)

    def part(self, start: float, end: float) -> Job:
        """A child job whose 0..1 is ``start``..``end`` of this one (same cancel event and log)."""
        return Job(cancel_event=self.cancel_event, messages=self.messages, start=start, span=max(0.0, end - start),
                   parent=self)

    def callback(self, what: str = "the job") -> Callable[[float | None, str], None]:
        """A ``(fraction, text)`` callback for inner code that reports that way: each call first
        checks the cancel event (so a Stop lands at the next report, before anything is written)."""

        def report(fraction: float | None, text: str) -> None:
            self.check(what)
            self.progress(fraction, text)

        return report

    # -- log ------------------------------------------------------------------
    def note(self, text: str) -> None:
        """A line for the job's log (shown by the CLI and the app after the run)."""
        self.messages.append(text)
        log.info(text)

    # -- cancel ---------------------------------------------------------------
    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check(self, what: str = "the job") -> None:
        """Raise :class:`Cancelled` if the job was cancelled (call between steps, before writing)."""
        if self.cancel_event.is_set():
            raise Cancelled(f"{what} was cancelled; nothing was written")


def ensure(job: Job | None) -> Job:
    """``job``, or a silent one: library functions take ``job=None`` and call this once."""
    return job if job is not None else Job()


StepCallback = Callable[[int, int, str], None]  # the engine's old progress(done, total, text)


def legacy_job(job: Job | None, progress: StepCallback | None, cancel: threading.Event | None, total: int) -> Job:
    """``job``; or, for callers not yet passing one, a job that drives the older
    ``progress(done, total, text)`` callback and ``cancel`` event (remove with the last of them).

    ``total`` is the step count the work reports through :meth:`Job.step`, so the
    callback gets back the exact ``done`` it was given. Passing both forms is an error.
    """
    if job is not None:
        if progress is not None or cancel is not None:
            raise ValueError("pass job, or the older progress/cancel, not both")
        return job

    def listener(fraction: float | None, text: str) -> None:
        progress(round(fraction * total) if fraction is not None else 0, total, text)  # type: ignore[misc]

    return Job(listener=listener if progress is not None else None,
               cancel_event=cancel if cancel is not None else threading.Event())


@contextmanager
def tqdm_job(desc: str = "", *, disable: bool | None = None) -> Iterator[Job]:
    """A job shown as a tqdm bar on stderr (the CLI's renderer); its log is logged at the end."""
    from tqdm.auto import tqdm

    bar = tqdm(total=1000, desc=desc, unit="‰", leave=False, disable=disable,
               bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
    last = [0]

    def listener(fraction: float | None, text: str) -> None:
        if fraction is not None:
            target = int(round(1000 * fraction))
            if target > last[0]:
                bar.update(target - last[0])
                last[0] = target
        bar.set_postfix_str(text[:60], refresh=True)

    job = Job(listener=listener)
    try:
        yield job
    finally:
        bar.close()
