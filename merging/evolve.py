"""Evolutionary merge search: CMA-ES (optuna's ``CmaEsSampler``) over a SEARCH.yaml's space.

Each trial takes one point from the sampler, builds its recipe (:meth:`SearchSpec.recipe`),
merges it with the streaming engine into a scratch folder, scores it with
:func:`evaluation.evaluate_models` (the one scorer), and tells the score back. The study lives
in optuna's storage: by default a journal file beside the output, ``OUT.search/journal.log``,
or any storage URL optuna takes (``sqlite:///…``, ``postgresql://…``), which is also how
several machines share one search (each runs the same command on the same storage).

* **Resume**: rerunning the command reopens the study and goes on to the budget. A trial whose
  worker was killed (its owner record, :func:`checkpoints.staging.owner_record`, names a process
  that is gone) is marked failed and its scratch folder removed; nothing restarts.
* **Log**: every finished trial is a line of ``OUT.search/trials.jsonl`` (values, recipe, score,
  each task's metric, seconds, worker) and is in the storage too (user attributes).
* **Budget**: ``trials`` counts complete trials of the whole study (all workers, all runs; running
  ones count too, so workers do not overshoot); ``minutes`` is this run's wall time: no trial starts
  that the last one's duration says would end past it.
* **Output**: the best trial's recipe is merged again into a staging folder, scored again (the
  user sees both numbers), given a card section that records the search, and renamed into
  ``OUT`` (:mod:`merging.evolve_output`).

Progress and cancel go through one :class:`checkpoints.jobs.Job`.

Example::

    result = run_search(SearchSpec.from_yaml(Path("search.yaml")), Path("out"), job=job)
    result.best.score, result.best.recipe.to_yaml()
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Cancelled, Job, ensure
from checkpoints.staging import OWNER_FILE, owner_alive, owner_record

from .engine import run_merge
from .evolve_results import BestTrial, SearchResult, TrialRecord, score_folder
from .evolve_space import SearchSpec

log = logging.getLogger(__name__)

LOG_NAME = "trials.jsonl"
JOURNAL_NAME = "journal.log"
ORPHAN_SECONDS = 120.0  # a running trial with no owner record after this long was left by a killed worker
MAX_FAILS_IN_A_ROW = 3  # a search whose trials keep failing has a problem no other point will fix


def state_dir_for(out_dir: Path) -> Path:
    """Where the search of ``out_dir`` keeps its journal, log and scratch folders: ``OUT.search`` beside it."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.search"


def open_study(spec: SearchSpec, storage: str | None, state_dir: Path, study_name: str | None = None, *,
               seed: int | None = None):
    """The study (created or reopened) on ``storage`` (a URL, a journal file path, or None: the journal
    file in ``state_dir``), with a CMA-ES sampler (:func:`cma_sampler`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = _storage(storage, state_dir)
    name = study_name or f"evolve-{spec.identity()}"
    try:
        study = optuna.create_study(study_name=name, storage=store, sampler=cma_sampler(spec, seed),
                                    direction="maximize", load_if_exists=True)
    except (ValueError, RuntimeError) as e:  # a storage of another optuna version, a study of another direction
        raise WeightsmithError(f"search storage: {e}") from None
    return study, store


def cma_sampler(spec: SearchSpec, seed: int | None):
    """optuna's CMA-ES; its first mean is the middle of every range, optuna's default (``spec.start()``).
    With a single dimension optuna samples at random (CMA-ES needs two)."""
    import optuna

    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=0, warn_independent_sampling=False)


def _storage(storage: str | None, state_dir: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if storage and "://" in storage:
        try:
            return optuna.storages.RDBStorage(storage)
        except Exception as e:  # noqa: BLE001 - a bad URL or a missing driver: one line, without the URL's password
            driver = f": {str(e).splitlines()[0]}" if isinstance(e, ImportError) and str(e) else ""  # the missing driver
            raise WeightsmithError(f"search storage: cannot open the database ({type(e).__name__}{driver})") from None
    path = Path(storage) if storage else state_dir / JOURNAL_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except OSError as e:
        raise WeightsmithError(f"search storage {path.name}: cannot write there ({e.strerror})") from None


def fail_dead_trials(study, store) -> list[int]:
    """Mark failed the running trials whose worker process is gone (killed); returns their numbers.

    Workers on other machines count as alive (a process there cannot be checked from here). A trial
    with no owner record yet (its worker was killed between asking for it and recording itself, a
    moment's window) is failed once it is :data:`ORPHAN_SECONDS` old; until then it is not counted
    against the budget (:func:`_counts`).
    """
    from optuna.trial import TrialState

    study_id = store.get_study_id_from_name(study.study_name)
    failed = []
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("owner")
        orphan = owner is None and t.datetime_start is not None and \
            (now - t.datetime_start).total_seconds() > ORPHAN_SECONDS
        if orphan or (isinstance(owner, dict) and not owner_alive(owner)):
            trial_id = store.get_trial_id_from_study_id_trial_number(study_id, t.number)
            store.set_trial_user_attr(trial_id, "error", "its worker was killed")
            store.set_trial_state_values(trial_id, TrialState.FAIL)
            failed.append(t.number)
    return failed


def trial_records(study) -> list[TrialRecord]:
    """Every trial of the study (all workers), in order."""
    from optuna.trial import TrialState

    names = {TrialState.COMPLETE: "complete", TrialState.RUNNING: "running"}
    out = []
    for t in study.get_trials(deepcopy=False):
        secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        owner = t.user_attrs.get("owner") or {}
        out.append(TrialRecord(t.number, names.get(t.state, "fail"), t.value if t.state == TrialState.COMPLETE else None,
                               dict(t.params), dict(t.user_attrs.get("parts") or {}), secs,
                               f"{owner.get('host', '?')}:{owner.get('pid', '?')}" if owner else "",
                               str(t.user_attrs.get("error", ""))))
    return out


def best_trial(spec: SearchSpec, study) -> BestTrial:
    records = [r for r in trial_records(study) if r.state == "complete"]
    if not records:
        raise WeightsmithError("search: no trial has completed yet, so there is no best recipe")
    best = max(records, key=lambda r: (r.score, -r.number))
    return BestTrial(best.number, float(best.score), best.parts, best.values, spec.recipe(best.values))


def run_search(spec: SearchSpec, out_dir: Path | str | None, *, storage: str | None = None,
               study_name: str | None = None, job: Job | None = None, device: str = "cpu",
               threads: int | None = None, overwrite: bool = False, seed: int | None = None,
               on_trial: Callable[[list[TrialRecord]], None] | None = None, max_trials: int | None = None,
               allow_local: bool = True, trusted_roots: Sequence[Path] = (),
               state_dir: Path | None = None) -> SearchResult:
    """Search ``spec``'s space until its budget is spent, then write the best merge to ``out_dir``.

    Args:
        out_dir: the best merge's folder (must not exist unless ``overwrite``); None: search only
            (a worker that leaves writing to another machine). Its search state is ``OUT.search``
            beside it unless ``state_dir`` is given.
        storage: optuna storage URL (``sqlite:///search.db``, ``postgresql://…``) or a journal file path
            shared by every worker; default ``OUT.search/journal.log``.
        study_name: default ``evolve-<hash of the space, models, tasks and settings>``.
        threads: torch threads for the duration (None: leave as is).
        seed: the sampler's seed (default: the file's seed plus the study's trial count, so a resumed
            run or a second worker does not replay the same draws).
        on_trial: called with every trial of the study after each trial of this run (the app's plot).
        max_trials: overrides the file's ``budget.trials``.
        allow_local, trusted_roots: the resolver's policy for the models (the scratch and output
            folders are trusted besides).

    Returns a :class:`SearchResult`; raises :class:`Cancelled` when the job is cancelled (the
    running trial is marked failed; finished trials stay in the study for a resume).
    """
    if threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(max(1, int(threads)))
        try:
            return run_search(spec, out_dir, storage=storage, study_name=study_name, job=job, device=device,
                              threads=None, overwrite=overwrite, seed=seed, on_trial=on_trial,
                              max_trials=max_trials, allow_local=allow_local, trusted_roots=trusted_roots,
                              state_dir=state_dir)
        finally:
            torch.set_num_threads(previous)
    from optuna.trial import TrialState

    from .evolve_output import write_best

    job = ensure(job)
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is None and state_dir is None:
        raise WeightsmithError("search: give an output folder or a state folder")
    if out_dir is not None and out_dir.exists() and not overwrite:
        raise WeightsmithError(f"{out_dir} already exists (choose another folder or allow overwrite)")
    state = Path(state_dir) if state_dir is not None else state_dir_for(out_dir)  # type: ignore[arg-type]
    state.mkdir(parents=True, exist_ok=True)
    roots = (*trusted_roots, state, *([out_dir.parent] if out_dir is not None else []))
    budget = max_trials if max_trials is not None else spec.max_trials
    if budget is None and spec.minutes is None:
        raise WeightsmithError("search: no budget (trials or minutes)")
    job.progress(0.0, "opening the study")
    study, store = open_study(spec, storage, state, study_name)
    if seed is None:  # a resumed run or a second worker must not replay the first one's draws
        seed = (spec.seed * 1_000_003 + len(study.trials) * 7919 + owner_record()["pid"]) % 2**31
    study.sampler = cma_sampler(spec, seed)
    dead = fail_dead_trials(study, store)
    if dead:
        job.note(f"trial(s) {', '.join(map(str, dead))} were left running by a killed worker: marked failed")
    scratch = _scratch_dir(state)
    started = time.monotonic()
    deadline = started + spec.minutes * 60 if spec.minutes is not None else None
    ran, fails, last_seconds, stopped = 0, 0, 0.0, ""
    while True:
        if job.cancelled:
            raise Cancelled("the search was cancelled; its finished trials are kept (run it again to resume), "
                            "no merge was written")
        counts = _counts(study)
        done = counts.get(TrialState.COMPLETE, 0)
        if budget is not None and done + counts.get(TrialState.RUNNING, 0) >= budget:
            stopped = f"{done} trials of {budget} done" if done >= budget else "the last trials run on other workers"
            break
        now = time.monotonic()
        if deadline is not None and now + last_seconds > deadline:
            stopped = f"time budget ({spec.minutes:g} min) spent"
            break
        fraction = _fraction(done, budget, now - started, spec.minutes)
        try:
            record = _one_trial(spec, study, scratch, job, fraction, done, budget, device, allow_local, roots)
        except Cancelled:
            raise Cancelled("the search was cancelled; its finished trials are kept (run it again to resume), "
                            "no merge was written") from None
        ran += 1
        last_seconds = record.seconds or 0.0
        _append_log(state / LOG_NAME, record, spec)
        fails = fails + 1 if record.state == "fail" else 0
        if on_trial is not None:
            on_trial(trial_records(study))
        if fails >= MAX_FAILS_IN_A_ROW:
            raise WeightsmithError(f"search: {fails} trials failed in a row (last: {record.error})")
    # Wait for other workers' last trials only through the storage: a best is taken from what completed.
    best = best_trial(spec, study)
    records = trial_records(study)
    job.note(f"search stopped: {stopped}; best trial {best.number}, score {best.score:.4f}")
    result = SearchResult(out_dir, study.study_name, best, records, ran, stopped, state_dir=state)
    shutil.rmtree(scratch, ignore_errors=True)
    if out_dir is not None:
        verified, parts = write_best(spec, result, out_dir, job=job.part(0.97, 1.0), device=device,
                                     overwrite=overwrite, allow_local=allow_local, trusted_roots=roots)
        result.verified_score, result.verified_parts = verified, parts
    job.progress(1.0, f"best score {best.score:.4f} (trial {best.number})")
    return result


def _counts(study) -> dict[Any, int]:
    """Trials by state; running ones only while their worker is alive (or on another machine)."""
    from optuna.trial import TrialState

    out: dict[Any, int] = {}
    for t in study.get_trials(deepcopy=False):
        owner = t.user_attrs.get("owner")
        if t.state == TrialState.RUNNING and not (isinstance(owner, dict) and owner_alive(owner)):
            continue
        out[t.state] = out.get(t.state, 0) + 1
    return out


def _fraction(done: int, budget: int | None, elapsed: float, minutes: float | None) -> float:
    parts = [done / budget] if budget else []
    if minutes:
        parts.append(elapsed / (minutes * 60))
    return min(0.97, max(parts) * 0.97) if parts else 0.0


def _one_trial(spec: SearchSpec, study, scratch_root: Path, job: Job, fraction: float, done: int, budget: int | None,
               device: str, allow_local: bool, roots: Sequence[Path]) -> TrialRecord:
    """Ask, merge, score, tell. A failure of this trial's merge or score is a failed trial; a cancel or
    an interrupt marks it failed and goes up."""
    import optuna
    from optuna.trial import TrialState

    dists = {d.name: optuna.distributions.FloatDistribution(d.low, d.high) for d in spec.dimensions}
    trial = study.ask(dists)
    t0 = time.monotonic()
    scratch = scratch_root / f"trial-{trial.number}"
    of = f" of {budget}" if budget else ""
    span = (0.97 / budget) if budget else 0.0
    part = job.part(fraction, min(0.97, fraction + span))
    values: dict[str, float] = {}
    try:
        trial.set_user_attr("owner", owner_record())
        values = {d.name: float(trial.params[d.name]) for d in spec.dimensions}
        recipe = spec.recipe(values)
        part.progress(0.0, f"trial {trial.number} ({done + 1}{of}): merging")
        run_merge(recipe, scratch, job=part.part(0.0, 0.3), collect_norms=False, overwrite=True,
                  allow_local=allow_local, trusted_roots=roots)
        part.progress(0.3, f"trial {trial.number} ({done + 1}{of}): evaluating")
        score, parts = score_folder(spec, scratch, f"trial {trial.number}", job=part.part(0.3, 1.0), device=device,
                                    roots=roots)
    except Cancelled:
        study.tell(trial, state=TrialState.FAIL)
        raise
    except WeightsmithError as e:
        trial.set_user_attr("error", str(e))
        study.tell(trial, state=TrialState.FAIL)
        job.note(f"trial {trial.number} failed: {e}")
        return TrialRecord(trial.number, "fail", None, values, seconds=time.monotonic() - t0,
                           worker=_worker(), error=str(e))
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    trial.set_user_attr("parts", parts)
    study.tell(trial, score)
    seconds = time.monotonic() - t0
    job.note(f"trial {trial.number}: score {score:.4f} ({seconds:.0f} s)")
    return TrialRecord(trial.number, "complete", score, values, parts, seconds, _worker())


def _worker() -> str:
    return f"{socket.gethostname()}:{owner_record()['pid']}"


def _append_log(path: Path, record: TrialRecord, spec: SearchSpec) -> None:
    """One JSON line per finished trial (a kill mid-line leaves a line :func:`read_log` skips)."""
    row = asdict(record)
    if record.state == "complete":
        row["recipe"] = spec.recipe(record.values).to_dict()
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:  # the storage still has the trial
        log.warning("search log: cannot write %s (%s)", path.name, e.strerror)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The trial log's rows (lines that do not parse, e.g. cut by a kill, are skipped)."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _scratch_dir(state: Path) -> Path:
    """This worker's scratch folder for trial merges, ``OUT.search/scratch/<pid>``, with its owner record;
    the folders of workers that are gone (killed) are removed first, live workers' are left alone."""
    root = state / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        try:
            owner = json.loads((entry / OWNER_FILE).read_text())
        except (OSError, ValueError):
            owner = {}
        if not owner_alive(owner if isinstance(owner, dict) else {}):
            shutil.rmtree(entry, ignore_errors=True)
    mine = root / str(owner_record()["pid"])
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir()
    (mine / OWNER_FILE).write_text(json.dumps(owner_record()))
    return mine
