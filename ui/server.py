"""Start the app: ``weightsmith serve``, ``make run`` and ``python app.py`` (a Space) call :func:`serve`."""

from checkpoints.errors import WeightsmithError
from checkpoints.sizes import parse_size

from .config import AppConfig, launch_kwargs, queue_kwargs
from .layout import build_app


def serve(*, host: str = "127.0.0.1", port: int = 7860, allow_paths: bool = False, share: bool = False,
          max_file_size: str = "2gb", workspace_max_age: float = 3600.0, workspace_quota: str | int = "20GiB",
          queue_size: int = 64) -> None:
    """Start the app (``weightsmith serve`` and ``make run`` call this)."""
    parse_size(max_file_size, what="--max-file-size")  # one clear error for a bad size before anything starts
    if int(queue_size) < 1:
        raise WeightsmithError(f"--queue-size {queue_size}: must be at least 1")
    # The ROME statistics corpus (a text file) can be set for a deployment; default: model-sampled text.
    from editing.prepare import configured_corpus  # the one `weightsmith demo-model` prepares statistics for

    config = AppConfig(allow_paths=allow_paths, max_file_size=max_file_size, workspace_max_age=workspace_max_age,
                       workspace_max_bytes=parse_size(workspace_quota, what="--workspace-quota"),
                       queue_max_size=int(queue_size), edit_corpus=configured_corpus())
    build_app(config=config).queue(**queue_kwargs(config)).launch(
        server_name=host, server_port=port, share=share, **launch_kwargs(config))
