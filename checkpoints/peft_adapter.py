"""PEFT LoRA adapter files: the one place that reads, checks, writes and applies them.

An adapter folder holds :data:`CONFIG_NAME` (a PEFT ``LoraConfig``) and
:data:`WEIGHTS_NAME` (``base_model.model.<module>.lora_A/B.weight``), or the
pickled :data:`PICKLE_WEIGHTS_NAME` of older PEFT versions.

* :func:`load_adapter_folder` / :func:`load_adapter_files`: read one through the
  checkpoint reader (:class:`checkpoints.tensors.CheckpointReader`: checked
  safetensors headers, pickles only ``weights_only``), every file inside its
  folder (:func:`checkpoints.containment.member_path`), refusing anything that
  is not plain LoRA with one :class:`WeightsmithError` line;
* :func:`check_fits`: every factor against a base checkpoint's stored shapes
  (headers only), through the architecture map (GPT-2's Conv1D, gpt2's dropped
  ``transformer.`` prefix, tied heads);
* :func:`unit_scale_config` and :func:`write_adapter`: factors whose ``B @ A``
  is ΔW itself, written atomically (:func:`checkpoints.staging.staged_folder`)
  with PEFT's own ``LoraConfig.save_pretrained``;
* :func:`attach_adapters` and :func:`base_plus_adapter`: adapters on a
  transformers model through PEFT (``get_peft_model`` +
  ``set_peft_model_state_dict``), for mixing, the playground and evaluation.

Where the adapter comes from (a Hub id, uploads, a demo name) is the caller's
business: this module takes folders and files.

Example::

    adapter = load_adapter_folder(Path("assets/adapters/caps"))
    check_fits(adapter, resolve("demo"))
    model = base_plus_adapter(resolve("demo"), Path("assets/adapters/caps"))
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from .arch import ArchSpec
from .containment import member_path
from .demo import DEMO_NAME
from .errors import WeightsmithError
from .finite import all_finite
from .staging import staged_folder
from .tensors import CheckpointReader, parse_json_object

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
# What an adapter repo on the Hub must provide; no pickles, no code.
HUB_ADAPTER_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME, "README.md"]
PEFT_PREFIX = "base_model.model."  # PEFT's saved keys: the PeftModel's path to the base model's modules
BASE_MODEL_KEY = "base_model_name_or_path"

# Keys of a saved config that describe training or other PEFT methods; attaching factors by exact
# module name needs none of them, and some (layers_pattern, exclude_modules) would fight the exact names.
_ATTACH_DROPS = ("peft_type", "auto_mapping", "peft_version", "revision", "task_type", "megatron_config",
                 "loftq_config", "eva_config", "corda_config", "lora_ga_config", "layers_to_transform",
                 "layers_pattern", "exclude_modules", "modules_to_save", "trainable_token_indices",
                 "layer_replication", "target_parameters", "arrow_config", "runtime_config")


class BaseCheckpoint(Protocol):
    """What this module needs of a base model (:class:`checkpoints.sources.LocalCheckpoint` has it).

    A protocol rather than an import: ``sources`` uses this module to tell adapters from models.
    """

    name: str

    @property
    def spec(self) -> ArchSpec: ...

    def reader(self) -> CheckpointReader: ...

    def tied_names(self) -> list[str]: ...

    def load_model(self, *, device: str | torch.device = ...) -> Any: ...


_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def is_adapter_folder(folder: Path) -> bool:
    """True when ``folder`` holds a PEFT adapter config (it is an adapter, not a model)."""
    return (Path(folder) / CONFIG_NAME).exists()


def tensor_key(module: str, which: str) -> str:
    """The saved name of ``module``'s ``lora_A`` / ``lora_B`` factor (``which`` is ``"A"`` or ``"B"``).

    Written here rather than by ``get_peft_model_state_dict``: that needs a PeftModel with the
    layers attached, and the writers (mix, extraction, ROME's export) hold factors, not a model.
    The names are PEFT's saved format, which ``set_peft_model_state_dict`` and
    ``PeftModel.from_pretrained`` read (the tests load what we write with both).
    """
    return f"{PEFT_PREFIX}{module}.lora_{which}.weight"


def _parse_key(name: str, key: str) -> tuple[str, str]:
    """``base_model.model.X.lora_A.weight`` -> (``X``, ``"A"``); anything else is refused clearly."""
    m = _KEY.match(key)
    if m:
        return m.group(1), m.group(2)
    if "lora_embedding" in key:
        what = "LoRA on embeddings"
    elif "lora_magnitude_vector" in key:
        what = "DoRA magnitude vectors"
    elif "modules_to_save" in key or "lora_" not in key:
        what = f"fully saved module weights ({key})"
    else:
        what = f"tensor {key}"
    raise WeightsmithError(f"adapter {name}: {what} cannot be mixed; only plain LoRA A/B factors are supported")


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read into memory.

    ``name`` is public (Hub id or folder name, never a path); ``config`` is the
    parsed ``adapter_config.json``; ``factors`` maps a module path of the base
    model (``model.layers.0.self_attn.q_proj``) to its ``(A [r, in], B [out, r])``.
    """

    name: str
    config: dict[str, Any]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def base_model(self) -> str | None:
        return self.config.get(BASE_MODEL_KEY) or None

    @property
    def rank(self) -> int:
        """Largest rank over modules (what PEFT allocates)."""
        return max(a.shape[0] for a, _ in self.factors.values())

    def scaling(self, module: str) -> float:
        """lora_alpha / r (or / √r with rsLoRA) for ``module``, honouring rank/alpha patterns.

        PEFT computes this inside each LoraLayer only; we need it without building a model
        (ΔW checks, LiNeS' auto α, GGUF export), so it follows PEFT's rule with PEFT's own
        pattern matcher (``get_pattern_key``) and is tested against ``get_delta_weight``.
        """
        from peft.utils.other import get_pattern_key

        cfg = self.config
        r = cfg.get("r", 8)
        alpha = cfg.get("lora_alpha", r)
        if cfg.get("rank_pattern"):
            r = cfg["rank_pattern"].get(get_pattern_key(cfg["rank_pattern"].keys(), module), r)
        if cfg.get("alpha_pattern"):
            alpha = cfg["alpha_pattern"].get(get_pattern_key(cfg["alpha_pattern"].keys(), module), alpha)
        return alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r

    def delta(self, module: str) -> torch.Tensor:
        """ΔW of ``module`` in ``[out, in]`` layout: scaling · B @ A."""
        a, b = self.factors[module]
        return self.scaling(module) * (b @ a)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The factors under PEFT's saved names (what ``set_peft_model_state_dict`` takes)."""
        out = {}
        for module, (a, b) in self.factors.items():
            out[tensor_key(module, "A")], out[tensor_key(module, "B")] = a, b
        return out


# ---------------------------------------------------------------------------
# Reading and checking
# ---------------------------------------------------------------------------


def read_config(path: Path, name: str) -> dict[str, Any]:
    """Parse ``adapter_config.json`` and refuse what is not a plain LoRA, in one line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise WeightsmithError(f"adapter {name}: cannot read {CONFIG_NAME} ({e.strerror or type(e).__name__})") from None
    config = parse_json_object(raw, f"adapter {name}: {CONFIG_NAME}")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise WeightsmithError(f"adapter {name}: peft_type is {config.get('peft_type')!r}; only LORA adapters mix")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise WeightsmithError(f"adapter {name}: {CONFIG_NAME} gives {key} = {value!r}; expected a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise WeightsmithError(f"adapter {name}: {CONFIG_NAME} gives {key} that is not a mapping")
    if config.get("use_dora"):
        raise WeightsmithError(f"adapter {name}: DoRA adapters cannot be mixed (use_dora is true)")
    if config.get("modules_to_save"):
        saved = config["modules_to_save"]
        listed = ", ".join(map(str, saved)) if isinstance(saved, (list, tuple)) else str(saved)
        raise WeightsmithError(f"adapter {name}: it also saves full modules ({listed}), which cannot be mixed")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise WeightsmithError(f"adapter {name}: LoRA biases (bias={config.get('bias')!r}) cannot be mixed")
    return config


def factors_from_state(name: str, state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> ``(A [r, in], B [out, r])`` in float32 on the CPU, from tensors under PEFT's saved names.

    Every tensor must be a finite floating-point LoRA factor, and each module needs
    both factors, chaining; anything else is one :class:`WeightsmithError` line.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, which = _parse_key(name, key)
        if not tensor.is_floating_point():
            raise WeightsmithError(f"adapter {name}: tensor {key} is {tensor.dtype}, not floating point")
        tensor = tensor.detach().to("cpu", torch.float32)
        if not all_finite(tensor):
            # A NaN/Inf factor would make every mixed ΔW of that module NaN/Inf, silently.
            raise WeightsmithError(f"adapter {name}: tensor {key} holds NaN or Inf values")
        if which in parts.setdefault(module, {}):
            raise WeightsmithError(f"adapter {name}: {module} has lora_{which} twice")
        parts[module][which] = tensor
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise WeightsmithError(f"adapter {name}: {module} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise WeightsmithError(
                f"adapter {name}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, which do not chain"
            )
        factors[module] = (a, b)
    return factors


def load_adapter_files(name: str, config_path: Path, weights_path: Path) -> LoraAdapter:
    """Read the adapter in ``config_path`` + ``weights_path`` as float32 factors.

    Raises :class:`WeightsmithError` for anything that is not a plain LoRA
    (other PEFT types, DoRA, embedding LoRA, saved full modules, biases), a
    corrupt file, NaN/Inf factors, or factors that do not chain (``A [r, in]``,
    ``B [out, r]``).
    """
    config = read_config(config_path, name)
    reader = (CheckpointReader.from_files([weights_path]) if weights_path.suffix == ".safetensors"
              else CheckpointReader.from_pickle(weights_path))
    factors = factors_from_state(name, {key: reader.get(key, dtype=None) for key in reader.keys()})
    if not factors:
        raise WeightsmithError(f"adapter {name}: {weights_path.name} holds no LoRA weights")
    return LoraAdapter(name, config, factors)


def adapter_files(folder: Path, name: str) -> tuple[Path, Path]:
    """(config, weights) of the adapter in ``folder``, both inside it once symlinks are followed."""
    config = member_path(folder, CONFIG_NAME, owner=name)
    if not config.is_file():
        hint = " (it is a full model: use it as a model, not an adapter)" if (folder / "config.json").exists() else ""
        raise WeightsmithError(f"{name}: no {CONFIG_NAME}: not a PEFT adapter{hint}")
    for weights in (member_path(folder, WEIGHTS_NAME, owner=name), member_path(folder, PICKLE_WEIGHTS_NAME, owner=name)):
        if weights.is_file():
            return config, weights
    raise WeightsmithError(f"{name}: no {WEIGHTS_NAME} next to {CONFIG_NAME}")


def load_adapter_folder(folder: Path, *, name: str | None = None) -> LoraAdapter:
    """Read the adapter in ``folder`` (see :func:`load_adapter_files`); ``name`` defaults to the folder's."""
    folder = Path(folder)
    name = name or folder.resolve().name
    return load_adapter_files(name, *adapter_files(folder, name))


def base_reference(config: Mapping[str, Any]) -> str:
    """The base model an adapter config names, as a reference the resolver accepts.

    ``demo`` when it names the demo model, or nothing (the bundled adapters and
    ROME's exports of the demo model say ``base_model_name_or_path: null`` or the demo's Hub id).
    """
    declared = config.get(BASE_MODEL_KEY)
    return "demo" if declared in (None, "", DEMO_NAME) else str(declared)


def declared_base(folder: Path) -> str:
    """:func:`base_reference` of the adapter in ``folder``, its config read like every adapter config."""
    name = Path(folder).resolve().name
    config = parse_json_object(member_path(folder, CONFIG_NAME, owner=name).read_bytes(),
                               f"adapter {name}: {CONFIG_NAME}")
    return base_reference(config)


def check_fits(adapters: Sequence[LoraAdapter], base: BaseCheckpoint) -> None:
    """Raise one clear :class:`WeightsmithError` unless every factor fits ``base``'s stored weights.

    Reads safetensors headers only. A targeted module must exist, must not be a
    head tied to the embeddings, and its weight (``[out, in]`` through the
    architecture map) must match ``A [r, in]`` and ``B [out, r]``.
    """
    spec = base.spec
    metas = base.reader().metas()
    tied = set(base.tied_names())
    for ad in adapters:
        for module, (a, b) in ad.factors.items():
            tname = spec.weight_name(module, metas)
            if tname is None:
                raise WeightsmithError(f"adapter {ad.name} targets {module}, which the base {base.name} does not have")
            if tname in tied or f"{module}.weight" in tied:
                raise WeightsmithError(f"adapter {ad.name} targets {module}, which is tied to the embeddings")
            shape = metas[tname].shape
            if len(shape) != 2:
                raise WeightsmithError(f"adapter {ad.name} targets {module}, whose weight is not a matrix")
            out_f, in_f = (shape[1], shape[0]) if spec.module_transposed(module) else shape
            if a.shape[1] != in_f or b.shape[0] != out_f:
                raise WeightsmithError(
                    f"adapter {ad.name} does not fit base {base.name}: {module} has lora_A {list(a.shape)} and "
                    f"lora_B {list(b.shape)} but the base weight is [out={out_f}, in={in_f}]"
                )


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def compact_targets(modules: Sequence[str], all_modules: Sequence[str]) -> list[str]:
    """Leaf names (``q_proj``) when they select exactly ``modules`` in the model, else the full paths."""
    chosen = set(modules)
    leaves = {m.rsplit(".", 1)[-1] for m in chosen}
    selected = {m for m in all_modules if m.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if selected == chosen else sorted(chosen)


def unit_scale_config(ranks: Mapping[str, int], *, base_model: str, spec: ArchSpec,
                      target_modules: Sequence[str] | None = None):
    """A ``LoraConfig`` under which PEFT's ΔW of each module is exactly ``B @ A`` (scaling 1).

    ``ranks`` maps each module to its rank. ``lora_alpha`` equals the rank of
    every module; when ranks differ, ``rank_pattern`` / ``alpha_pattern`` give
    each module its own (full module paths: PEFT matches a key ``k`` as the regex
    ``(.*\\.)?k$``, and a path of word characters and dots matches only itself
    among one model's modules). ``target_modules`` defaults to the full paths.
    """
    from peft import LoraConfig

    if not ranks:
        raise WeightsmithError("an adapter needs at least one module")
    r = max(ranks.values())
    patterns = dict(sorted(ranks.items())) if len(set(ranks.values())) > 1 else {}
    return LoraConfig(r=r, lora_alpha=r, rank_pattern=patterns, alpha_pattern=dict(patterns),
                      target_modules=list(target_modules) if target_modules is not None else sorted(ranks),
                      fan_in_fan_out=spec.transposed, lora_dropout=0.0, bias="none", use_rslora=False,
                      task_type="CAUSAL_LM", base_model_name_or_path=base_model, init_lora_weights=True,
                      inference_mode=True)


def write_adapter(out_dir: Path, config, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                  extra: Callable[[Path], None] | None = None, overwrite: bool = False) -> Path:
    """Write a PEFT adapter folder completely or not at all; returns ``out_dir``.

    ``config``: a ``LoraConfig`` (saved with PEFT's ``save_pretrained``);
    ``factors``: module -> ``(A [r, in], B [out, r])``, saved as float32 under
    PEFT's names; ``extra(folder)`` adds files (a card, a log) to the staging
    folder before it is renamed into place.
    """
    from safetensors.torch import save_file

    state = {}
    for module, (a, b) in factors.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise WeightsmithError(f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not chain")
        state[tensor_key(module, "A")] = a.detach().to("cpu", torch.float32).contiguous()
        state[tensor_key(module, "B")] = b.detach().to("cpu", torch.float32).contiguous()
    with staged_folder(Path(out_dir), overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if extra is not None:
            extra(tmp)
    log.info("wrote adapter (%d modules) to %s", len(factors), out_dir)
    return Path(out_dir)


# ---------------------------------------------------------------------------
# Applying to a model
# ---------------------------------------------------------------------------


def lora_config(adapter: LoraAdapter, spec: ArchSpec):
    """A ``LoraConfig`` for attaching ``adapter`` to a model: its own config, targeting its exact modules."""
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    kwargs = {k: v for k, v in adapter.config.items() if k in known and k not in _ATTACH_DROPS}
    # The adapter's own module list, as a set: PEFT's mixer needs one target type
    # (all sets), and the exact names make layers_to_transform moot.
    kwargs.update(target_modules=set(adapter.factors), init_lora_weights=True, inference_mode=True,
                  lora_dropout=0.0, fan_in_fan_out=spec.transposed)
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise WeightsmithError(f"adapter {adapter.name}: invalid {CONFIG_NAME} ({str(e).splitlines()[0]})") from None


def attach_adapters(model, adapters: Sequence[LoraAdapter], spec: ArchSpec) -> tuple[Any, list[str]]:
    """Wrap ``model`` in a PeftModel holding ``adapters`` as ``a0, a1, ...``; returns (peft_model, names).

    The factors go in through PEFT's ``set_peft_model_state_dict``; each shape is
    checked first, so a config whose rank disagrees with the stored factors is one line.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = None
    for name, ad in zip(names, adapters):
        cfg = lora_config(ad, spec)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        for module, (a, b) in ad.factors.items():
            layer = peft_model.base_model.model.get_submodule(module)
            if layer.lora_A[name].weight.shape != a.shape or layer.lora_B[name].weight.shape != b.shape:
                raise WeightsmithError(f"adapter {ad.name}: {module} stores rank {a.shape[0]} but its config "
                                       f"gives rank {layer.lora_A[name].weight.shape[0]}")
        result = set_peft_model_state_dict(peft_model, ad.state_dict(), adapter_name=name)
        unused = [k for k in result.unexpected_keys if "lora_" in k]
        if unused:
            raise WeightsmithError(f"adapter {ad.name}: PEFT did not place {unused[0]}")
    return peft_model, names


def base_plus_adapter(base: BaseCheckpoint, adapter_dir: Path, *, device: str | torch.device = "cpu",
                      merge: bool = True):
    """``base`` with the adapter in ``adapter_dir`` applied: a transformers model in eval mode.

    The adapter is read and checked against the base like every adapter here
    (:func:`load_adapter_folder`, :func:`check_fits`) before the base is loaded;
    PEFT then attaches it, and with ``merge`` (the default) folds ΔW into the
    weights (``merge_and_unload``) so generation runs at the base's speed.
    """
    # Not PeftModel.from_pretrained: it would read the folder again with its own loader (and a
    # .bin with torch.load); this way the only bytes applied are those our checked reader returned.
    # The tests check that from_pretrained(local_files_only=True) gives the same outputs.
    adapter = load_adapter_folder(Path(adapter_dir))
    check_fits([adapter], base)
    model = base.load_model(device=device)
    peft_model, _ = attach_adapters(model, [adapter], base.spec)
    model = peft_model.merge_and_unload() if merge else peft_model
    return model.eval()
