"""One resolver: turn whatever a user names into a local checkpoint.

Accepted references:

* ``demo``: the bundled SmolLM2-135M-Instruct (see :mod:`checkpoints.demo`);
* a local Hugging Face folder (one safetensors file, or shards plus index);
* a single ``.safetensors`` file, with config and tokenizer from ``config_from``;
* a ``.gguf`` file (converted once, cached);
* a ``.bin``/``.pt`` pickle state dict (read with ``weights_only=True``), with ``config_from``;
* a Hub repo id ``owner/name``, through ``snapshot_download`` (honours
  ``HF_HUB_OFFLINE`` and the local cache).

Example::

    ckpt = resolve("demo")
    ckpt.model_type, ckpt.num_layers, ckpt.reader().keys()[:3]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .arch import ArchSpec, spec_for
from .containment import error_line, member_path
from .demo import DEMO_NAME, demo_folder, demo_model_path
from .errors import WeightsmithError
from .peft_adapter import is_adapter_folder
from .hub_download import download_from_hub
from .refs import is_hub_id, join_lora_ref, lora_sides
from .tensors import (SUPPORT_FILES, CheckpointReader, TensorMeta, parse_json_object, read_safetensors_header,
                      weight_files)

log = logging.getLogger(__name__)


@dataclass
class LocalCheckpoint:
    """A checkpoint on local disk, with its config.

    ``name`` is what may be shown publicly (Hub id or folder name), never a
    local path. ``support_dir`` holds config/tokenizer files; ``files`` are the
    weight files.
    """

    ref: str
    name: str
    kind: str  # demo | folder | safetensors | gguf | pickle | hub | lora (model+adapter, merging.lora_inputs)
    support_dir: Path
    files: list[Path]
    config: dict[str, Any]
    hub_id: str | None = None
    _reader: CheckpointReader | None = field(default=None, repr=False)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    @property
    def spec(self) -> ArchSpec:
        return spec_for(self.model_type)

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers(self.config)

    def reader(self) -> CheckpointReader:
        """Lazy per-tensor reader (created once per checkpoint object)."""
        if self._reader is None:
            if self.kind == "pickle":
                self._reader = CheckpointReader.from_pickle(self.files[0])
            else:
                self._reader = CheckpointReader.from_files(self.files)
        return self._reader

    @property
    def stored_dtype(self) -> torch.dtype | None:
        """The floating dtype most of the weights are stored in (None: none is floating, e.g. all quantized):
        what a derived model is written in by default, so an edited bfloat16 model stays bfloat16."""
        counts: dict[torch.dtype, int] = {}
        for meta in self.reader().metas().values():
            if meta.dtype.is_floating_point:
                counts[meta.dtype] = counts.get(meta.dtype, 0) + meta.numel
        return max(counts, key=counts.__getitem__) if counts else None

    def tied_names(self) -> list[str]:
        return self.spec.tied_head_names(self.config)

    def check_matches_config(self) -> None:
        """Raise if the weights' shapes contradict the config (hidden size, vocab, layer count)."""
        metas = self.reader().metas()
        check_config_against_weights(self.name, self.config, self.spec, metas)

    def load_model(self, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """A transformers causal LM in ``dtype`` on ``device``; never runs remote code."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from .build_lock import building_models

        self.check_matches_config()
        direct = self.kind in ("folder", "hub", "demo", "gguf") and self.support_dir == self.files[0].parent
        state = None if direct else {k: v for k, v in self.reader().iter_tensors(dtype=dtype)}
        # transformers patches process-wide state while it builds a model: one build at a time.
        with building_models():
            if state is None:
                model = AutoModelForCausalLM.from_pretrained(str(self.support_dir), dtype=dtype,
                                                             trust_remote_code=False)
            else:
                config = AutoConfig.from_pretrained(str(self.support_dir), trust_remote_code=False)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
                missing, unexpected = model.load_state_dict(state, strict=False)
                missing = [m for m in missing if m not in self.tied_names()]
                if missing or unexpected:
                    raise WeightsmithError(f"{self.name}: weights do not fit the config: missing {missing[:3]}, "
                                           f"unexpected {unexpected[:3]}")
                model.tie_weights()
        model.eval()
        return model.to(device)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.support_dir), trust_remote_code=False)
        except Exception as e:
            raise WeightsmithError(f"{self.name}: cannot load tokenizer: {error_line(e, self.support_dir)}") from None

    def summary(self) -> dict[str, Any]:
        """Architecture, layer count, parameter count, dtypes and files: what ``weightsmith info`` prints."""
        reader = self.reader()
        return {
            "name": self.name,
            "source": self.kind,
            "architecture": self.model_type,
            "layers": self.num_layers,
            "parameters": reader.num_parameters(),
            "dtype": ",".join(reader.dtypes()),
            "hidden_size": self.config.get("hidden_size", self.config.get("n_embd")),
            "vocab_size": self.config.get("vocab_size"),
            "files": [f.name for f in self.files],
        }


def check_config_against_weights(name: str, config: dict, spec: ArchSpec, metas: dict[str, TensorMeta]) -> None:
    """One clear error when a config contradicts the stored tensors."""
    blocks = {spec.block_of(n) for n in metas} - {None}
    n_layers = spec.num_layers(config)
    if blocks and max(blocks) + 1 != n_layers:
        raise WeightsmithError(
            f"{name}: config says {n_layers} layers but the weights have {max(blocks) + 1} blocks"
        )
    vocab = config.get("vocab_size")
    for emb in spec.embeddings[:1]:
        for key in (f"{emb}.weight", f"{spec.strip_optional_prefix(emb)}.weight"):
            if key in metas and len(metas[key].shape) != 2:
                raise WeightsmithError(f"{name}: {key} has shape {list(metas[key].shape)}, not a 2-D embedding matrix")
            if key in metas and vocab and metas[key].shape[0] != vocab:
                raise WeightsmithError(
                    f"{name}: config says vocab_size {vocab} but {key} has {metas[key].shape[0]} rows"
                )
            hidden = config.get("hidden_size", config.get("n_embd"))
            if key in metas and hidden and metas[key].shape[-1] != hidden:
                raise WeightsmithError(
                    f"{name}: config says hidden size {hidden} but {key} has width {metas[key].shape[-1]}"
                )


def _read_config(folder: Path, who: str) -> dict[str, Any]:
    candidate = folder / "config.json"
    if not (candidate.is_file() or candidate.is_symlink()):  # not a FIFO either: reading one would block
        raise WeightsmithError(f"{who}: no config.json in {folder.name}")
    path = member_path(folder, "config.json", owner=who)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise WeightsmithError(f"{who}: config.json: cannot read: {e.strerror or type(e).__name__}") from None
    config = parse_json_object(raw, f"{who}: config.json")
    if not isinstance(config.get("model_type"), str):
        raise WeightsmithError(f"{who}: config.json has no model_type")
    return config


def _from_folder(ref: str, folder: Path, kind: str, name: str, hub_id: str | None = None) -> LocalCheckpoint:
    config = _read_config(folder, name)
    if is_adapter_folder(folder) and not any(folder.glob("model*.safetensors")):
        raise WeightsmithError(f"{name}: this is a PEFT adapter, not a model (use it as an adapter)")
    for support in SUPPORT_FILES:  # transformers reads these straight from the folder
        if (folder / support).exists() or (folder / support).is_symlink():
            member_path(folder, support, owner=name)
    try:
        files = weight_files(folder)
        ckind = kind
    except WeightsmithError:
        pickles = [p for p in (folder / "pytorch_model.bin", folder / "model.pt") if p.exists()]
        if not pickles:
            raise
        files, ckind = [member_path(folder, pickles[0].name, owner=name)], "pickle"
    return LocalCheckpoint(ref, name, ckind, folder, files, config, hub_id=hub_id)


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    real = path.resolve()
    return any(real.is_relative_to(Path(r).resolve()) for r in roots)


def resolve(ref: str | Path, *, config_from: str | None = None, allow_hub: bool = True,
            allow_local: bool = True, trusted_roots: Sequence[Path] = ()) -> LocalCheckpoint:
    """Resolve a user's reference to a :class:`LocalCheckpoint`.

    ``config_from`` names (anything resolvable) where a bare weights file takes
    its config and tokenizer. ``allow_local=False`` is the policy of a public
    server: only ``demo``, Hub ids (downloaded; a string that is a Hub id is then
    never looked up on this machine's disk) and paths inside ``trusted_roots``
    (the session's workspace, models the operator chose) are read.
    Raises :class:`WeightsmithError` with one line.
    """
    ref_s = str(ref).strip()
    if not ref_s:
        raise WeightsmithError("no model named")
    if ref_s == "demo":
        folder = demo_model_path()
        return _from_folder("demo", folder, "demo", DEMO_NAME, hub_id=DEMO_NAME)
    if not allow_local:
        if is_hub_id(ref_s):
            return _from_hub(ref_s, allow_hub)
        if "\x00" in ref_s or not _inside(Path(ref_s), trusted_roots):
            raise WeightsmithError(
                f"{ref_s}: local paths are not allowed here (name demo, a Hub id owner/name or a workspace item)"
            )
    path = Path(ref_s).expanduser()
    if path.is_dir():
        return _from_folder(ref_s, path, "folder", path.resolve().name)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            from .gguf_convert import convert_gguf

            folder = convert_gguf(path)
            return _from_folder(ref_s, folder, "gguf", path.stem)
        if suffix in (".safetensors", ".bin", ".pt", ".pth"):
            if config_from is None:
                raise WeightsmithError(
                    f"{path.name}: a bare weights file needs a config: name a base model to take it from"
                )
            base = resolve(config_from, allow_hub=allow_hub, allow_local=allow_local, trusted_roots=trusted_roots)
            if suffix == ".safetensors":
                read_safetensors_header(path)  # fail early and clearly on a bad file
                kind = "safetensors"
            else:
                kind = "pickle"
            return LocalCheckpoint(ref_s, path.stem, kind, base.support_dir, [path], dict(base.config))
        raise WeightsmithError(f"{path.name}: unsupported file type {suffix!r} (use .safetensors, .gguf or a folder)")
    if is_hub_id(ref_s):
        return _from_hub(ref_s, allow_hub)
    raise WeightsmithError(f"{ref_s}: no such file or folder, and not a Hub repo id (owner/name)")


def _from_hub(repo_id: str, allow_hub: bool) -> LocalCheckpoint:
    if not allow_hub:
        raise WeightsmithError(f"{repo_id}: Hub ids are not allowed here")
    return _from_folder(repo_id, download_from_hub(repo_id), "hub", repo_id, hub_id=repo_id)


def public_name(ref: str) -> str:
    """What a card may show for a model reference: a Hub id as is, a path as its last component."""
    s = str(ref).strip().rstrip("/")
    sides = lora_sides(s)
    if len(sides) == 2 and not Path(s).expanduser().exists():
        # model+adapter (a merge recipe's LoRA input): each side by its own public name.
        return join_lora_ref(public_name(sides[0]), public_name(sides[1]))
    if s == "demo" or (s and Path(s).expanduser().resolve() == demo_folder().resolve()):
        return DEMO_NAME
    if is_hub_id(s) and not Path(s).exists():
        return s
    return Path(s).name or s
