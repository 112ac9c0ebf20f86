"""Evaluation results on disk, keyed by model content, task content and the settings that change a score.

A result is a small JSON file ``<root>/results/<key[:2]>/<key>.json``; the key is the
SHA-256 of (model digest, task digest, task kind, settings). Files are written to a temp
name and renamed, so a reader sees a whole result or none. A file hash memo
(``<root>/files.json``: path, size, mtime -> SHA-256) spares re-reading a model's weights
on every run; a file rewritten in place gets a new mtime and is hashed again.

The cache is an object its owner holds (the CLI makes one under the Weightsmith home, the
app one per server), never module state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checkpoints.fingerprint import file_sha256
from checkpoints.home import weightsmith_home

log = logging.getLogger(__name__)


def result_key(model_digest: str, task_digest: str, kind: str, settings: dict[str, Any]) -> str:
    blob = json.dumps({"model": model_digest, "task": task_digest, "kind": kind, "settings": settings,
                       "version": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class EvalCache:
    root: Path
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def default(cls) -> EvalCache:
        """The cache under the Weightsmith home (``$WEIGHTSMITH_HOME/eval``)."""
        return cls(weightsmith_home() / "eval")

    def _path(self, key: str) -> Path:
        return Path(self.root) / "results" / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        try:
            _write_json(self._path(key), value)
        except OSError as e:  # a full or read-only disk loses the cache entry, not the result
            log.warning("evaluation cache: cannot write (%s)", e.strerror or e)

    def file_digest(self, path: Path) -> str:
        """SHA-256 of ``path``, memoised by (resolved path, size, mtime)."""
        st = path.stat()
        tag = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        memo_path = Path(self.root) / "files.json"
        with self._lock:
            try:
                memo = json.loads(memo_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                memo = {}
            if isinstance(memo, dict) and isinstance(memo.get(tag), str):
                return memo[tag]
        digest = file_sha256(path)
        with self._lock:
            try:
                memo = json.loads(memo_path.read_text(encoding="utf-8"))
                memo = memo if isinstance(memo, dict) else {}
            except (OSError, ValueError):
                memo = {}
            memo[tag] = digest
            try:
                _write_json(memo_path, memo)
            except OSError as e:
                log.warning("evaluation cache: cannot write the file memo (%s)", e.strerror or e)
        return digest
