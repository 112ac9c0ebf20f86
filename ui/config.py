"""Server policy and limits of the web app, and what Gradio's ``queue``/``launch`` take from them."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from checkpoints.sizes import parse_size

MODEL_FILE_TYPES = [".safetensors", ".json", ".gguf", ".model", ".txt", ".jinja", ".zip"]


@dataclass
class AppConfig:
    """Server policy and limits. Defaults suit a public Space; ``weightsmith serve`` maps its flags here.

    ``named_models``: extra models offered by name in every model picker
    (an allowlist of server folders, e.g. tiny models in tests), usable even
    when ``allow_paths`` is off.
    """

    allow_paths: bool = False
    allow_hub: bool = True
    named_models: dict[str, str] = field(default_factory=dict)
    workspace_root: Path | None = None
    workspace_max_age: float = 3600.0
    workspace_max_bytes: int | None = 20 * 1024**3  # quota per session: uploads, results and its download zip
    max_file_size: str | int | None = "2gb"
    device: str = "cpu"
    max_loaded_models: int = 3
    heavy_concurrency: int = 1  # merges, mixes, edits at once (each may hold several models in memory)
    generate_concurrency: int = 2
    default_concurrency: int = 2  # other queued events (inspect, upload, ...)
    queue_max_size: int = 64  # requests waiting in the queue; more are turned away with "queue is full"
    max_new_tokens: int = 256
    cleanup_every: float = 300.0
    max_edit_sessions: int = 2  # in-memory edited models (each a full copy of its model)
    edit_corpus: str | None = None  # ROME statistics corpus: a text file, or None = model-sampled text
    edit_stats_tokens: int | None = None  # None: the editing library's default
    stats_root: Path | None = None  # where ROME statistics are cached (None: the library's default)


def workspace_root(config: AppConfig) -> Path:
    return Path(config.workspace_root or Path(tempfile.gettempdir()) / "weightsmith-workspaces")


def launch_kwargs(config: AppConfig) -> dict:
    """What ``launch`` needs for this config (the upload size limit).

    The workspace root is deliberately not in ``allowed_paths``: Gradio's file route never serves
    it, and a file reaches a browser only as the output of that session's own call (Gradio copies
    it into its cache under a content hash). Keep the root under the system temp folder (the
    default) or the working directory, where Gradio accepts returned files.
    """
    return dict(max_file_size=parse_size(config.max_file_size, what="--max-file-size"))  # one size parser


def queue_kwargs(config: AppConfig) -> dict:
    """What ``queue`` needs for this config: a bounded queue, so a flood of requests is refused, not buffered."""
    return dict(default_concurrency_limit=config.default_concurrency, max_size=config.queue_max_size)
