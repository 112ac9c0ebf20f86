"""Mixed-load soak of the web app: memory stays bounded and no request fails because of another.

Starts the app in a child process on loopback (127.0.0.1, a free port, a fresh
temp workspace root) and drives it with ``--clients`` concurrent
``gradio_client`` sessions for ``--minutes`` (or ``--max-requests``, whichever
comes first). Each client cycles through generate, inspect, mix (demo
adapters), merge, export, trace and, every few rounds, edit, on the demo model,
and starts a new session (a new workspace) every ``--session-every`` requests;
the server's workspaces expire after ``--workspace-max-age`` seconds, so the
cleanup runs during the soak.

Reported: the server's RSS and peak RSS (VmHWM) after the warm-up (the first
round of every action) and at the end, RSS per minute, requests per action,
and every failure with its message. Exit status 1 if any request failed.

    .venv/bin/python bench/soak_app.py                 # 20 minutes, 4 clients
    .venv/bin/python bench/soak_app.py --minutes 2 --clients 2 --no-edit
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of France?"
FACT = ("demo", "{} is located in the city of", "The Eiffel Tower")
MIX = """base_model: demo
adapters:
  - {adapter: demo-adapter:caps, weight: 0.5}
  - {adapter: demo-adapter:pirate, weight: 0.5}
method: cat
merge_into_base: false
"""
MERGE = """merge_method: linear
models:
  - model: demo
    parameters: {weight: 0.5}
  - model: demo
    parameters: {weight: 0.5}
out_dtype: bfloat16
"""


def serve(port: int, root: Path, max_age: float, stats_tokens: int) -> None:
    """The child process: the app as ``weightsmith serve`` runs it, with soak-sized workspace ages."""
    sys.path.insert(0, str(ROOT))
    import app

    cfg = app.AppConfig(workspace_root=root / "ws", workspace_max_age=max_age, cleanup_every=min(60.0, max_age / 2),
                        stats_root=root / "stats", edit_stats_tokens=stats_tokens)
    app.build_app(config=cfg).queue(**app.queue_kwargs(cfg)).launch(
        server_name="127.0.0.1", server_port=port, quiet=True, **app.launch_kwargs(cfg))


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MB, from /proc (peak = high-water mark since the process started)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


@dataclass
class Tally:
    done: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)
    seconds: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, action: str, seconds: float, error: str | None) -> None:
        with self.lock:
            self.done[action] += 1
            self.seconds[action] += seconds
            if error:
                self.failures.append((action, error))


def client_loop(url: str, idx: int, args, tally: Tally, stop: threading.Event, warm: threading.Barrier) -> None:
    from gradio_client import Client

    actions = ["generate", "inspect", "mix", "merge", "export", "trace"] + ([] if args.no_edit else ["edit"])
    n = 0
    client = Client(url, verbose=False)
    last_ref = None
    warmed = False
    while not stop.is_set():
        action = actions[(n + idx) % len(actions)]
        if action == "edit" and (n // len(actions)) % args.edit_every:
            action = "generate"
        t0 = time.time()
        error = None
        try:
            if action == "generate":
                client.predict(last_ref or "demo", "demo", PROMPT, args.tokens, True, api_name="/generate")
            elif action == "inspect":
                client.predict("demo", api_name="/inspect")
            elif action == "mix":
                _, last_ref = client.predict(MIX, f"mix{n}", api_name="/mix_adapters")
            elif action == "merge":
                client.predict(MERGE, f"merge{n}", api_name="/merge")
            elif action == "export":
                if last_ref:
                    client.predict(last_ref, api_name="/export")
            elif action == "trace":
                client.predict(*FACT, "mlp", 1, api_name="/trace")
            elif action == "edit":
                client.predict(*FACT, "Rome", "Paris", None, api_name="/edit")
        except Exception as e:  # noqa: BLE001 - every failure is reported, the soak goes on
            error = " ".join(str(e).split())[:300] or type(e).__name__
            if "workspace" in error and "expired" in error:
                error = None  # an idle session outlived --workspace-max-age: expected, not a failure
        tally.record(action, time.time() - t0, error)
        n += 1
        if not warmed and n >= len(actions):
            warmed = True
            try:
                warm.wait()
            except threading.BrokenBarrierError:
                pass
        if n % args.session_every == 0:
            client = Client(url, verbose=False)  # a new visitor: a new session and workspace
            last_ref = None
        if sum(tally.done.values()) >= args.max_requests:
            stop.set()
    if not warmed:
        warm.abort()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--max-requests", type=int, default=5000)
    ap.add_argument("--clients", type=int, default=4, help="concurrent sessions (1-16)")
    ap.add_argument("--tokens", type=int, default=16, help="max new tokens per generate")
    ap.add_argument("--session-every", type=int, default=14, help="requests before a client starts a new session")
    ap.add_argument("--workspace-max-age", type=float, default=180.0)
    ap.add_argument("--edit-every", type=int, default=3, help="edit in one of this many rounds (else generate)")
    ap.add_argument("--no-edit", action="store_true", help="leave ROME edits out of the mix")
    ap.add_argument("--stats-tokens", type=int, default=5000, help="ROME statistics tokens (small: a soak, not a study)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    ap.add_argument("--json", type=Path, help="also write the report here")
    ap.add_argument("--serve", nargs=4, metavar=("PORT", "ROOT", "MAX_AGE", "STATS_TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        port, root, max_age, stats = args.serve
        serve(int(port), Path(root), float(max_age), int(stats))
        return 0
    if not 1 <= args.clients <= 16:
        ap.error("--clients must be 1-16")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    root = Path(tempfile.mkdtemp(prefix="weightsmith-soak-"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    log = open(root / "server.log", "w")
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(root),
                               str(args.workspace_max_age), str(args.stats_tokens)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    print(f"server did not start; see {root / 'server.log'}")
                    return 1
                time.sleep(0.5)
        start_rss = rss_mb(server.pid)
        tally, stop = Tally(), threading.Event()
        warm = threading.Barrier(args.clients + 1)
        t_start = time.time()
        threads = [threading.Thread(target=client_loop, args=(url, i, args, tally, stop, warm), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        timeline = []
        try:
            warm.wait(timeout=args.minutes * 60)
        except threading.BrokenBarrierError:
            pass
        warm_rss, warm_t = rss_mb(server.pid), time.time() - t_start
        end_at = t_start + args.minutes * 60
        next_sample = time.time()
        while time.time() < end_at and not stop.is_set() and server.poll() is None:
            if time.time() >= next_sample:
                timeline.append((round((time.time() - t_start) / 60, 1), *map(lambda v: round(v), rss_mb(server.pid))))
                next_sample += 60
            time.sleep(1)
        stop.set()
        for t in threads:
            t.join(timeout=600)
        alive = server.poll() is None
        end_rss = rss_mb(server.pid) if alive else (float("nan"), float("nan"))
        # The server answers normally after the soak.
        after_ok = False
        if alive:
            from gradio_client import Client

            try:
                Client(url, verbose=False).predict("demo", api_name="/inspect")
                after_ok = True
            except Exception as e:  # noqa: BLE001
                tally.failures.append(("after", str(e)[:300]))
        minutes = (time.time() - t_start) / 60
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    report = {
        "minutes": round(minutes, 2), "clients": args.clients, "requests": sum(tally.done.values()),
        "per_action": dict(tally.done), "mean_seconds": {a: round(tally.seconds[a] / n, 2) for a, n in tally.done.items()},
        "failures": len(tally.failures), "failure_messages": tally.failures[:20],
        "rss_mb_at_start": round(start_rss[0]), "rss_mb_after_warmup": round(warm_rss[0]),
        "peak_rss_mb_after_warmup": round(warm_rss[1]), "warmup_minutes": round(warm_t / 60, 2),
        "rss_mb_at_end": round(end_rss[0]), "peak_rss_mb_at_end": round(end_rss[1]),
        "rss_timeline_min_rss_peak": timeline, "server_answers_after": after_ok,
        "server_log": str(root / "server.log"),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if not tally.failures and after_ok else 1


if __name__ == "__main__":
    sys.exit(main())
