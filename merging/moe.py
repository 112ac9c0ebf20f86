"""Mixture-of-experts assembly (``weightsmith moe CONFIG.yaml OUT``) in ``mergekit-moe``'s config format.

Dense llama/mistral experts become a Mixtral model (layout declared in
:data:`checkpoints.arch.MOE_LAYOUTS`): attention, norms, embeddings and head come from
``base_model``; block ``l``'s expert ``e`` is expert model ``e``'s MLP of block ``l``; the router rows
come from the gate mode (:mod:`merging.moe_gates`). Tensors stream one output tensor at a time
through :class:`checkpoints.tensors.ShardedWriter` into a temp folder renamed into place at the end.

Config keys (mergekit's): ``base_model``, ``experts`` (``source_model``, ``positive_prompts``,
``negative_prompts``, ``noise_scale``, ``residual_scale``), ``gate_mode`` (default ``hidden``),
``dtype``, ``experts_per_token`` (default 2), ``shared_experts``, ``architecture``.

Example::

    config = MoeConfig.from_yaml(Path("moe.yml"))
    result = build_moe(config, Path("out"), job=job)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from checkpoints.arch import MoeLayout, moe_layout_for
from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Job, ensure
from checkpoints.sources import LocalCheckpoint, resolve
from checkpoints.tensors import SUPPORT_FILES, ShardedWriter
from checkpoints.textfiles import load_yaml

from .finite import FiniteCheck
from .moe_gates import GATE_MODES, PROMPTLESS_MODES, Prompts, degenerate_layers, gate_rows
from .recipe import DTYPES

log = logging.getLogger(__name__)

CONFIG_NAME = "weightsmith_moe.yml"
_TOP_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture")
_EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")


@dataclass(frozen=True)
class MoeExpert:
    source_model: str
    prompts: Prompts = Prompts()
    noise_scale: float | None = None
    residual_scale: float | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "MoeExpert":
        if not isinstance(data, dict):
            raise WeightsmithError(f"{where}: expected a mapping with source_model")
        unknown = sorted(set(data) - set(_EXPERT_KEYS))
        if unknown:
            raise WeightsmithError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(_EXPERT_KEYS)})")
        model = data.get("source_model")
        if not isinstance(model, str) or not model.strip():
            raise WeightsmithError(f"{where}: source_model is missing")
        return cls(source_model=model.strip(),
                   prompts=Prompts(_prompts(data.get("positive_prompts"), f"{where}.positive_prompts"),
                                   _prompts(data.get("negative_prompts"), f"{where}.negative_prompts")),
                   noise_scale=_number(data.get("noise_scale"), f"{where}.noise_scale"),
                   residual_scale=_number(data.get("residual_scale"), f"{where}.residual_scale"))


def _prompts(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise WeightsmithError(f"{where}: expected a list of strings")
    return tuple(value)


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WeightsmithError(f"{where}: expected a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class MoeConfig:
    """A ``mergekit-moe`` config, checked as mergekit's ``is_bad_config`` checks it."""

    base_model: str
    experts: tuple[MoeExpert, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: tuple[MoeExpert, ...] = ()
    architecture: str | None = None

    @classmethod
    def from_dict(cls, data: Any) -> "MoeConfig":
        if not isinstance(data, dict):
            raise WeightsmithError("moe config: expected a mapping with base_model and experts")
        unknown = sorted(set(data) - set(_TOP_KEYS))
        if unknown:
            raise WeightsmithError(f"moe config: unknown key {unknown[0]!r} (known: {', '.join(_TOP_KEYS)})")
        base = data.get("base_model")
        if not isinstance(base, str) or not base.strip():
            raise WeightsmithError("moe config: base_model is missing")
        experts = data.get("experts")
        if not isinstance(experts, list) or not experts:
            raise WeightsmithError("moe config: experts must be a non-empty list")
        shared = data.get("shared_experts") or []
        if not isinstance(shared, list):
            raise WeightsmithError("moe config: shared_experts must be a list")
        per_token = data.get("experts_per_token", 2)
        if isinstance(per_token, bool) or not isinstance(per_token, int):
            raise WeightsmithError(f"moe config: experts_per_token must be an integer, got {per_token!r}")
        mode = data.get("gate_mode", "hidden")
        if mode not in GATE_MODES:
            raise WeightsmithError(f"moe config: unknown gate_mode {mode!r}: choose one of {', '.join(GATE_MODES)}")
        dtype = data.get("dtype")
        if dtype is not None and dtype not in DTYPES:
            raise WeightsmithError(f"moe config: unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        arch = data.get("architecture")
        return cls(base_model=base.strip(),
                   experts=tuple(MoeExpert.from_dict(e, f"experts[{i}]") for i, e in enumerate(experts)),
                   gate_mode=mode, dtype=dtype, experts_per_token=per_token,
                   shared_experts=tuple(MoeExpert.from_dict(e, f"shared_experts[{i}]") for i, e in enumerate(shared)),
                   architecture=str(arch) if arch is not None else None)

    @classmethod
    def from_yaml(cls, source: str | Path) -> "MoeConfig":
        """From YAML text, or from the file at a :class:`Path`."""
        if isinstance(source, Path):
            if not source.is_file():
                raise WeightsmithError(f"{source}: no such moe config file")
            return cls.from_dict(load_yaml(source.read_text(encoding="utf-8"), what=f"moe config {source.name}"))
        return cls.from_dict(load_yaml(source, what="moe config"))

    def check(self, *, allow_all_same: bool = False) -> None:
        """mergekit's refusals, each as one line, before anything is read."""
        if self.experts_per_token < 1:
            raise WeightsmithError("moe config: experts_per_token must be >= 1")
        if len(self.experts) < self.experts_per_token:
            raise WeightsmithError(f"moe config: {len(self.experts)} experts, fewer than "
                                   f"experts_per_token ({self.experts_per_token})")
        if self.gate_mode not in PROMPTLESS_MODES:
            for i, e in enumerate(self.experts):
                if not e.prompts.positive:
                    raise WeightsmithError(f"moe config: experts[{i}] has no positive_prompts "
                                           f"(gate_mode {self.gate_mode} routes by them)")
            if len(self.experts) > 1 and all(e.prompts == self.experts[0].prompts for e in self.experts[1:]):
                raise WeightsmithError("moe config: every expert has the same prompts; the router could not tell "
                                       "them apart")
        if (not allow_all_same and len(self.experts) > 1
                and all(e.source_model == self.experts[0].source_model for e in self.experts[1:])):
            raise WeightsmithError("moe config: every expert is the same model (the MoE would compute the dense "
                                   "model at a higher cost); pass --i-understand-this-is-not-useful-without-training "
                                   "(allow_all_same=True) to build it anyway")

    def with_models_renamed(self, rename) -> dict[str, Any]:
        """The config as a dict, every model reference passed through ``rename``."""
        def expert(e: MoeExpert) -> dict[str, Any]:
            out: dict[str, Any] = {"source_model": rename(e.source_model)}
            if e.prompts.positive:
                out["positive_prompts"] = list(e.prompts.positive)
            if e.prompts.negative:
                out["negative_prompts"] = list(e.prompts.negative)
            for key in ("noise_scale", "residual_scale"):
                if getattr(e, key) is not None:
                    out[key] = getattr(e, key)
            return out

        out: dict[str, Any] = {"base_model": rename(self.base_model), "gate_mode": self.gate_mode,
                               "experts_per_token": self.experts_per_token}
        if self.dtype:
            out["dtype"] = self.dtype
        if self.architecture:
            out["architecture"] = self.architecture
        out["experts"] = [expert(e) for e in self.experts]
        return out


@dataclass
class MoeResult:
    out_dir: Path
    architecture: str
    num_experts: int
    experts_per_token: int
    gate_mode: str
    tensors_written: int
    finite_check: str
    degenerate_layers: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _config_dtype(config: dict[str, Any]) -> torch.dtype | None:
    name = config.get("torch_dtype") or config.get("dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def _check_models(layout: MoeLayout, base: LocalCheckpoint, experts: list[LocalCheckpoint]) -> None:
    """Same architecture and sizes everywhere, and every expert holds the dense MLP weights (headers only)."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers")
    for ckpt in experts:
        if ckpt.model_type != base.model_type:
            raise WeightsmithError(f"expert {ckpt.name} is {ckpt.model_type}, the base model {base.name} is "
                                   f"{base.model_type}: every model of an MoE must share the architecture")
        for key in keys:
            if ckpt.config.get(key) != base.config.get(key):
                raise WeightsmithError(f"expert {ckpt.name} has {key} {ckpt.config.get(key)}, the base model "
                                       f"{base.name} has {base.config.get(key)}")
    for flag in ("mlp_bias", "attention_bias"):
        if base.config.get(flag):
            raise WeightsmithError(f"base model {base.name} uses {flag}, which {layout.architecture} has no weights for")
    spec = base.spec
    for ckpt in [base, *experts]:
        reader = ckpt.reader()
        for layer in range(base.num_layers):
            for rel in (layout.dense_gate, layout.dense_up, layout.dense_down):
                name = f"{spec.block(layer)}.{rel}"
                if name not in reader:
                    raise WeightsmithError(f"model {ckpt.name} has no tensor {name}")
                base_shape = base.reader().meta(name).shape
                if tuple(reader.meta(name).shape) != tuple(base_shape):
                    raise WeightsmithError(f"model {ckpt.name}: {name} has shape {tuple(reader.meta(name).shape)}, "
                                           f"the base model's is {tuple(base_shape)}")


def output_config(layout: MoeLayout, base: LocalCheckpoint, config: MoeConfig,
                  dtype: torch.dtype | None) -> dict[str, Any]:
    """transformers' config for the output: the base's settings in ``layout``'s config class."""
    from transformers import AutoConfig

    settings = {k: v for k, v in json.loads(json.dumps(base.config)).items()
                if k not in ("model_type", "architectures", "transformers_version", "_name_or_path")}
    out = AutoConfig.for_model(layout.model_type, **settings).to_dict()
    out.update({"architectures": [layout.architecture], layout.num_experts_key: len(config.experts),
                layout.experts_per_token_key: config.experts_per_token, "sliding_window": None})
    if dtype is not None:
        out["dtype"] = next(name for name, t in DTYPES.items() if t == dtype)  # the long name comes first
    out.pop("transformers_version", None)
    return out


def _expert_tensors(layout: MoeLayout, spec, layer: int, experts: list[tuple[MoeExpert, LocalCheckpoint]],
                    generator: torch.Generator, finite: FiniteCheck,
                    stored: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``layer``'s fused ``gate_up`` and ``down`` from each expert's dense MLP."""
    gate_up, down = [], []
    for expert, ckpt in experts:
        parts = {}
        for rel in (layout.dense_gate, layout.dense_up, layout.dense_down):
            name = f"{spec.block(layer)}.{rel}"
            # Noise and scale in float32; without a dtype the experts keep the base's stored one.
            t = ckpt.reader().get(name)
            finite.input(t, ckpt.name, name)
            if expert.noise_scale is not None:
                t = t + torch.randn(t.shape, generator=generator) * expert.noise_scale
            if rel == layout.dense_down and expert.residual_scale is not None:
                t = t * expert.residual_scale
            parts[rel] = t
        gate_up.append(torch.cat([parts[layout.dense_gate], parts[layout.dense_up]], dim=0))
        down.append(parts[layout.dense_down])
    return torch.stack(gate_up).to(stored), torch.stack(down).to(stored)


def _public(ckpt: LocalCheckpoint) -> str:
    return ckpt.hub_id or ckpt.name


def build_moe(config: MoeConfig, out_dir: Path, *, job: Job | None = None, device: str = "cpu", seed: int = 0,
              allow_all_same: bool = False, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
              resolver=resolve) -> MoeResult:
    """Assemble the MoE ``config`` describes into ``out_dir``; nothing is left there on error or cancel."""
    job = ensure(job)
    start = time.perf_counter()
    config.check(allow_all_same=allow_all_same)
    if config.shared_experts:
        raise WeightsmithError("moe config: shared_experts need a Qwen2-MoE output; Mixtral has no shared experts")
    base = resolver(config.base_model)
    layout = moe_layout_for(base.model_type)
    if config.architecture and not layout.architecture.lower().startswith(config.architecture.lower()):
        raise WeightsmithError(f"moe config: architecture {config.architecture!r} does not fit {base.model_type} "
                               f"experts (they make {layout.architecture})")
    cache: dict[str, LocalCheckpoint] = {config.base_model: base}
    for e in config.experts:
        if e.source_model not in cache:
            cache[e.source_model] = resolver(e.source_model)
    experts = [(e, cache[e.source_model]) for e in config.experts]
    _check_models(layout, base, [c for _, c in experts])
    dtype = DTYPES[config.dtype] if config.dtype else _config_dtype(base.config)
    job.note(f"{layout.architecture}: {len(experts)} experts, {config.experts_per_token} per token, "
             f"gate_mode {config.gate_mode}")

    rows = gate_rows(config.gate_mode, base, [e.prompts for e, _ in experts], seed=seed, device=device,
                     job=job.part(0.0, 0.3))
    degenerate = degenerate_layers(rows) if len(experts) > 1 else []
    if degenerate:
        log.warning("layers %s have degenerate routing parameters: the prompts may be too similar", degenerate)
        job.note(f"layers {degenerate} have nearly dependent router rows (prompts too similar?)")

    spec = base.spec
    layers = base.num_layers
    dense_mlp = {f"{spec.block(i)}.{rel}": i for i in range(layers)
                 for rel in (layout.dense_gate, layout.dense_up, layout.dense_down)}
    base_names = base.reader().keys()
    total = len(base_names) - len(dense_mlp) + 3 * layers
    finite = FiniteCheck()
    generator = torch.Generator().manual_seed(int(seed))
    written = 0
    part = job.part(0.3, 1.0)
    with ShardedWriter(out_dir, max_shard_bytes=max_shard_bytes, dtype=dtype, overwrite=overwrite) as writer:
        def add(name: str, t: torch.Tensor) -> None:
            nonlocal written
            part.check("the MoE assembly")
            writer.add(name, finite.output(name, t.to(dtype) if dtype is not None and t.is_floating_point() else t))
            written += 1
            part.step(written, total, name)

        done_layers: set[int] = set()
        for name in base_names:
            layer = dense_mlp.get(name)
            if layer is None:
                t = base.reader().get(name, dtype=None)
                finite.input(t, base.name, name)
                add(name, t)
            elif layer not in done_layers:
                done_layers.add(layer)
                stored = dtype or base.reader().meta(name).dtype
                gate_up, down = _expert_tensors(layout, spec, layer, experts, generator, finite, stored)
                add(f"{spec.block(layer)}.{layout.gate_up}", gate_up)
                del gate_up
                add(f"{spec.block(layer)}.{layout.down}", down)
                del down
                add(f"{spec.block(layer)}.{layout.router}", rows[layer].to(stored))
        writer.copy_support_files(base.support_dir, names=[n for n in SUPPORT_FILES if n != "config.json"])
        writer.write_text("config.json", json.dumps(output_config(layout, base, config, dtype), indent=2) + "\n")
        public = config.with_models_renamed(lambda ref: _public(cache[ref]))
        public_yaml = yaml.safe_dump(public, sort_keys=False, allow_unicode=True)
        writer.write_text(CONFIG_NAME, public_yaml)
        writer.add_file("README.md", _card(writer.out_dir.name, layout, config, public, public_yaml, degenerate))
        part.check("the MoE assembly")
    result = MoeResult(out_dir=Path(out_dir), architecture=layout.architecture, num_experts=len(experts),
                       experts_per_token=config.experts_per_token, gate_mode=config.gate_mode,
                       tensors_written=written, finite_check=finite.summary(), degenerate_layers=degenerate,
                       seconds=time.perf_counter() - start)
    log.info("wrote %s: %s with %d experts", out_dir, layout.architecture, len(experts))
    return result


def _card(title: str, layout: MoeLayout, config: MoeConfig, public: dict[str, Any], public_yaml: str,
          degenerate: list[int]) -> bytes:
    from checkpoints.cards import CardInfo, build_card

    names = list(dict.fromkeys([public["base_model"], *(e["source_model"] for e in public["experts"])]))
    summary = (f"This model is a mixture of experts ({layout.architecture}, {len(config.experts)} experts, "
               f"{config.experts_per_token} per token) assembled with Weightsmith in mergekit-moe's format.")
    experts = "\n".join(f"{i}. {e['source_model']}" + (f": {', '.join(map(repr, e.get('positive_prompts', [])))}"
                                                      if e.get("positive_prompts") else "")
                        for i, e in enumerate(public["experts"]))
    gates = f"gate_mode `{config.gate_mode}`; attention, norms, embeddings and head from {public['base_model']}."
    if degenerate:
        gates += f" Layers {degenerate} have nearly dependent router rows: some experts will seldom be chosen there."
    info = CardInfo(title=title, relation="merge", base_models=names, summary=summary,
                    tags=["moe", "merge", "weightsmith", layout.model_type], recipe_yaml=public_yaml,
                    extra_sections={"Experts": experts, "Router": gates})
    return str(build_card(info)).encode("utf-8")
