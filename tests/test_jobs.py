"""The one progress/cancel/log protocol (checkpoints.jobs)."""

from __future__ import annotations

import pytest

from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Cancelled, Job, ensure, tqdm_job


def test_parts_map_into_the_parent_span_and_share_cancel_and_log():
    job = Job.recording()
    job.progress(0.0, "start")
    first, second = job.part(0.0, 0.25), job.part(0.25, 1.0)
    first.step(1, 2, "half of the first quarter")
    second.progress(0.5, "half of the rest")
    second.part(0.5, 1.0).progress(1.0, "nested end")
    second.progress(None, "no fraction known")
    assert job.events == [(0.0, "start"), (0.125, "half of the first quarter"), (0.625, "half of the rest"),
                          (1.0, "nested end"), (None, "no fraction known")]
    second.note("kept")
    assert job.messages == ["kept"]
    assert not job.cancelled
    second.check()  # not cancelled: no error
    first.cancel()
    assert job.cancelled and second.cancelled
    with pytest.raises(Cancelled, match="merge was cancelled; nothing was written"):
        second.check("merge")
    assert issubclass(Cancelled, WeightsmithError)


def test_fractions_are_clamped_and_listener_is_told():
    seen = []
    job = Job(listener=lambda f, t: seen.append((f, t)))
    job.progress(1.7, "over")
    job.progress(-1, "under")
    job.step(3, 0, "empty total")
    assert seen == [(1.0, "over"), (0.0, "under"), (0.0, "empty total")]
    assert job.events is None  # only recording jobs keep events


def test_ensure_and_tqdm_renderer():
    j = Job()
    assert ensure(j) is j and isinstance(ensure(None), Job)
    with tqdm_job("demo", disable=True) as job:
        job.step(5, 10, "five")
        job.progress(None, "unknown")
    assert not job.cancelled


def test_callback_reports_and_stops_at_the_next_report():
    job = Job.recording()
    report = job.part(0.5, 1.0).callback("the edit")
    report(0.5, "v* step 3")
    assert job.events == [(0.75, "v* step 3")]
    job.cancel()
    with pytest.raises(Cancelled, match="the edit was cancelled"):
        report(0.6, "v* step 4")
    assert len(job.events) == 1  # nothing reported after the cancel
