"""An adapter mix recipe (YAML ⇄ dataclasses): base, adapters with weights, method, parameters, LiNeS."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from checkpoints.errors import WeightsmithError
from checkpoints.sources import public_name
from checkpoints.textfiles import load_yaml, read_text
from merging.adapter_methods import ADAPTER_METHODS
from merging.lines import LinesConfig
from merging.numbers import finite_float


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

