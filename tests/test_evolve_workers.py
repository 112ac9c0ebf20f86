"""Evolutionary merge search across processes: a killed or interrupted search resumes where it stopped, and two
worker processes share one study through optuna's journal storage (tiny random models, the real CLI)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from merging.evolve import open_study, read_log, run_search, state_dir_for, trial_records
from merging.evolve_space import SearchSpec

ROOT = Path(__file__).resolve().parents[1]
TEXT = " ".join(["the capital of France is Paris . the capital of Italy is Rome ."] * 12)


def write_search(fam, tmp_path: Path, trials: int) -> Path:
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    path = tmp_path / "search.yaml"
    path.write_text(f"""
merge_method: task_arithmetic
base_model: {fam['base']}
models: [{fam['ft1']}, {fam['ft2']}]
search: {{weight: [0.0, 1.0], lines: {{alpha: [0.0, 1.0]}}}}
tasks: [{{task: {text}}}]
eval: {{seq_len: 32}}
budget: {{trials: {trials}}}
""", encoding="utf-8")
    return path


def evolve(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-c", "import cli; cli.run()", "evolve", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while len(read_log(path)) < n:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < end, "the search logged too few trials in time"
        time.sleep(0.05)


def wait_for_a_merge(state: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    """Until the worker is merging a trial (its scratch folder holds a trial's files)."""
    end = time.monotonic() + timeout
    while not any(p.name.lstrip(".").startswith("trial-") for p in (state / "scratch").glob("*/*")):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < end, "no trial started in time"
        time.sleep(0.02)


def test_search_resumes_after_an_interrupt_and_after_a_kill(tiny_llama_family, tmp_path):
    search = write_search(tiny_llama_family, tmp_path, trials=5)
    spec = SearchSpec.from_yaml(search)
    out = tmp_path / "best"
    log = state_dir_for(out) / "trials.jsonl"

    def study_now():
        return trial_records(open_study(spec, None, state_dir_for(out))[0])

    # Ctrl-C cancels the job: the running trial stops at its next check and is failed at once; one line, status 2.
    proc = evolve(str(search), str(out))
    wait_for_lines(log, 1, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 2
    assert proc.communicate()[1].strip().splitlines()[-1] == (
        "weightsmith: error: the search was cancelled; its finished trials are kept (run it again to resume), "
        "no merge was written")
    first = study_now()
    assert all(t.state != "running" for t in first) and not out.exists()
    done_first = {t.number: t for t in first if t.state == "complete"}
    assert 1 <= len(done_first) < 5

    # Run it again and kill -9 it after one more trial: nothing can be cleaned up by the dying process.
    proc = evolve(str(search), str(out))
    wait_for_lines(log, len(read_log(log)) + 1, proc)
    wait_for_a_merge(state_dir_for(out), proc)  # killed mid-trial, not while it holds the journal's lock
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=120) == -signal.SIGKILL and not out.exists()
    before = study_now()
    done_before = {t.number: t for t in before if t.state == "complete"}
    assert set(done_first) < set(done_before) and len(done_before) < 5

    result = run_search(spec, out)  # the same command a third time
    after = {t.number: t for t in result.trials}
    assert sum(t.state == "complete" for t in after.values()) == 5
    assert result.ran_here == 5 - len(done_before)  # continued: only the missing trials ran
    for number, t in done_before.items():  # earlier trials kept as they were
        assert after[number].state == "complete" and after[number].score == t.score and after[number].values == t.values
    new = [t for t in result.trials if t.number not in {b.number for b in before}]
    assert len(new) == 5 - len(done_before) and min(t.number for t in new) > max(b.number for b in before)
    (killed,) = [t for t in before if t.state == "running"]  # the trial it was merging: failed, with the reason
    assert after[killed.number].state == "fail" and "killed" in after[killed.number].error
    assert [r["number"] for r in read_log(log) if r["state"] == "complete"] == sorted(
        t.number for t in after.values() if t.state == "complete")
    assert out.is_dir() and result.best.score == max(t.score for t in after.values() if t.state == "complete")


def test_two_workers_share_one_study(tiny_llama_family, tmp_path):
    search = write_search(tiny_llama_family, tmp_path, trials=8)
    journal = tmp_path / "shared.journal"
    workers = [evolve(str(search), str(tmp_path / f"w{i}"), "--storage", str(journal), "--no-output")
               for i in (1, 2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outputs]
    spec = SearchSpec.from_yaml(search)
    study, _ = open_study(spec, str(journal), tmp_path)
    trials = trial_records(study)
    done = [t for t in trials if t.state == "complete"]
    assert 8 <= len(done) <= 9  # two workers may both start the last trial
    by_worker = {t.worker for t in done}
    assert {f"{w}".split(":")[-1] for w in by_worker} == {str(w.pid) for w in workers}  # both ran trials
    assert len({tuple(t.values.values()) for t in done}) == len(done)  # each point drawn once
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()  # --no-output: trials only
    # A third run on the same storage has no trial left to run: it writes the study's best.
    result = run_search(spec, tmp_path / "best", storage=str(journal))
    assert result.ran_here == 0 and result.best.score == max(t.score for t in done)
    assert result.verified_score == result.best.score
