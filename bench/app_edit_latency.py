"""Editing latency in the app against the library (issue 13, item 1), in one run.

1. A fresh ``WEIGHTSMITH_HOME`` prepared as ``make run`` does: ``weightsmith demo-model`` (the demo
   model converted, and its editing statistics prepared).
2. ``weightsmith serve`` on a free loopback port, driven through ``gradio_client`` as a visitor:
   the first edit (fresh server, fresh session), a later edit (another fact), a trace with 3 samples.
3. The same work in the library, in this process, on the same home (statistics cached, as for the
   app): the first fact, then the later fact timed (``EditSession.apply``), and the trace (``causal_trace``).

Printed: the first-edit time and the three ratios app / library (targets: first edit <= 30 s,
later edit <= 1.5x, trace <= 1.5x on an idle 2-core machine), with the load average, since a loaded
machine only gives an upper bound. The app's edit also generates 24 tokens before and after the edit
(its "before"/"after" panes, one batched generation: :mod:`editing.before_after`); the ratio's library
time is the edit alone, as the CLI's (stricter), and the ratio against the edit plus that generation is
printed beside it.

    .venv/bin/python bench/app_edit_latency.py
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST = ("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
LATER = ("{} plays the sport of", "LeBron James", "football", "basketball")
TRACE = ("The Eiffel Tower is located in the city of", "The Eiffel Tower")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weightsmith() -> str:
    return str(Path(sys.executable).parent / "weightsmith")


def wait_up(url: str, server: subprocess.Popen, timeout: float) -> None:
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the server did not answer within {timeout:.0f} s")


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def app_times(url: str) -> dict[str, float]:
    from gradio_client import Client

    client = Client(url, verbose=False)
    out = {}
    out["first edit"], _ = timed(client.predict, "demo", *FIRST, None, api_name="/edit")
    out["later edit"], _ = timed(client.predict, "demo", *LATER, None, api_name="/edit")
    out["trace"], _ = timed(client.predict, "demo", *TRACE, "mlp", 3, api_name="/trace")
    return out


def library_times() -> dict[str, float]:
    from checkpoints.sources import resolve
    from editing.before_after import continuations_before_after
    from editing.prepare import configured_corpus, open_session
    from editing.trace import causal_trace

    out = {}
    out["load"], session = timed(open_session, resolve("demo"), corpus=configured_corpus())
    out["first edit"], _ = timed(session.apply, request(FIRST))
    later = request(LATER)
    out["later edit"], edit = timed(session.apply, later)
    # The app's edit also shows the model's greedy continuation before and after (one batched generation).
    out["before/after generation"], _ = timed(continuations_before_after, session, later.text, edit)
    out["trace"], _ = timed(causal_trace, session.model, session.tokenizer, *TRACE, kind="mlp", samples=3)
    return out


def request(fact: tuple[str, str, str, str]):
    """(prompt, subject, target, true answer) -> an EditRequest at the default layer, as the app sends it."""
    from editing.request import EditRequest

    prompt, subject, target, target_true = fact
    return EditRequest(prompt, subject, target, None, target_true)


def load_text() -> str:
    """The 1/5/15-minute load averages: every figure is printed beside the load it was measured under."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=None,
                        help="WEIGHTSMITH_HOME to use (default: a fresh temporary folder, as a new install)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server to start")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="OMP_NUM_THREADS (and torch threads) of the server and of the library part alike "
                             "(default: every CPU, as a server started without the variable uses)")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="ws-latency-home-"))
    os.environ["WEIGHTSMITH_HOME"] = str(home)  # this process (the library part) and its children
    # Both sides with the same threads, or the ratio measures the thread count rather than the app.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    env = dict(os.environ)
    print(f"load average at start: {load_text()}; OMP_NUM_THREADS={args.threads}; WEIGHTSMITH_HOME={home}",
          flush=True)

    t_prep, _ = timed(subprocess.run, [weightsmith(), "demo-model"], env=env, check=True, stdout=subprocess.DEVNULL)
    print(f"weightsmith demo-model (conversion + statistics): {t_prep:.1f} s", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([weightsmith(), "serve", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(url, server, args.timeout)
        app = app_times(url)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    print("app (gradio_client): " + ", ".join(f"{k} {v:.2f} s" for k, v in app.items())
          + f"  [load {load_text()}]", flush=True)
    lib = library_times()
    print("library (in-process): " + ", ".join(f"{k} {v:.2f} s" for k, v in lib.items())
          + f"  [load {load_text()}]", flush=True)

    load = os.getloadavg()
    print(f"\nload average at end: {load_text()} on {os.cpu_count()} CPUs"
          + ("  (loaded machine: the figures are upper bounds)" if load[1] > 0.5 * (os.cpu_count() or 1) else ""))
    rows = [("first edit (s)", app["first edit"], 30.0, "s"),
            ("later edit app/library", app["later edit"] / lib["later edit"], 1.5, "x"),
            ("trace app/library", app["trace"] / lib["trace"], 1.5, "x")]
    with_gen = lib["later edit"] + lib["before/after generation"]
    print(f"(later edit against the library's edit plus the same before/after generation: "
          f"{app['later edit'] / with_gen:.2f}x)")
    for name, value, target, unit in rows:
        print(f"{name:<26} {value:8.2f}{unit}   target <= {target}{unit}   {'ok' if value <= target else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
