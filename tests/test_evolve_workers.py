"""Evolutionary merge search across processes: a killed or interrupted search resumes where it stopped, and two
worker processes share one study through optuna's journal storage (tiny random models, the real CLI)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("how", ["kill", "interrupt"])
def test_search_resumes_after_a_kill_or_interrupt(how, tiny_llama_family, tmp_path):
    search = write_search(tiny_llama_family, tmp_path, trials=4)
    out = tmp_path / "best"
    proc = evolve(str(search), str(out))
    log = state_dir_for(out) / "trials.jsonl"
    wait_for_lines(log, 1, proc)
    proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGINT)
    code = proc.wait(timeout=120)
    err = proc.communicate()[1]
    if how == "kill":
        assert code == -signal.SIGKILL
    else:  # Ctrl-C cancels the job: the running trial stops at its next check; one line, status 2
        assert code == 2 and err.strip().splitlines()[-1] == \
            ("weightsmith: error: the search was cancelled; its finished trials are kept (run it again to "
             "resume), no merge was written"), err[-3000:]
    assert not out.exists()
    spec = SearchSpec.from_yaml(search)
    study, _ = open_study(spec, None, state_dir_for(out))
    before = trial_records(study)
    first = {t.number: t for t in before if t.state == "complete"}
    assert 1 <= len(first) < 4
    if how == "interrupt":  # the trial Ctrl-C stopped is failed at once, not left running
        assert all(t.state != "running" for t in before)

    result = run_search(spec, out)  # the same command again
    after = {t.number: t for t in result.trials}
    assert sum(t.state == "complete" for t in after.values()) == 4
    assert result.ran_here == 4 - len(first)  # continued: only the missing trials ran
    for number, t in first.items():  # earlier trials kept as they were
        assert after[number].state == "complete" and after[number].score == t.score and after[number].values == t.values
    new = [t for t in result.trials if t.number not in {b.number for b in before}]
    assert len(new) == 4 - len(first) and min(t.number for t in new) > max(b.number for b in before)
    for t in before:  # a trial the killed worker left running is marked failed, with the reason
        if t.state == "running" and t.worker:
            assert after[t.number].state == "fail" and "killed" in after[t.number].error
        # (killed between asking for a trial and recording its owner: failed once ORPHAN_SECONDS old; not
        # counted meanwhile, as the 4 complete trials above show)
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
