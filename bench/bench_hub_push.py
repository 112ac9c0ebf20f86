"""How long a push takes against a local Hub-compatible server (no network, no Xet): LFS upload + commit.

Prints the push time next to the time to merely sha256 the same bytes, so the ratio shows
what the client adds over the unavoidable hashing. Usage: python bench/bench_hub_push.py [MB]
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fake_hub import FakeHub  # noqa: E402

TOKEN = "hf_BenchToken000000000000000000"


def main(mb: int = 128) -> None:
    hub = FakeHub(tokens={TOKEN: "bench"}).start()
    home = Path(tempfile.mkdtemp(prefix="bench-hub-"))
    # Before huggingface_hub is imported: it reads these once.
    os.environ.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_HUB_OFFLINE="0",
                      HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
    from checkpoints.cards import CardInfo, write_card
    from checkpoints.hub import push_folder

    folder = home / "out"
    folder.mkdir()
    shard = 32
    for i in range(mb // shard):
        (folder / f"model-{i:05d}.safetensors").write_bytes(os.urandom(shard * 2**20))
    write_card(folder, CardInfo("bench", "merge", ["org/a", "org/b"], "Benchmark folder."))

    t0 = time.perf_counter()
    for p in folder.glob("*.safetensors"):
        hashlib.sha256(p.read_bytes()).hexdigest()
    t_hash = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = push_folder(folder, "bench/push", token=TOKEN)
    t_push = time.perf_counter() - t0
    assert len(hub.commits("bench/push")) == 2
    print(f"pushed {mb} MB in {len(result.files)} files: {t_push:.2f} s ({mb / t_push:.0f} MB/s); "
          f"sha256 alone {t_hash:.2f} s; push/hash ratio {t_push / t_hash:.1f}x")
    hub.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 128)
