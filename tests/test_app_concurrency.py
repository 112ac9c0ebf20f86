"""Concurrency: model loading and caches under many requests at once, through a fresh server.

The server-level cases start their own server on loopback (a fresh model cache),
like a Space right after a restart. The ``ModelCache`` cases check the
single-flight loading, the LRU bound and that a failed load is not cached.
"""

from __future__ import annotations

import gc
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ui.config import AppConfig, launch_kwargs, queue_kwargs  # noqa: E402
from ui.layout import build_app  # noqa: E402
from ui.workbench import Workbench  # noqa: E402
from checkpoints.errors import WeightsmithError  # noqa: E402
from checkpoints.model_cache import ModelCache  # noqa: E402

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from test_app_api import MERGE  # noqa: E402 - the same tiny task-arithmetic recipe

PROMPT = "The capital of France is"


class _Server:
    """A fresh app on loopback; ``close()`` stops it."""

    def __init__(self, root: Path, named: dict[str, Path]):
        self.cfg = AppConfig(workspace_root=root / "ws", max_file_size="50mb",
                                 named_models={k: str(v) for k, v in named.items()},
                                 edit_stats_tokens=2000, stats_root=root / "stats")
        self.demo = build_app(config=self.cfg)
        self.demo.queue(**queue_kwargs(self.cfg)).launch(
            server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **launch_kwargs(self.cfg))

    def client(self) -> Client:
        return Client(self.demo.local_url, verbose=False)

    def close(self) -> None:
        self.demo.close()


@pytest.fixture
def fresh_server(tmp_path, tiny_llama_family, tiny_llama_tied_dir):
    server = _Server(tmp_path, {"tiny-base": tiny_llama_family["base"], "tiny-ft1": tiny_llama_family["ft1"],
                                "tiny-ft2": tiny_llama_family["ft2"], "tiny-tied": tiny_llama_tied_dir})
    try:
        yield server
    finally:
        server.close()


def _run_all(fns: list) -> list[tuple[str, object]]:
    """Run every callable at once (one thread each); return ("ok", value) or ("error", message) per call."""
    start = threading.Barrier(len(fns))

    def run(fn):
        start.wait()
        try:
            return "ok", fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported with its message
            return "error", f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=len(fns)) as pool:
        return list(pool.map(run, fns))


@pytest.mark.slow
def test_eight_generates_at_once_on_a_fresh_server(fresh_server, demo_dir):
    """Eight clients call /generate on the (tied-embedding) demo model at once, right after start.

    Before the fix this failed with "Cannot copy out of meta tensor", and every later single call failed too.
    """
    clients = [fresh_server.client() for _ in range(8)]
    results = _run_all([lambda c=c: c.predict("demo", "", PROMPT, 3, False, api_name="/generate")
                        for c in clients])
    assert [r[0] for r in results] == ["ok"] * 8, [r for r in results if r[0] != "ok"]
    texts = {r[1][0] for r in results}
    assert len(texts) == 1 and texts.pop().strip(), results[0]  # greedy: every client got the same non-empty text
    # The server answers normally afterwards, and loaded the model once.
    work, _ = fresh_server.client().predict("demo", "", PROMPT, 3, False, api_name="/generate")
    assert work == results[0][1][0]
    assert len(fresh_server.demo.workbench.models) == 1


@pytest.mark.slow
def test_sixteen_mixed_clients_at_once(fresh_server, demo_dir, tmp_path, tiny_llama_family):
    """16 sessions at once: generate, inspect, merge, upload + mix (+ generate with the adapter), trace, edit.

    Every request succeeds (heavy jobs wait their turn in the queue); none fails because of another.
    """
    from test_app import make_tiny_adapter

    adapter = make_tiny_adapter(tiny_llama_family["base"], tmp_path / "adapter", seed=3)
    adapter_files = [adapter / "adapter_config.json", adapter / "adapter_model.safetensors"]

    def generate(i):
        c = fresh_server.client()
        return c.predict("demo", "tiny-tied", PROMPT, 3, False, api_name="/generate")

    def inspect(i):
        c = fresh_server.client()
        return dict(c.predict(["demo", "tiny-base", "tiny-tied"][i % 3], api_name="/inspect")["data"])["layers"]

    def merge(i):
        c = fresh_server.client()
        _, _, ref = c.predict(MERGE, f"m{i}", api_name="/merge")
        return c.predict(ref, "tiny-base", PROMPT, 2, False, api_name="/generate")

    def mix(i):
        c = fresh_server.client()
        c.predict([handle_file(str(p)) for p in adapter_files], "ad", "", api_name="/upload")
        recipe = ("base_model: tiny-base\nadapters:\n  - {adapter: ws:ad, weight: 0.5}\nmethod: cat\n"
                  f"merge_into_base: {'true' if i % 2 else 'false'}\n")
        _, ref = c.predict(recipe, f"mix{i}", api_name="/mix_adapters")
        return c.predict(ref, "tiny-base", PROMPT, 2, False, api_name="/generate")

    def trace(i):
        c = fresh_server.client()
        return c.predict("tiny-base", "{} is located in the city of", "The Eiffel Tower", "mlp", 1,
                         api_name="/trace")[2]

    def edit(i):
        c = fresh_server.client()
        return c.predict("tiny-base", "{} is located in the city of", "The Eiffel Tower", "Rome", "Paris", 1,
                         api_name="/edit")[2]

    plan = [generate] * 4 + [inspect] * 3 + [merge] * 3 + [mix] * 4 + [trace, edit]
    assert len(plan) == 16
    results = _run_all([lambda f=f, i=i: f(i) for i, f in enumerate(plan)])
    failures = [(f.__name__, r) for f, r in zip(plan, results) if r[0] != "ok"]
    assert not failures, failures
    gens = [r[1] for f, r in zip(plan, results) if f is generate]
    assert len({tuple(g) for g in gens}) == 1 and gens[0][0] != gens[0][1]  # demo and tiny-tied differ
    assert {r[1] for f, r in zip(plan, results) if f is inspect} == {"30", "4"}
    assert "Edit **1**" in results[-1][1]
    assert 0 <= results[-2][1] < 4
    # Afterwards the server answers normally, with the caches within their bounds.
    c = fresh_server.client()
    assert c.predict("demo", "", PROMPT, 3, False, api_name="/generate")[0] == gens[0][0]
    wb = fresh_server.demo.workbench
    assert len(wb.models) <= fresh_server.cfg.max_loaded_models and len(wb.adapter_models) <= 1


# ---- the cache itself -----------------------------------------------------------------------------

def test_cache_loads_once_for_concurrent_requests():
    cache = ModelCache(max_models=2)
    calls, started = [], threading.Event()

    def load():
        calls.append(1)
        started.set()
        return object()

    results = _run_all([lambda: cache.get_or_load("k", load) for _ in range(8)])
    assert [r[0] for r in results] == ["ok"] * 8
    assert len(calls) == 1 and len({id(r[1]) for r in results}) == 1


def test_failed_load_is_not_cached_and_waiters_get_its_error():
    cache = ModelCache(max_models=2)
    release = threading.Event()
    attempts = []

    def bad():
        attempts.append(1)
        release.wait(5)
        raise WeightsmithError("demo: broken weights")

    owner = threading.Thread(target=lambda: pytest.raises(WeightsmithError, cache.get_or_load, "k", bad))
    owner.start()
    while not attempts:
        threading.Event().wait(0.01)
    waiter_error = []
    waiter = threading.Thread(target=lambda: waiter_error.append(
        pytest.raises(WeightsmithError, cache.get_or_load, "k", bad).value))
    waiter.start()
    threading.Event().wait(0.1)
    release.set()
    owner.join()
    waiter.join()
    assert "broken weights" in str(waiter_error[0]) and len(attempts) == 1  # the waiter shared the one attempt
    assert len(cache) == 0
    assert cache.get_or_load("k", lambda: "fine") == "fine"  # the next request loads again


def test_cache_is_a_bounded_lru_and_frees_what_it_drops():
    class Model:
        pass

    cache = ModelCache(max_models=2)
    a, b = Model(), Model()
    ref_a = weakref.ref(a)
    cache.get_or_load("a", lambda: a)
    cache.get_or_load("b", lambda: b)
    cache.get_or_load("a", lambda: pytest.fail("a is cached"))  # a is now the most recent
    del a
    cache.get_or_load("c", Model)
    assert len(cache) == 2
    assert ref_a() is not None  # b went, a stayed
    assert cache.get_or_load("b", Model) is not b  # b was dropped, so it loads again ...
    gc.collect()
    assert ref_a() is None  # ... and evicted a, which nothing else holds: freed
    with pytest.raises(WeightsmithError, match="at least 1"):
        ModelCache(max_models=0)


def test_distinct_tied_models_built_at_once_stay_correct(tmp_path):
    """Eight different tied-embedding models built in parallel threads: each loads, and so does a later one.

    Unserialised, transformers' builds restore each other's patched ``tie_weights``; afterwards every
    tied model's head stayed on the meta device.
    """
    import torch
    from conftest import build_tiny_llama, save_model
    from transformers import PreTrainedModel

    tie_before = PreTrainedModel.tie_weights
    dirs = [save_model(build_tiny_llama(i, tie=True), tmp_path / f"t{i}") for i in range(8)]
    cache = ModelCache(max_models=8)
    results = _run_all([lambda d=d: cache.get(str(d)) for d in dirs])
    assert [r[0] for r in results] == ["ok"] * 8, results
    assert PreTrainedModel.tie_weights is tie_before
    later = ModelCache(max_models=1).get(str(dirs[0]))
    head, emb = later.model.get_output_embeddings().weight, later.model.get_input_embeddings().weight
    assert head.device.type == "cpu" and head.data_ptr() == emb.data_ptr()
    assert torch.isfinite(head).all()


# ---- workspaces -----------------------------------------------------------------------------------

def test_cleanup_never_removes_a_workspace_under_a_running_job(tmp_path, tiny_llama_family):
    """Another session's request runs the age-based cleanup while this session's job runs: the job's
    workspace survives (before, it was deleted under the job), and the job's end counts as use."""
    from types import SimpleNamespace

    wb = Workbench(AppConfig(workspace_root=tmp_path / "ws", workspace_max_age=60, cleanup_every=0,
                                     named_models={"tiny-base": str(tiny_llama_family["base"])}))
    a = wb.workspace(SimpleNamespace(session_hash="a"))

    def job(cancel):
        (a.path / ".last-used").write_text("0")  # looks idle for ages ...
        wb.workspace(SimpleNamespace(session_hash="b"))  # ... when another request triggers the cleanup
        return a.path.is_dir()

    assert wb.run_job(SimpleNamespace(session_hash="a"), job) is True
    assert a.path.is_dir() and wb.workspace(SimpleNamespace(session_hash="a")).id == a.id
    # Non-vacuous: once no job holds it, an idle workspace does go.
    (a.path / ".last-used").write_text("0")
    wb.workspace(SimpleNamespace(session_hash="b"))
    assert not a.path.exists()


def test_workspace_lookups_race_the_cleanup(tmp_path):
    """Sessions look up their workspaces while cleanups run: no lookup fails, and held ones survive."""
    from checkpoints.workspace import WorkspaceConfig, WorkspaceManager

    m = WorkspaceManager(WorkspaceConfig(root=tmp_path / "ws", max_age_seconds=0.0))
    ids = [m.create().id for _ in range(8)]
    held = m.create()
    errors, stop = [], threading.Event()

    def lookups(ws_id):
        while not stop.is_set():
            try:
                ws_id = m.get_or_create(ws_id).id
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
                return

    def cleanups():
        with m.hold(held.id):
            for _ in range(60):
                m.cleanup()
                assert held.path.is_dir()
        stop.set()

    threads = [threading.Thread(target=lookups, args=(i,)) for i in ids] + [threading.Thread(target=cleanups)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert errors == [] and held.path.is_dir()
    assert not [p for p in m.config.root.iterdir() if p.name.startswith(".deleting-")]  # nothing half-removed
