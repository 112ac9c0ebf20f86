"""LoRA adapters: load, check against a base, mix with weights, scale by depth, write.

The mixing itself is PEFT's: adapters are attached to a PEFT model of the base
and combined with ``LoraModel.add_weighted_adapter`` (which calls
``peft.utils.merge_utils``); this module adds loading from folders, uploads and
the Hub, the same-base checks, LiNeS depth scaling of the mixed ΔW, and the
outputs (a PEFT adapter folder, or a full model streamed through
:class:`checkpoints.tensors.ShardedWriter`), each with a model card.

The base model is never read for a mix: PEFT only needs the module tree, so it
gets a skeleton built from the base's config with uninitialised storage
(``to_empty``), which costs address space, not memory. Only
``merge_into_base`` streams the base weights, one tensor at a time.

Example::

    recipe = AdapterMixRecipe.from_yaml(Path("assets/recipes/mix-caps-pirate.yml"))
    result = mix_adapters(recipe, Path("out/caps-pirate"))
    result.out_dir, result.rank, result.exact_in_delta_w

Which methods are exact in ΔW space (see :data:`ADAPTER_METHODS`): ``cat``
gives ΔW = Σ wᵢ·ΔWᵢ exactly; ``svd`` is that sum truncated to a rank. The
other methods combine the A and B factors separately (with weights
√|wᵢ·scalingᵢ|), so with two or more adapters the result contains cross terms
Bᵢ·Aⱼ and is not the weighted sum of the ΔW. The ``*_svd`` variants apply
their rule to the full ΔWᵢ and then truncate.
"""

from __future__ import annotations

import json
import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import yaml

from checkpoints.arch import ArchSpec
from checkpoints.cards import CardInfo, write_card
from checkpoints.errors import WeightsmithError
from checkpoints.finite import all_finite
from checkpoints.model_cache import building_models
from checkpoints.staging import staged_folder
from checkpoints.sources import LocalCheckpoint, public_name, resolve
from checkpoints.tensors import ShardedWriter, load_pickle_state_dict, read_safetensors_header
from checkpoints.textfiles import load_yaml, read_text
from merging.adapter_files import (  # noqa: F401 - re-exported: merging.adapters is where users look
    CONFIG_NAME,
    HUB_ADAPTER_PATTERNS,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    demo_adapters,
    find_adapter_files,
)
from merging.lines import LinesConfig, auto_alpha, lines_scale
from merging.numbers import finite_float

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
MIX_NAME = "weightsmith_mix"

Progress = Callable[..., Any]  # called as progress(fraction, desc); gr.Progress fits
Cancel = Callable[[], bool]

# ---------------------------------------------------------------------------
# Method registry (data the app shows)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterMethod:
    """One way of combining adapters, as PEFT's ``add_weighted_adapter`` implements it.

    ``exact_in_delta_w``: the mixed ΔW equals Σ wᵢ·ΔWᵢ (for ``svd``: up to the
    rank truncation). ``space``: ``"delta_w"`` when the rule acts on the full
    ΔWᵢ = scalingᵢ·BᵢAᵢ, ``"factors"`` when it acts on A and B separately.
    ``parameters`` maps each recipe parameter the method uses to its default.
    """

    name: str
    label: str
    exact_in_delta_w: bool
    space: str
    rank: str
    parameters: Mapping[str, Any]
    description: str


_DENSITY = {"density": 0.5}
_SIGN = {"majority_sign_method": "total"}
_SEED = {"seed": 0}
_RANK = {"rank": None}  # None: the largest input rank (PEFT's default)

ADAPTER_METHODS: dict[str, AdapterMethod] = {
    m.name: m
    for m in (
        AdapterMethod("cat", "Concatenate (exact)", True, "delta_w", "sum of input ranks", {},
                      "Stacks the weighted A factors and the B factors: ΔW = Σ wᵢ·ΔWᵢ exactly."),
        AdapterMethod("svd", "SVD of the exact sum", True, "delta_w", "chosen rank (default: largest input rank)",
                      dict(_RANK), "Σ wᵢ·ΔWᵢ, truncated to the chosen rank by SVD: exact up to truncation."),
        AdapterMethod("linear", "Linear on A and B (approximate)", False, "factors", "input rank (all equal)", {},
                      "Weighted sums of the A factors and of the B factors; the product has cross terms BᵢAⱼ, "
                      "so it is not Σ wᵢ·ΔWᵢ. Needs equal ranks."),
        AdapterMethod("ties", "TIES on A and B", False, "factors", "input rank (all equal)",
                      {**_DENSITY, **_SIGN}, "TIES (trim, elect sign, disjoint merge) on the A and B factors."),
        AdapterMethod("dare_linear", "DARE + linear on A and B", False, "factors", "input rank (all equal)",
                      {**_DENSITY, **_SEED}, "Random drop and rescale, then weighted sum, on the A and B factors."),
        AdapterMethod("dare_ties", "DARE + TIES on A and B", False, "factors", "input rank (all equal)",
                      {**_DENSITY, **_SIGN, **_SEED}, "Random drop and rescale, then TIES, on the A and B factors."),
        AdapterMethod("magnitude_prune", "Magnitude prune on A and B", False, "factors", "input rank (all equal)",
                      dict(_DENSITY), "Keep the largest entries, then weighted sum, on the A and B factors."),
        AdapterMethod("ties_svd", "TIES on ΔW, then SVD", False, "delta_w",
                      "chosen rank (default: largest input rank)", {**_DENSITY, **_SIGN, **_RANK},
                      "TIES on the full ΔWᵢ, truncated to the chosen rank."),
        AdapterMethod("dare_linear_svd", "DARE + linear on ΔW, then SVD", False, "delta_w",
                      "chosen rank (default: largest input rank)", {**_DENSITY, **_SEED, **_RANK},
                      "DARE then weighted sum on the full ΔWᵢ, truncated to the chosen rank."),
        AdapterMethod("dare_ties_svd", "DARE + TIES on ΔW, then SVD", False, "delta_w",
                      "chosen rank (default: largest input rank)", {**_DENSITY, **_SIGN, **_SEED, **_RANK},
                      "DARE then TIES on the full ΔWᵢ, truncated to the chosen rank."),
        AdapterMethod("magnitude_prune_svd", "Magnitude prune on ΔW, then SVD", False, "delta_w",
                      "chosen rank (default: largest input rank)", {**_DENSITY, **_RANK},
                      "Magnitude pruning then weighted sum on the full ΔWᵢ, truncated to the chosen rank."),
    )
}


def lines_lambda(block: int | None, num_layers: int, alpha: float, beta: float) -> float:
    """LiNeS scale of block ``block`` of ``num_layers``: α + β·ℓ/(L−1); α outside the blocks.

    The merge engine's schedule (:func:`merging.lines.lines_scale`), so merges and mixes agree.
    """
    return lines_scale(block, num_layers, alpha, beta)


# ---------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------


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
        return self.config.get("base_model_name_or_path") or None

    @property
    def rank(self) -> int:
        """Largest rank over modules (what PEFT allocates)."""
        return max(a.shape[0] for a, _ in self.factors.values())

    def scaling(self, module: str) -> float:
        """lora_alpha / r (or / √r with rsLoRA) for ``module``, honouring rank/alpha patterns."""
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


def _parse_key(name: str, key: str) -> tuple[str, str]:
    """``base_model.model.X.lora_A.weight`` -> (``X``, ``"A"``); anything else is refused clearly."""
    m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight$", key)
    if m:
        return m.group(1), m.group(2)
    if "lora_embedding" in key:
        what = "LoRA on embeddings"
    elif "lora_magnitude_vector" in key:
        what = "DoRA magnitude vectors"
    elif "modules_to_save" in key or not ("lora_" in key):
        what = f"fully saved module weights ({key})"
    else:
        what = f"tensor {key}"
    raise WeightsmithError(f"adapter {name}: {what} cannot be mixed; only plain LoRA A/B factors are supported")


def load_adapter(ref: str | Path | Sequence[str | Path], *, allow_local: bool = True,
                 trusted_roots: Sequence[Path] = ()) -> LoraAdapter:
    """Read a PEFT LoRA adapter from a folder, a list of uploaded files, or a Hub id.

    ``allow_local``/``trusted_roots``: the server's policy, as for :func:`checkpoints.sources.resolve`.

    Returns a :class:`LoraAdapter` in float32. Raises :class:`WeightsmithError`
    for anything that is not a plain LoRA (other PEFT types, DoRA, embedding
    LoRA, saved full modules) or a corrupt file.
    """
    name, config_path, weights_path = find_adapter_files(ref, allow_local=allow_local, trusted_roots=trusted_roots)
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not an object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise WeightsmithError(f"adapter {name}: corrupt {config_path.name} ({e})") from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise WeightsmithError(f"adapter {name}: peft_type is {config.get('peft_type')!r}; only LORA adapters mix")
    if config.get("use_dora"):
        raise WeightsmithError(f"adapter {name}: DoRA adapters cannot be mixed (use_dora is true)")
    if config.get("modules_to_save"):
        raise WeightsmithError(
            f"adapter {name}: it also saves full modules ({', '.join(config['modules_to_save'])}), which cannot be mixed"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise WeightsmithError(f"adapter {name}: LoRA biases (bias={config.get('bias')!r}) cannot be mixed")
    if weights_path.suffix == ".safetensors":
        read_safetensors_header(weights_path)  # one clear error for a truncated or corrupt file
        from safetensors.torch import load_file

        state = load_file(str(weights_path))
    else:
        state = load_pickle_state_dict(weights_path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, which = _parse_key(name, key)
        tensor = tensor.to(torch.float32)
        if not all_finite(tensor):
            # A NaN/Inf factor would make every mixed ΔW of that module NaN/Inf, silently.
            raise WeightsmithError(f"adapter {name}: tensor {key} holds NaN or Inf values")
        parts.setdefault(module, {})[which] = tensor
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
    if not factors:
        raise WeightsmithError(f"adapter {name}: {weights_path.name} holds no LoRA weights")
    return LoraAdapter(name, config, factors)


def _base_tensor_name(module: str, names: Iterable[str], spec: ArchSpec) -> str | None:
    """The checkpoint tensor holding ``module``'s weight (checkpoints may drop gpt2's ``transformer.``)."""
    names = set(names)
    for cand in (f"{module}.weight", *(f"{module[len(p):]}.weight" for p in spec.optional_prefixes
                                       if module.startswith(p))):
        if cand in names:
            return cand
    return None


def _same_base_name(a: str, b: str) -> bool:
    """Equal Hub ids, or equal last components (a local copy of a Hub model keeps the repo's name)."""
    a, b = public_name(a).lower(), public_name(b).lower()
    return a == b or a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1]


def check_compatible(adapters: Sequence[LoraAdapter], base: LocalCheckpoint, *, check_names: bool = True) -> None:
    """Raise one clear :class:`WeightsmithError` unless every adapter fits ``base``.

    Checks the adapters' ``base_model_name_or_path`` against the base's name
    (unless ``check_names`` is false) and every A/B shape against the base's
    stored weight shape (from safetensors headers only).
    """
    if not adapters:
        raise WeightsmithError("no adapters to mix")
    spec = base.spec
    metas = base.reader().metas()
    if check_names:
        for ad in adapters:
            if ad.base_model and not _same_base_name(ad.base_model, base.name):
                raise WeightsmithError(
                    f"adapter {ad.name} was trained on {public_name(ad.base_model)!r}, not on the base "
                    f"{base.name!r} (set check_base_name: false to rely on the shape check alone)"
                )
    tied = set(base.tied_names())
    for ad in adapters:
        for module, (a, b) in ad.factors.items():
            tname = _base_tensor_name(module, metas, spec)
            if tname is None:
                raise WeightsmithError(f"adapter {ad.name} targets {module}, which the base {base.name} does not have")
            if tname in tied or f"{module}.weight" in tied:
                raise WeightsmithError(f"adapter {ad.name} targets {module}, which is tied to the embeddings")
            shape = metas[tname].shape
            if len(shape) != 2:
                raise WeightsmithError(f"adapter {ad.name} targets {module}, whose weight is not a matrix")
            out_f, in_f = (shape[1], shape[0]) if _stored_transposed(module, spec) else shape
            if a.shape[1] != in_f or b.shape[0] != out_f:
                raise WeightsmithError(
                    f"adapter {ad.name} does not fit base {base.name}: {module} has lora_A {list(a.shape)} and "
                    f"lora_B {list(b.shape)} but the base weight is [out={out_f}, in={in_f}]"
                )


def _stored_transposed(module: str, spec: ArchSpec) -> bool:
    """True when ``module``'s weight is stored ``[in, out]`` (GPT-2 Conv1D blocks; heads are Linear)."""
    return spec.transposed and spec.locate(f"{module}.weight").kind == "block"


# ---------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------


@dataclass
class AdapterEntry:
    """One adapter of a mix: a reference (folder, Hub id, or uploaded files) and its weight."""

    adapter: str | list[str]
    weight: float = 1.0


_RECIPE_KEYS = {"base_model", "adapters", "method", "parameters", "lines", "merge_into_base", "check_base_name"}


@dataclass
class AdapterMixRecipe:
    """An adapter mix, as written in YAML::

        base_model: demo
        adapters:
          - {adapter: assets/adapters/caps, weight: 0.7}
          - {adapter: assets/adapters/pirate, weight: 0.3}
        method: cat
        parameters: {}
        lines: {alpha: 0.5, beta: 0.5}
        merge_into_base: false
    """

    base_model: str
    adapters: list[AdapterEntry]
    method: str = "cat"
    parameters: dict[str, Any] = field(default_factory=dict)
    lines: LinesConfig | None = None
    merge_into_base: bool = False
    check_base_name: bool = True
    source_dir: Path | None = field(default=None, compare=False, repr=False)  # relative adapter paths

    # -- parsing -----------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source_dir: Path | None = None) -> "AdapterMixRecipe":
        if not isinstance(data, Mapping):
            raise WeightsmithError("adapter mix recipe: expected a mapping at the top level")
        unknown = set(data) - _RECIPE_KEYS
        if unknown:
            raise WeightsmithError(f"adapter mix recipe: unknown key(s) {', '.join(sorted(unknown))}")
        if not data.get("base_model"):
            raise WeightsmithError("adapter mix recipe: base_model is missing")
        entries = []
        raw = data.get("adapters") or []
        if not isinstance(raw, list) or not raw:
            raise WeightsmithError("adapter mix recipe: adapters must be a non-empty list")
        for i, item in enumerate(raw):
            if isinstance(item, str):
                item = {"adapter": item}
            if not isinstance(item, Mapping) or "adapter" not in item:
                raise WeightsmithError(f"adapter mix recipe: adapters[{i}] needs an 'adapter' entry")
            extra = set(item) - {"adapter", "weight"}
            if extra:
                raise WeightsmithError(f"adapter mix recipe: adapters[{i}] has unknown key(s) {', '.join(sorted(extra))}")
            raw_weight, what = item.get("weight", 1.0), f"adapter mix recipe: adapters[{i}].weight"
            try:
                weight = finite_float(float(raw_weight), what) if not isinstance(raw_weight, bool) else None
            except (TypeError, ValueError):
                weight = None
            if weight is None:
                raise WeightsmithError(f"{what} must be a number, got {raw_weight!r}")
            entries.append(AdapterEntry(item["adapter"], weight))
        lines = data.get("lines")
        if lines is not None:
            lines = LinesConfig.from_dict(dict(lines) if isinstance(lines, Mapping) else lines)
        params = data.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise WeightsmithError("adapter mix recipe: parameters must be a mapping")
        recipe = cls(str(data["base_model"]), entries, str(data.get("method", "cat")), dict(params), lines,
                     bool(data.get("merge_into_base", False)), bool(data.get("check_base_name", True)),
                     source_dir)
        recipe.validate()
        return recipe

    @classmethod
    def from_yaml(cls, source: str | Path) -> "AdapterMixRecipe":
        """Parse YAML text, or the file at ``source`` (a Path, or a str naming an existing file)."""
        source_dir = None
        if isinstance(source, Path) or ("\n" not in source and Path(source).is_file()):
            path = Path(source)
            text = read_text(path, what="adapter mix recipe")
            source_dir = path.resolve().parent
        else:
            text = source
        return cls.from_dict(load_yaml(text, what="adapter mix recipe") or {}, source_dir=source_dir)

    def validate(self) -> None:
        """Check the method and its parameters (not the files: that happens when mixing)."""
        method = ADAPTER_METHODS.get(self.method)
        if method is None:
            raise WeightsmithError(
                f"adapter mix recipe: unknown method {self.method!r}; choose one of {', '.join(ADAPTER_METHODS)}"
            )
        unused = set(self.parameters) - set(method.parameters)
        if unused:
            takes = ", ".join(method.parameters) or "no parameters"
            raise WeightsmithError(
                f"adapter mix recipe: method {self.method} does not use {', '.join(sorted(unused))} (it takes {takes})"
            )
        p = self.resolved_parameters()
        if "density" in p and not (isinstance(p["density"], (int, float)) and not isinstance(p["density"], bool)
                                   and 0.0 < float(p["density"]) <= 1.0):
            raise WeightsmithError(f"adapter mix recipe: density must be in (0, 1], got {p['density']!r}")
        if p.get("rank") is not None and not (isinstance(p["rank"], int) and p["rank"] >= 1):
            raise WeightsmithError(f"adapter mix recipe: rank must be a positive integer, got {p['rank']!r}")
        if "majority_sign_method" in p and p["majority_sign_method"] not in ("total", "frequency"):
            raise WeightsmithError("adapter mix recipe: majority_sign_method must be 'total' or 'frequency'")
        if "seed" in p and not isinstance(p["seed"], int):
            raise WeightsmithError(f"adapter mix recipe: seed must be an integer, got {p['seed']!r}")

    def resolved_parameters(self) -> dict[str, Any]:
        """The method's defaults overridden by the recipe's parameters."""
        return {**ADAPTER_METHODS[self.method].parameters, **self.parameters} if self.method in ADAPTER_METHODS \
            else dict(self.parameters)

    # -- writing -------------------------------------------------------------
    def to_dict(self, *, public: bool = False) -> dict[str, Any]:
        """Plain data; ``public=True`` replaces local paths by public names (for cards)."""
        def ref(r: str | list[str]) -> str | list[str]:
            if not public:
                return r
            return public_name(r if isinstance(r, str) else str(Path(r[0]).parent))

        data: dict[str, Any] = {
            "base_model": public_name(self.base_model) if public else self.base_model,
            "adapters": [{"adapter": ref(self.adapter_ref(e) if public else e.adapter), "weight": e.weight}
                         for e in self.adapters],
            "method": self.method,
        }
        if self.parameters:
            data["parameters"] = dict(self.parameters)
        if self.lines is not None:
            data["lines"] = self.lines.to_dict()
        data["merge_into_base"] = self.merge_into_base
        if not self.check_base_name:
            data["check_base_name"] = False
        return data

    def to_yaml(self, *, public: bool = False) -> str:
        return yaml.safe_dump(self.to_dict(public=public), sort_keys=False, allow_unicode=True)

    def adapter_ref(self, entry: AdapterEntry) -> str | list[str]:
        """The entry's reference; a relative path missing here is looked up from the recipe's folder upwards.

        So ``assets/adapters/caps`` in ``assets/recipes/x.yml`` works from any working directory.
        """
        ref = entry.adapter
        if isinstance(ref, str) and self.source_dir is not None and not Path(ref).expanduser().is_absolute():
            if not Path(ref).exists():
                for folder in (self.source_dir, *list(self.source_dir.parents)[:3]):
                    if (folder / ref).exists():
                        return str(folder / ref)
        return ref


# ---------------------------------------------------------------------------
# Mixing
# ---------------------------------------------------------------------------


@dataclass
class MixResult:
    """What :func:`mix_adapters` wrote.

    ``kind`` is ``"adapter"`` or ``"model"``; ``rank`` the mixed adapter's r;
    ``modules`` how many modules it targets; ``block_scales`` the LiNeS λ per
    block (empty without LiNeS); ``notes`` anything the user should know
    (e.g. PEFT's single-adapter rule).
    """

    out_dir: Path
    kind: str
    method: str
    exact_in_delta_w: bool
    rank: int
    modules: int
    adapters: list[str]
    weights: list[float]
    block_scales: dict[int, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    lines_alpha: float | None = None  # the α used (resolved when the recipe says "auto")


@contextmanager
def few_threads(device: str | torch.device = "cpu", threads: int = 1) -> Iterator[None]:
    """Run CPU LAPACK (SVD) on ``threads`` threads, then restore the process setting.

    An SVD of adapter-sized matrices gains nothing from threads and loses a lot
    when the cores are shared: measured here, a 576×576 float32 SVD takes 0.17 s
    on one thread and 1–18 s on two while other processes load the CPU.
    """
    old = torch.get_num_threads()
    if torch.device(device).type != "cpu" or old <= threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_cancel(cancel: Cancel | Any | None) -> None:
    if cancel is None:
        return
    stop = cancel.is_set() if hasattr(cancel, "is_set") else cancel()
    if stop:
        raise WeightsmithError("cancelled")


def _report(progress: Progress | None, fraction: float, desc: str) -> None:
    log.debug("%s", desc)
    if progress is not None:
        progress(fraction, desc)


def skeleton_model(base: LocalCheckpoint, device: str | torch.device = "cpu"):
    """The base's module tree with uninitialised float32 storage (weights are never read).

    PEFT needs only the modules to attach LoRA layers and combine them.
    ``to_empty`` reserves the storage without touching it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(base.support_dir), trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError/OSError/KeyError for unknown configs
        raise WeightsmithError(f"{base.name}: cannot read its config ({str(e).splitlines()[0] if str(e) else e})") from None
    # transformers patches process-wide state while it builds a model: one build at a time (see model_cache).
    with building_models(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to_empty(device=device).eval()


def _peft_config(adapter: LoraAdapter, spec: ArchSpec):
    """A LoraConfig for attaching ``adapter`` to a skeleton: targets its exact modules."""
    import dataclasses

    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    kwargs = {k: v for k, v in adapter.config.items() if k in known}
    for k in ("peft_type", "auto_mapping", "peft_version", "revision", "task_type", "megatron_config",
              "loftq_config", "eva_config", "corda_config", "lora_ga_config", "layers_to_transform",
              "layers_pattern", "exclude_modules", "modules_to_save", "trainable_token_indices",
              "layer_replication", "target_parameters", "arrow_config", "runtime_config"):
        kwargs.pop(k, None)
    # The adapter's own module list, as a set: PEFT's mixer needs one target type
    # (all sets), and the exact names make layers_to_transform moot.
    kwargs.update(target_modules=set(adapter.factors), init_lora_weights=True, inference_mode=True,
                  lora_dropout=0.0, fan_in_fan_out=spec.transposed)
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise WeightsmithError(f"adapter {adapter.name}: invalid adapter_config.json ({e})") from None


def attach_adapters(model, adapters: Sequence[LoraAdapter], spec: ArchSpec) -> tuple[Any, list[str]]:
    """Wrap ``model`` in a PeftModel holding ``adapters`` as ``a0, a1, ...``; returns (peft_model, names)."""
    from peft import get_peft_model

    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = None
    for name, ad in zip(names, adapters):
        cfg = _peft_config(ad, spec)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        with torch.no_grad():
            for module, (a, b) in ad.factors.items():
                layer = peft_model.base_model.model.get_submodule(module)
                la, lb = layer.lora_A[name].weight, layer.lora_B[name].weight
                if la.shape != a.shape or lb.shape != b.shape:
                    raise WeightsmithError(
                        f"adapter {ad.name}: {module} stores rank {a.shape[0]} but its config gives rank {la.shape[0]}"
                    )
                la.copy_(a)
                lb.copy_(b)
    return peft_model, names


def _layer_factors(peft_model, adapter_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module -> (A, B, scaling) of one adapter attached to ``peft_model``."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for module, layer in peft_model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A:
            out[module] = (layer.lora_A[adapter_name].weight.detach().to("cpu", torch.float32).clone(),
                           layer.lora_B[adapter_name].weight.detach().to("cpu", torch.float32).clone(),
                           float(layer.scaling[adapter_name]))
    return out


def compact_targets(modules: Iterable[str], all_modules: Iterable[str]) -> list[str]:
    """Leaf names (``q_proj``) when they select exactly ``modules`` in the model, else the full paths."""
    modules = set(modules)
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    selected = {m for m in all_modules if m.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if selected == modules else sorted(modules)


def mix_adapters(recipe: AdapterMixRecipe, out_dir: Path, *, progress: Progress | None = None,
                 cancel: Cancel | None = None, device: str | torch.device = "cpu",
                 merge_into_base: bool | None = None, overwrite: bool = False, allow_local: bool = True,
                 trusted_roots: Sequence[Path] = ()) -> MixResult:
    """Mix the recipe's adapters and write the result to ``out_dir``.

    Args:
        recipe: what to mix (see :class:`AdapterMixRecipe`).
        out_dir: output folder; written in a temp folder beside it, then renamed.
        progress: optional ``progress(fraction, desc)`` callback (``gr.Progress`` fits).
        cancel: optional callable (or ``threading.Event``); when true the run stops
            with ``WeightsmithError("cancelled")`` and nothing is written.
        device: where the PEFT mix runs.
        merge_into_base: overrides ``recipe.merge_into_base``.
        overwrite: replace an existing ``out_dir``.
        allow_local, trusted_roots: the server's policy for the base and the adapters (see
            :func:`checkpoints.sources.resolve`): with ``allow_local=False`` only ``demo``, Hub ids and
            paths inside ``trusted_roots`` are read.

    Returns a :class:`MixResult`. The adapter output loads with
    ``PeftModel.from_pretrained(base, out_dir)``; the model output loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)``.
    """
    t0 = time.time()
    recipe.validate()
    out_dir = Path(out_dir)
    merge = recipe.merge_into_base if merge_into_base is None else merge_into_base
    if out_dir.exists() and not overwrite:
        raise WeightsmithError(f"{out_dir} already exists (choose another folder)")
    method = ADAPTER_METHODS[recipe.method]
    params = recipe.resolved_parameters()
    notes: list[str] = []

    _report(progress, 0.0, f"resolving base {public_name(recipe.base_model)}")
    base = resolve(recipe.base_model, allow_local=allow_local, trusted_roots=trusted_roots)
    spec = base.spec
    adapters = []
    for i, entry in enumerate(recipe.adapters):
        _check_cancel(cancel)
        _report(progress, 0.05 + 0.15 * i / len(recipe.adapters), f"loading adapter {i + 1}/{len(recipe.adapters)}")
        adapters.append(load_adapter(recipe.adapter_ref(entry), allow_local=allow_local, trusted_roots=trusted_roots))
    check_compatible(adapters, base, check_names=recipe.check_base_name)
    weights = [e.weight for e in recipe.adapters]
    ranks = [a.rank for a in adapters]
    if method.space == "factors" and len(adapters) > 1 and len(set(ranks)) > 1:
        raise WeightsmithError(
            f"method {method.name} needs adapters of equal rank, got ranks {ranks}: use cat or svd instead"
        )
    svd_rank = params.get("rank")
    if method.name.endswith("svd") and svd_rank is not None:
        metas = base.reader().metas()
        limit = min(min(metas[_base_tensor_name(m, metas, spec)].shape) for a in adapters for m in a.factors)
        if svd_rank > limit:
            raise WeightsmithError(f"rank {svd_rank} is larger than the smallest targeted weight dimension ({limit})")

    _check_cancel(cancel)
    _report(progress, 0.25, f"mixing {len(adapters)} adapter(s) with {method.name}")
    model = skeleton_model(base, device)
    peft_model, names = attach_adapters(model, adapters, spec)
    mix_names, mix_weights = names, weights
    if len(adapters) == 1:
        if method.name == "svd":
            # PEFT mixes a single adapter "linear" (rank kept); adding it again with
            # weight 0 keeps the sum exact and lets the SVD truncate to the rank.
            mix_names, mix_weights = [names[0], names[0]], [weights[0], 0.0]
        elif method.name not in ("linear", "cat"):  # cat of one adapter is still exact
            notes.append(f"one adapter: PEFT applies 'linear' instead of {method.name!r} (ΔW scaled by the weight)")
    kwargs: dict[str, Any] = {}
    if method.name.endswith("svd"):
        kwargs.update(svd_rank=svd_rank, svd_full_matrices=False)
    if "density" in params:
        kwargs["density"] = float(params["density"])
    if "majority_sign_method" in params:
        kwargs["majority_sign_method"] = params["majority_sign_method"]
    with torch.random.fork_rng(devices=[]), few_threads(device):
        torch.manual_seed(int(params.get("seed", 0)))  # DARE draws from the global generator
        try:
            peft_model.add_weighted_adapter(mix_names, mix_weights, MIX_NAME, combination_type=method.name, **kwargs)
        except (ValueError, RuntimeError) as e:
            raise WeightsmithError(f"PEFT could not mix with {method.name}: {str(e).splitlines()[0]}") from None
    mixed = _layer_factors(peft_model, MIX_NAME)
    mix_cfg = peft_model.peft_config[MIX_NAME]
    all_modules = [n for n, _ in peft_model.base_model.model.named_modules()]
    del peft_model, model

    # Scale B by λ(block). The output config has lora_alpha = r and no rsLoRA,
    # so a loader's scaling is 1 and its ΔW is exactly B @ A.
    num_layers = base.num_layers
    block_scales: dict[int, float] = {}
    state: dict[str, torch.Tensor] = {}
    lines_alpha: float | None = None
    if recipe.lines is not None:
        lines_alpha = recipe.lines.alpha
        if lines_alpha == "auto":
            lines_alpha = _auto_lines_alpha(adapters, mixed)
            notes.append(f"LiNeS alpha auto = {lines_alpha:.4g} (‖Σ ΔWᵢ‖₁ / (T·‖ΔW_mix‖₁), T = {len(adapters)})")
    for module, (a, b, _mix_scaling) in mixed.items():
        factor = 1.0
        if lines_alpha is not None:
            block = spec.locate(f"{module}.weight").block
            factor = lines_lambda(block, num_layers, lines_alpha, recipe.lines.beta)
            if block is not None:
                block_scales[block] = factor
        # PEFT builds the factors so that B @ A is the mixed ΔW (input scalings are
        # already inside). The mix layer's own scaling is ignored on purpose: with
        # rsLoRA copied from the first adapter it would be √r instead of 1.
        b = b * factor
        state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    rank = int(mix_cfg.r)
    result = MixResult(out_dir, "model" if merge else "adapter", method.name, method.exact_in_delta_w, rank,
                       len(mixed), [a.name for a in adapters], weights, dict(sorted(block_scales.items())), notes)
    result.lines_alpha = lines_alpha
    card = _mix_card(recipe, base, adapters, method, rank, merge, notes, out_dir.name, lines_alpha)
    _check_cancel(cancel)
    if merge:
        _report(progress, 0.5, f"merging into {base.name}")
        factors = {m: (state[f"{PEFT_PREFIX}{m}.lora_A.weight"], state[f"{PEFT_PREFIX}{m}.lora_B.weight"])
                   for m in mixed}
        write_merged_model(base, factors, out_dir, card, progress=progress, cancel=cancel, overwrite=overwrite)
    else:
        _report(progress, 0.8, "writing adapter")
        config = _output_config(mix_cfg, base, compact_targets(mixed, all_modules), rank)
        write_adapter_folder(out_dir, config, state, card, overwrite=overwrite)
    result.seconds = time.time() - t0
    _report(progress, 1.0, f"wrote {result.kind} to {out_dir.name} in {result.seconds:.1f} s")
    return result


def _auto_lines_alpha(adapters: Sequence[LoraAdapter], mixed: Mapping[str, tuple]) -> float:
    """LiNeS' multi-task α for an adapter mix, in ΔW space: ‖Σ_t ΔW_t‖₁ / (T·‖ΔW_mix‖₁).

    As in the authors' code the task vectors enter unweighted; the sum runs over all modules.
    """
    total = merged = 0.0
    for module, (a, b, _) in mixed.items():
        tv = None
        for ad in adapters:
            if module in ad.factors:
                d = ad.delta(module)
                tv = d if tv is None else tv + d
        if tv is not None:
            total += float(tv.abs().sum())
        merged += float((b @ a).abs().sum())  # B @ A is the mixed ΔW (see mix_adapters)
    return auto_alpha(total, merged, len(adapters))


def _base_public(base: LocalCheckpoint) -> str:
    return base.hub_id or base.name


def _output_config(mix_cfg, base: LocalCheckpoint, targets: list[str], rank: int) -> dict[str, Any]:
    """adapter_config.json of the mixed adapter: scaling 1, public base name, plain target list."""
    cfg = mix_cfg.to_dict()
    cfg.update(base_model_name_or_path=_base_public(base), r=rank, lora_alpha=rank, use_rslora=False,
               target_modules=targets, rank_pattern={}, alpha_pattern={}, inference_mode=True,
               task_type="CAUSAL_LM", init_lora_weights=True, revision=None)
    return _jsonable(cfg)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (set, tuple, list)):
        items = [_jsonable(v) for v in obj]
        return sorted(items) if isinstance(obj, set) else items
    if hasattr(obj, "value") and not isinstance(obj, (int, float, str, bool)):  # enums (PeftType, TaskType)
        return obj.value
    return obj


def _mix_card(recipe: AdapterMixRecipe, base: LocalCheckpoint, adapters: Sequence[LoraAdapter],
              method: AdapterMethod, rank: int, merge: bool, notes: list[str], title: str,
              lines_alpha: float | None) -> CardInfo:
    rows = ["| adapter | weight |", "|---|---|"] + [f"| {a.name} | {e.weight:g} |"
                                                    for a, e in zip(adapters, recipe.adapters)]
    exact = ("exact in ΔW space: ΔW = Σ wᵢ·ΔWᵢ" + (" truncated to rank " + str(rank) if method.name == "svd" else ""))
    if not method.exact_in_delta_w:
        exact = "not exact in ΔW space: " + method.description
    lines = ""
    if recipe.lines is not None:
        lines = (f" Each block's ΔW is then scaled by LiNeS, λ(ℓ) = {lines_alpha:.4g} + "
                 f"{recipe.lines.beta:g}·ℓ/(L−1).")
    summary = (f"A mix of {len(adapters)} LoRA adapter(s) for {_base_public(base)} with PEFT's "
               f"`{method.name}` ({exact}), rank {rank}.{lines}"
               + (" The mixed ΔW is merged into the base weights." if merge else "")
               + "".join(f"\n\nNote: {n}" for n in notes) + "\n\n" + "\n".join(rows))
    tags = ["lora", "weightsmith"] + (["lines"] if recipe.lines is not None else [])
    return CardInfo(title=title, relation="merge" if merge else "adapter",
                    base_models=[_base_public(base)], summary=summary,
                    library_name="transformers" if merge else "peft", tags=tags,
                    recipe_yaml=recipe.to_yaml(public=True))


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


def write_adapter_folder(out_dir: Path, config: dict[str, Any], state: Mapping[str, torch.Tensor],
                         card: CardInfo | None, *, overwrite: bool = False) -> Path:
    """Write a PEFT adapter folder (config, safetensors, card) in a temp folder beside ``out_dir``, then rename."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with staged_folder(out_dir, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()},
                  str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if card is not None:
            write_card(tmp, card)
    log.info("wrote adapter (%d tensors) to %s", len(state), out_dir)
    return out_dir


def write_merged_model(base: LocalCheckpoint, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                       out_dir: Path, card: CardInfo | None, *, progress: Progress | None = None,
                       cancel: Cancel | None = None, overwrite: bool = False) -> Path:
    """Stream ``base`` tensor by tensor into ``out_dir``, adding B @ A to each targeted module's weight.

    ``factors`` maps module paths to ``(A [r, in], B [out, r])`` with scaling
    already folded in. A Conv1D weight (stored ``[in, out]``) gets the
    transposed ΔW, through the architecture map. Tensors keep their stored dtype;
    the sum is computed in float32.
    """
    reader = base.reader()
    spec = base.spec
    names = reader.keys()
    by_tensor: dict[str, str] = {}
    for module in factors:
        tname = _base_tensor_name(module, names, spec)
        if tname is None:
            raise WeightsmithError(f"{base.name} has no weight for module {module}")
        by_tensor[tname] = module
    with ShardedWriter(out_dir, skip=base.tied_names(), overwrite=overwrite) as writer:
        for i, name in enumerate(names):
            _check_cancel(cancel)
            tensor = reader.get(name, dtype=None)
            module = by_tensor.get(name)
            if module is not None:
                a, b = factors[module]
                delta = b.to(torch.float32) @ a.to(torch.float32)  # [out, in]
                if _stored_transposed(module, spec):
                    delta = spec.from_out_in(delta)
                tensor = (tensor.to(torch.float32) + delta).to(tensor.dtype)
            writer.add(name, tensor)
            if progress is not None and i % 16 == 0:
                progress(0.5 + 0.45 * i / max(len(names), 1), f"writing tensor {i + 1}/{len(names)}")
        writer.copy_support_files(base.support_dir)
        if card is not None:
            write_card(writer.staging, card)
    return Path(out_dir)
