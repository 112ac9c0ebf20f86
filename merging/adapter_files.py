"""Where a LoRA adapter's files are: a folder, a file in it, uploaded files, a Hub id, or a bundled demo.

:func:`find_adapter_files` applies the server's policy (``allow_local``,
``trusted_roots``, as :func:`checkpoints.sources.resolve` does for models): with
local paths off a Hub id is downloaded and never looked up on this machine's
disk, and any other path must lie inside a trusted root. The adapter's own files
must lie inside its folder once symlinks are followed
(:func:`checkpoints.containment.member_path`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from checkpoints.containment import member_path
from checkpoints.errors import WeightsmithError
from checkpoints.refs import is_hub_id
from checkpoints.sources import download_from_hub

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
# What an adapter repo on the Hub must provide; no pickles, no code.
HUB_ADAPTER_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME, "README.md"]


def demo_adapters() -> dict[str, Path]:
    """The bundled demo adapters (``assets/adapters/<name>``), by name."""
    root = Path(__file__).resolve().parents[1] / "assets" / "adapters"
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / CONFIG_NAME).is_file()}


def find_adapter_files(ref: str | Path | Sequence[str | Path], *, allow_local: bool = True,
                trusted_roots: Sequence[Path] = ()) -> tuple[str, Path, Path]:
    """(public name, config file, weights file) for a folder, a file in it, uploaded files or a Hub id.

    ``allow_local=False`` (a public server): a Hub id is downloaded and never looked up on this
    machine's disk; any other path must lie inside ``trusted_roots``. The adapter's files must lie
    inside its folder once symlinks are followed (:func:`checkpoints.containment.member_path`).
    """
    def refuse_outside(path: Path, shown: str) -> None:
        if not allow_local and not any(path.resolve().is_relative_to(Path(r).resolve()) for r in trusted_roots):
            raise WeightsmithError(f"{shown}: local paths are not allowed here (name a Hub id owner/name or a "
                                   "workspace item)")

    if isinstance(ref, (list, tuple)):
        files = [Path(f) for f in ref]
        for f in files:
            refuse_outside(f, f.name)
        if len(files) == 1 and files[0].is_dir():
            return find_adapter_files(files[0], allow_local=allow_local, trusted_roots=trusted_roots)
        configs = [f for f in files if f.name == CONFIG_NAME] or [f for f in files if f.suffix == ".json"]
        weights = [f for f in files if f.suffix in (".safetensors", ".bin")]
        if len(configs) != 1 or len(weights) != 1:
            raise WeightsmithError(
                f"an uploaded adapter needs exactly one {CONFIG_NAME} and one {WEIGHTS_NAME}; "
                f"got {', '.join(f.name for f in files) or 'no files'}"
            )
        return weights[0].parent.name, configs[0], weights[0]
    ref_s = str(ref).strip()
    if not ref_s:
        raise WeightsmithError("no adapter named")
    path = Path(ref_s).expanduser()
    if is_hub_id(ref_s) and (not allow_local or not path.exists()):
        folder, name = download_from_hub(ref_s, allow_patterns=HUB_ADAPTER_PATTERNS), ref_s
    else:
        refuse_outside(path, ref_s)
        if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
            path = path.parent
        if not path.is_dir():
            raise WeightsmithError(f"{ref_s}: no such adapter folder, and not a Hub repo id (owner/name)")
        folder, name = path, path.resolve().name
    config = member_path(folder, CONFIG_NAME, owner=name)
    if not config.is_file():
        hint = " (it is a full model: use it as a model, not an adapter)" if (folder / "config.json").exists() else ""
        raise WeightsmithError(f"{name}: no {CONFIG_NAME}: not a PEFT adapter{hint}")
    for weights in (member_path(folder, WEIGHTS_NAME, owner=name), member_path(folder, PICKLE_WEIGHTS_NAME, owner=name)):
        if weights.is_file():
            return name, config, weights
    raise WeightsmithError(f"{name}: no {WEIGHTS_NAME} next to {CONFIG_NAME}")
