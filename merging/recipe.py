"""Merge recipes: mergekit YAML ⇄ dataclasses, validated with one clear error each.

Accepted keys (mergekit's): ``merge_method``, ``models`` (or ``slices``),
``base_model``, ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``, ``tokenizer``,
``chat_template`` (see :mod:`merging.tokenizer_config`, :mod:`merging.chat_template`);
plus Weightsmith's ``lines: {alpha, beta}`` and ``seed`` (random methods).
mergekit ignores the two extra keys, so a recipe without them runs unchanged
there.

Example::

    recipe = MergeRecipe.from_yaml('''
    merge_method: ties
    base_model: demo
    models:
      - model: ./ft1
        parameters: {weight: 0.5, density: 0.5}
      - model: ./ft2
        parameters: {weight: 0.5, density: 0.5}
    lines: {alpha: auto, beta: 0.5}
    ''')
    recipe.to_yaml()
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from checkpoints.errors import WeightsmithError
from checkpoints.textfiles import load_yaml_file_or_text

from .chat_template import check_chat_template
from .lines import LinesConfig
from .methods import MergeMethod, get_method
from .schedule import is_filter_entry, setting_values
from .recipe_refs import read_model_ref
from .tokenizer_config import TokenizerConfig, check_tokenizer_settings, input_refs

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "lines", "seed")


@dataclass
class ModelEntry:
    """One ``models:`` item: a model reference and its own parameters."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSource:
    """One source of an output slice: blocks ``[start, end)`` of ``model``."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceDef:
    """One output slice: its sources all contribute the same number of blocks."""

    sources: list[SliceSource]
    parameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None


@dataclass
class MergeRecipe:
    """A whole merge recipe. Build with :meth:`from_yaml` / :meth:`from_dict`; check with :meth:`validate`."""

    merge_method: str
    models: list[ModelEntry] = field(default_factory=list)
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    slices: list[SliceDef] = field(default_factory=list)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    lines: LinesConfig | None = None
    seed: int | None = None

    # -- reading -------------------------------------------------------------
    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> "MergeRecipe":
        """Parse YAML text, or the file at a path, and validate it.

        The file is read with :func:`checkpoints.textfiles.read_text` (UTF-8, one line otherwise) and
        parsed with :func:`checkpoints.textfiles.load_yaml` (aliases bounded: no YAML bombs).
        """
        return cls.from_dict(load_yaml_file_or_text(text_or_path, what="recipe"))

    @classmethod
    def from_dict(cls, data: Any) -> "MergeRecipe":
        """Build from a parsed mapping and validate."""
        if not isinstance(data, dict):
            raise WeightsmithError("recipe must be a mapping with at least merge_method and models")
        unknown = [k for k in data if k not in TOP_KEYS]
        if unknown:
            raise WeightsmithError(
                f"recipe: unsupported key(s) {', '.join(map(str, unknown))} (supported: {', '.join(TOP_KEYS)})"
            )
        if "merge_method" not in data:
            raise WeightsmithError("recipe: merge_method is missing")
        models = [_model_entry(m, i) for i, m in enumerate(_as_list(data.get("models"), "models"))]
        slices = [_slice(s, i) for i, s in enumerate(_as_list(data.get("slices"), "slices"))]
        lines = data.get("lines")
        seed = data.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise WeightsmithError(f"recipe: seed must be an integer, got {seed!r}")
        recipe = cls(
            merge_method=str(data["merge_method"]),
            models=models,
            base_model=read_model_ref(data.get("base_model"), "base_model"),
            parameters=_params(data.get("parameters"), "parameters"),
            slices=slices,
            dtype=_opt_str(data.get("dtype")),
            out_dtype=_opt_str(data.get("out_dtype")),
            tokenizer_source=read_model_ref(data.get("tokenizer_source"), "tokenizer_source"),
            tokenizer=TokenizerConfig.from_dict(data["tokenizer"]) if data.get("tokenizer") is not None else None,
            chat_template=data.get("chat_template"),
            lines=LinesConfig.from_dict(lines) if lines is not None else None,
            seed=seed,
        )
        recipe.validate()
        return recipe

    # -- writing -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data in mergekit's layout (keys left out when unset)."""
        out: dict[str, Any] = {}
        if self.models:
            out["models"] = [
                {"model": m.model, **({"parameters": copy.deepcopy(m.parameters)} if m.parameters else {})}
                for m in self.models
            ]
        if self.slices:
            out["slices"] = []
            for s in self.slices:
                item: dict[str, Any] = {"sources": [
                    {"model": src.model, "layer_range": list(src.layer_range),
                     **({"parameters": copy.deepcopy(src.parameters)} if src.parameters else {})}
                    for src in s.sources
                ]}
                if s.parameters:
                    item["parameters"] = copy.deepcopy(s.parameters)
                if s.base_model:
                    item["base_model"] = s.base_model
                out["slices"].append(item)
        out["merge_method"] = self.merge_method
        if self.base_model:
            out["base_model"] = self.base_model
        if self.parameters:
            out["parameters"] = copy.deepcopy(self.parameters)
        for key in ("dtype", "out_dtype", "tokenizer_source"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer.to_dict()
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        if self.lines is not None:
            out["lines"] = self.lines.to_dict()
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    def to_yaml(self) -> str:
        """YAML text that :meth:`from_yaml` reads back to an equal recipe."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, allow_unicode=True)

    def with_models_renamed(self, rename) -> "MergeRecipe":
        """A copy with every model reference passed through ``rename`` (e.g. public names for a card)."""
        r = copy.deepcopy(self)
        r.models = [ModelEntry(rename(m.model), m.parameters) for m in r.models]
        r.slices = [SliceDef([SliceSource(rename(s.model), s.layer_range, s.parameters) for s in sl.sources],
                             sl.parameters, rename(sl.base_model) if sl.base_model else None) for sl in r.slices]
        r.base_model = rename(r.base_model) if r.base_model else None
        if r.tokenizer_source not in (None, "base", "union"):
            r.tokenizer_source = rename(r.tokenizer_source)
        r.tokenizer = r.tokenizer.renamed(rename) if r.tokenizer is not None else None
        return r

    # -- facts ---------------------------------------------------------------
    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    def model_refs(self) -> list[str]:
        """Every referenced model, base first, each once."""
        refs = input_refs(self)
        donor = self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source
        if donor not in (None, "base", "union"):
            refs.append(donor)
        return list(dict.fromkeys(refs))

    def non_base_models(self) -> list[ModelEntry]:
        """The ``models`` entries other than the base (in order)."""
        return [m for m in self.models if m.model != self.base_model]

    def torch_dtype(self, key: str = "dtype") -> torch.dtype | None:
        value = getattr(self, key)
        return None if value is None else DTYPES[value]

    # -- validation ----------------------------------------------------------
    def validate(self) -> None:
        """Raise one clear :class:`WeightsmithError` for the first thing wrong with the recipe."""
        method = get_method(self.merge_method)
        if bool(self.models) == bool(self.slices):
            raise WeightsmithError("recipe: give exactly one of models or slices (with at least one model)")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise WeightsmithError(f"recipe: {key} {value!r} is not one of float32, float16, bfloat16")
        check_tokenizer_settings(self)
        check_chat_template(self.chat_template)
        groups = self._input_groups()
        for label, base, entries in groups:
            others = [e for e in entries if e != base]
            if method.needs_base == "required" and not base:
                raise WeightsmithError(f"recipe: {method.name} needs a base_model")
            if method.needs_base == "none" and base and base not in entries:
                raise WeightsmithError(
                    f"recipe: {method.name} takes no base_model; list {base} under models with a weight instead"
                )
            n = len(others) if method.needs_base != "none" else len(entries)
            if n < method.min_models or (method.max_models is not None and n > method.max_models):
                want = (f"exactly {method.min_models}" if method.max_models == method.min_models
                        else f"at least {method.min_models}" if method.max_models is None
                        else f"{method.min_models} to {method.max_models}")
                what = "models besides the base" if method.needs_base != "none" else "models"
                raise WeightsmithError(f"recipe{label}: {method.name} takes {want} {what}, got {n}")
        self._check_parameters(method)
        if self.lines is not None:
            if not method.task_vector:
                raise WeightsmithError(f"recipe: lines scales a task vector, but {method.name} has none")
            if not any(base for _, base, _ in groups):
                raise WeightsmithError("recipe: lines needs a base_model (it scales θ − θ_base)")
        if self.slices:
            for i, sl in enumerate(self.slices):
                lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
                if len(lengths) != 1 or min(lengths) <= 0:
                    raise WeightsmithError(
                        f"recipe: slices[{i}] sources must cover the same positive number of layers, got "
                        + ", ".join(f"{s.model} {list(s.layer_range)}" for s in sl.sources)
                    )

    def _input_groups(self) -> list[tuple[str, str | None, list[str]]]:
        """(label, base, input models) per merge group: the whole model, or each slice."""
        if self.models:
            names = [m.model for m in self.models]
            return [("", self.base_model, names)]
        out = []
        for i, sl in enumerate(self.slices):
            base = sl.base_model or self.base_model
            names = [s.model for s in sl.sources]
            if base and base not in names and get_method(self.merge_method).needs_base != "none":
                names.append(base)
            out.append((f" slices[{i}]", base, names))
        return out

    def _check_parameters(self, method: MergeMethod) -> None:
        scopes: list[tuple[str, dict[str, Any], str | None]] = [("parameters", self.parameters, None)]
        for m in self.models:
            scopes.append((f"models[{m.model}].parameters", m.parameters, m.model))
        for i, sl in enumerate(self.slices):
            scopes.append((f"slices[{i}].parameters", sl.parameters, None))
            for s in sl.sources:
                scopes.append((f"slices[{i}].sources[{s.model}].parameters", s.parameters, s.model))
        for where, params, _ in scopes:
            for name, setting in params.items():
                spec = method.param(name)
                if spec is None:
                    log.warning("%s: %s is not a parameter of %s; ignored", where, name, method.name)
                    continue
                for value in setting_values(setting):
                    spec.coerce(value, where)
        # A required per-model parameter must be given somewhere for every model that needs it.
        for spec in method.model_parameters:
            if not spec.required:
                continue
            if self.models:
                needing = self.models if method.needs_base == "none" else self.non_base_models()
                for m in needing:
                    if spec.name not in m.parameters and spec.name not in self.parameters:
                        raise WeightsmithError(f"recipe: model {m.model} has no {spec.name}")
            else:
                for i, sl in enumerate(self.slices):
                    base = sl.base_model or self.base_model
                    for s in sl.sources:
                        if s.model == base and method.needs_base != "none":
                            continue
                        if not any(spec.name in p for p in (s.parameters, sl.parameters, self.parameters)):
                            raise WeightsmithError(f"recipe: slices[{i}] model {s.model} has no {spec.name}")
        for spec in method.shared_parameters:
            if spec.required:
                in_any = spec.name in self.parameters or any(spec.name in sl.parameters for sl in self.slices)
                if not in_any:
                    raise WeightsmithError(f"recipe: {method.name} needs parameter {spec.name}")


# -- parsing helpers -----------------------------------------------------------

def _as_list(value: Any, key: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise WeightsmithError(f"recipe: {key} must be a list")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _params(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WeightsmithError(f"recipe: {where} must be a mapping of name: value")
    for name, setting in value.items():
        if isinstance(setting, dict) and not is_filter_entry(setting):
            raise WeightsmithError(f"recipe: {where}.{name} must be a number, a list, or {{filter, value}} entries")
    return dict(value)


def _model_entry(item: Any, i: int) -> ModelEntry:
    if isinstance(item, str):
        return ModelEntry(item)
    if not isinstance(item, dict) or "model" not in item:
        raise WeightsmithError(f"recipe: models[{i}] must be a mapping with a model key")
    extra = set(item) - {"model", "parameters"}
    if extra:
        raise WeightsmithError(f"recipe: models[{i}] has unknown key(s) {', '.join(sorted(extra))}")
    model = read_model_ref(item["model"], f"models[{i}].model")
    return ModelEntry(model, _params(item.get("parameters"), f"models[{i}].parameters"))  # type: ignore[arg-type]


def _slice(item: Any, i: int) -> SliceDef:
    if not isinstance(item, dict) or not isinstance(item.get("sources"), list) or not item["sources"]:
        raise WeightsmithError(f"recipe: slices[{i}] must have a non-empty sources list")
    sources = []
    for j, src in enumerate(item["sources"]):
        if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
            raise WeightsmithError(f"recipe: slices[{i}].sources[{j}] needs model and layer_range")
        lr = src["layer_range"]
        if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in lr)):
            raise WeightsmithError(f"recipe: slices[{i}].sources[{j}].layer_range must be [start, end], got {lr!r}")
        sources.append(SliceSource(read_model_ref(src["model"], "model"), (lr[0], lr[1]),  # type: ignore[arg-type]
                                   _params(src.get("parameters"), f"slices[{i}].sources[{j}].parameters")))
    return SliceDef(sources, _params(item.get("parameters"), f"slices[{i}].parameters"),
                    read_model_ref(item.get("base_model"), f"slices[{i}].base_model"))
