"""The app's progress and Stop protocol: gr.Progress driven by a Job, ETAs from the job's own pace, Stopped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ui.progress import StopEvents, eta_text, gradio_job  # noqa: E402


def test_gradio_job_drives_the_bar_and_obeys_the_stop_event():
    import threading

    from checkpoints.jobs import Cancelled

    calls = []
    stop = threading.Event()
    job = gradio_job(lambda frac, desc=None: calls.append((round(frac, 3), desc)), stop)
    job.step(1, 4, "tensors")
    job.part(0.5, 1.0).progress(0.5, "half of the rest")
    job.progress(None, "writing")  # unknown fraction: the bar stays where it was, the text changes
    assert calls == [(0.25, "tensors"), (0.75, "half of the rest"), (0.75, "writing")]
    job.check("merge")  # not stopped yet: no error
    stop.set()  # the Stop button's event
    assert job.cancelled
    with pytest.raises(Cancelled, match="merge was cancelled"):
        job.check("merge")
    assert not gradio_job(None).cancelled  # without a Stop button: its own event
    gradio_job(None).progress(0.5, "x")  # no bar: ignored

    def broken(*args, **kwargs):
        raise RuntimeError("display gone")

    gradio_job(broken).progress(0.5, "x")  # a display never breaks the job


def test_eta_comes_from_this_jobs_own_pace():
    assert eta_text(0.5, 10.0) == " · about 10 s left"
    assert eta_text(0.25, 30.0) == " · about 90 s left"
    assert eta_text(0.1, 60.0) == " · about 9 min left"
    assert eta_text(0.5, 1.0) == "" and eta_text(0.0, 30.0) == "" and eta_text(1.0, 30.0) == ""  # too early / done
    now = [0.0]
    calls = []
    job = gradio_job(lambda frac, desc=None: calls.append(desc), clock=lambda: now[0])
    job.progress(0.1, "statistics")  # at 0 s: no estimate yet
    now[0] = 8.0
    job.progress(0.5, "v* steps")
    assert calls == ["statistics", "v* steps · about 8 s left"]


def test_stopping_becomes_stopped_when_the_job_ends():
    import threading

    jobs = StopEvents()
    assert jobs.wait_stopped("s", 0.01) is None  # Stop found nothing: nothing to report
    ev = jobs.start("s")
    assert jobs.stop("s") and ev.is_set()
    assert jobs.wait_stopped("s", 0.01) is False  # still running: the page keeps "Stopping…"
    jobs.stop("s")
    timer = threading.Timer(0.05, jobs.finish, ("s", ev))
    timer.start()
    assert jobs.wait_stopped("s", 5.0) is True  # the job ended: "Stopped"
    assert jobs.wait_stopped("s", 0.01) is None  # told once
