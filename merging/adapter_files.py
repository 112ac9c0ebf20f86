"""Adapters named by reference: a folder, a file in it, uploaded files, a Hub id, or a bundled demo.

:func:`find_adapter_files` applies the server's policy (``allow_local``,
``trusted_roots``, as :func:`checkpoints.sources.resolve` does for models): with
local paths off a Hub id is downloaded and never looked up on this machine's
disk, and any other path must lie inside a trusted root. Reading, checking and
writing the files themselves is :mod:`checkpoints.peft_adapter`'s job; this
module adds where they come from, and the base-name check of a mix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from checkpoints.demo_adapters import demo_adapters  # noqa: F401 - merging.adapters re-exports it
from checkpoints.errors import WeightsmithError
from checkpoints.peft_adapter import (
    CONFIG_NAME,
    HUB_ADAPTER_PATTERNS,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    LoraAdapter,
    adapter_files,
    check_fits,
    load_adapter_files,
)
from checkpoints.refs import is_hub_id
from checkpoints.sources import LocalCheckpoint, download_from_hub, public_name


def find_adapter_files(ref: str | Path | Sequence[str | Path], *, allow_local: bool = True,
                       trusted_roots: Sequence[Path] = ()) -> tuple[str, Path, Path]:
    """(public name, config file, weights file) for a folder, a file in it, uploaded files or a Hub id.

    ``allow_local=False`` (a public server): a Hub id is downloaded and never looked up on this
    machine's disk; any other path must lie inside ``trusted_roots``. The adapter's files must lie
    inside its folder once symlinks are followed (:func:`checkpoints.peft_adapter.adapter_files`).
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
    return (name, *adapter_files(folder, name))


def load_adapter(ref: str | Path | Sequence[str | Path], *, allow_local: bool = True,
                 trusted_roots: Sequence[Path] = ()) -> LoraAdapter:
    """Read a PEFT LoRA adapter from a folder, a list of uploaded files, or a Hub id.

    ``allow_local``/``trusted_roots``: the server's policy, as for :func:`checkpoints.sources.resolve`.
    Returns a :class:`checkpoints.peft_adapter.LoraAdapter` in float32; anything that is not a
    plain LoRA, or a corrupt file, is one :class:`WeightsmithError` line.
    """
    return load_adapter_files(*find_adapter_files(ref, allow_local=allow_local, trusted_roots=trusted_roots))


def _same_base_name(a: str, b: str) -> bool:
    """Equal Hub ids, or equal last components (a local copy of a Hub model keeps the repo's name)."""
    a, b = public_name(a).lower(), public_name(b).lower()
    return a == b or a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1]


def check_compatible(adapters: Sequence[LoraAdapter], base: LocalCheckpoint, *, check_names: bool = True) -> None:
    """Raise one clear :class:`WeightsmithError` unless every adapter fits ``base``.

    Checks the adapters' ``base_model_name_or_path`` against the base's name
    (unless ``check_names`` is false), then every A/B shape against the base's
    stored weights (:func:`checkpoints.peft_adapter.check_fits`, headers only).
    """
    if not adapters:
        raise WeightsmithError("no adapters to mix")
    if check_names:
        for ad in adapters:
            if ad.base_model and not _same_base_name(ad.base_model, base.name):
                raise WeightsmithError(
                    f"adapter {ad.name} was trained on {public_name(ad.base_model)!r}, not on the base "
                    f"{base.name!r} (set check_base_name: false to rely on the shape check alone)"
                )
    check_fits(adapters, base)
