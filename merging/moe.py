"""Mixture-of-experts assembly (``weightsmith moe CONFIG.yaml OUT``) in ``mergekit-moe``'s config format.

Dense llama/mistral experts become a Mixtral model; with one ``shared_experts`` entry, llama/mistral/
qwen2 experts become a Qwen2-MoE (as mergekit-moe chooses; layouts declared in
:data:`checkpoints.arch.MOE_LAYOUTS`): attention, norms, embeddings and head come from
``base_model``; block ``l``'s expert ``e`` is expert model ``e``'s MLP of block ``l``; the router rows
(and the shared expert's one-row gate) come from the gate mode (:mod:`merging.moe_gates`). Tensors
stream one output tensor at a time through :class:`checkpoints.tensors.ShardedWriter`; the finished
folder is loaded by transformers and run on the experts' prompts (:mod:`merging.moe_check`) before it
is renamed into place, so a failed check leaves nothing behind.

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
from typing import Any, Iterator

import torch
import yaml

from checkpoints.arch import MoeLayout, moe_layout_for
from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Job, ensure
from checkpoints.sources import LocalCheckpoint
from checkpoints.tensors import SUPPORT_FILES, ShardedWriter
from checkpoints.textfiles import load_yaml

from .finite import FiniteCheck
from .lora_inputs import resolve_input
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
            for i, e in enumerate(self.shared_experts):
                if not e.prompts.positive:
                    raise WeightsmithError(f"moe config: shared_experts[{i}] has no positive_prompts (gate_mode "
                                           f"{self.gate_mode} computes the shared expert's gate from them)")
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
        if self.shared_experts:
            out["shared_experts"] = [expert(e) for e in self.shared_experts]
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
    load_check: str = ""
    shared_experts: int = 0
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
    for flag in ("mlp_bias", "attention_bias"):  # llama's flags; qwen2's q/k/v biases are what Qwen2-MoE has
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
    settings.update(dict(layout.config_overrides))
    for key in layout.intermediate_keys:  # every expert keeps its dense MLP's width (mergekit's choice)
        settings[key] = base.config["intermediate_size"]
    out = AutoConfig.for_model(layout.model_type, **settings).to_dict()
    out.update({"architectures": [layout.architecture], layout.num_experts_key: len(config.experts),
                layout.experts_per_token_key: config.experts_per_token, "sliding_window": None})
    if dtype is not None:
        out["dtype"] = next(name for name, t in DTYPES.items() if t == dtype)  # the long name comes first
    out.pop("transformers_version", None)
    return out


def _dense_parts(layout: MoeLayout, block: str, expert: MoeExpert, ckpt: LocalCheckpoint,
                 generator: torch.Generator, finite: FiniteCheck) -> list[torch.Tensor]:
    """One expert's dense gate, up and down weights of ``block``, with its noise and residual scale."""
    parts = []
    for rel in (layout.dense_gate, layout.dense_up, layout.dense_down):
        name = f"{block}.{rel}"
        # Noise and scale in float32; without a dtype the experts keep the base's stored one.
        t = ckpt.reader().get(name)
        finite.input(t, ckpt.name, name)
        if expert.noise_scale is not None:
            t = t + torch.randn(t.shape, generator=generator) * expert.noise_scale
        if rel == layout.dense_down and expert.residual_scale is not None:
            t = t * expert.residual_scale
        parts.append(t)
    return parts


def _layer_tensors(layout: MoeLayout, block: str, experts: list[tuple[MoeExpert, LocalCheckpoint]],
                   shared: list[tuple[MoeExpert, LocalCheckpoint]], router: torch.Tensor,
                   shared_router: torch.Tensor, generator: torch.Generator, finite: FiniteCheck,
                   stored: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Block ``block``'s MoE tensors: experts, shared experts, router, shared gate (one at a time)."""
    if layout.expert_names is None:  # fused: every expert of the block in one tensor
        parts = [_dense_parts(layout, block, e, c, generator, finite) for e, c in experts]
        yield f"{block}.{layout.gate_up}", torch.stack([torch.cat([g, u], dim=0) for g, u, _ in parts]).to(stored)
        yield f"{block}.{layout.down}", torch.stack([d for _, _, d in parts]).to(stored)
        del parts
    else:
        for index, (e, c) in enumerate(experts):
            for template, t in zip(layout.expert_names, _dense_parts(layout, block, e, c, generator, finite)):
                yield f"{block}.{template.format(e=index)}", t.to(stored)
    for e, c in shared:
        for rel, t in zip(layout.shared_names or (), _dense_parts(layout, block, e, c, generator, finite)):
            yield f"{block}.{rel}", t.to(stored)
    yield f"{block}.{layout.router}", router.to(stored)
    if shared:
        yield f"{block}.{layout.shared_gate}", shared_router.to(stored)


def _missing_biases(layout: MoeLayout, base: LocalCheckpoint) -> dict[str, str]:
    """``{weight name: bias name}`` of the biases the layout needs and the base lacks (they become zeros)."""
    reader = base.reader()
    out = {}
    for layer in range(base.num_layers):
        for rel in layout.required_biases:
            bias = f"{base.spec.block(layer)}.{rel}"
            weight = bias.removesuffix(".bias") + ".weight"
            if bias not in reader:
                if weight not in reader:
                    raise WeightsmithError(f"base model {base.name} has no tensor {weight}")
                out[weight] = bias
    return out


def _public(ckpt: LocalCheckpoint) -> str:
    return ckpt.hub_id or ckpt.name


def _named(layout: MoeLayout, architecture: str) -> bool:
    """mergekit-moe's ``architecture:`` matches an output's name by prefix; its class name works too."""
    want = architecture.lower()
    return layout.mergekit_name.lower().startswith(want) or layout.architecture.lower().startswith(want)


def build_moe(config: MoeConfig, out_dir: Path, *, job: Job | None = None, device: str = "cpu", seed: int = 0,
              allow_all_same: bool = False, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
              load_check: bool | None = None, resolver=resolve_input) -> MoeResult:
    """Assemble the MoE ``config`` describes into ``out_dir``; nothing is left there on error or cancel.

    ``load_check``: load the output in transformers and run the experts' prompts through it before
    publishing (None: when the weights are at most :data:`merging.moe_check.LOAD_CHECK_BYTES`).
    ``resolver``: reference -> checkpoint; the default reads ``model+adapter`` as the model with the
    LoRA applied, as mergekit-moe's model references do."""
    from checkpoints.cards import add_card_section
    from checkpoints.staging import staged_folder

    from .moe_check import LOAD_CHECK_BYTES, check_output, check_wanted

    job = ensure(job)
    start = time.perf_counter()
    config.check(allow_all_same=allow_all_same)
    base = resolver(config.base_model)
    layout = moe_layout_for(base.model_type, shared_experts=len(config.shared_experts))
    if config.architecture and not _named(layout, config.architecture):
        raise WeightsmithError(f"moe config: architecture {config.architecture!r} does not fit {base.model_type} "
                               f"experts with {len(config.shared_experts)} shared_experts (they make "
                               f"{layout.architecture}, mergekit's {layout.mergekit_name!r})")
    cache: dict[str, LocalCheckpoint] = {config.base_model: base}
    for e in (*config.experts, *config.shared_experts):
        if e.source_model not in cache:
            cache[e.source_model] = resolver(e.source_model)
    experts = [(e, cache[e.source_model]) for e in config.experts]
    shared = [(e, cache[e.source_model]) for e in config.shared_experts]
    _check_models(layout, base, [c for _, c in experts + shared])
    dtype = DTYPES[config.dtype] if config.dtype else _config_dtype(base.config)
    job.note(f"{layout.architecture}: {len(experts)} experts, {config.experts_per_token} per token, "
             f"{len(shared)} shared, gate_mode {config.gate_mode}")

    # One gate computation for routed and shared experts, as mergekit stacks them (its degenerate check too).
    all_rows = gate_rows(config.gate_mode, base, [e.prompts for e, _ in experts + shared], seed=seed,
                         device=device, job=job.part(0.0, 0.25))
    rows, shared_rows = all_rows[:, :len(experts)], all_rows[:, len(experts):]
    degenerate = degenerate_layers(all_rows) if all_rows.shape[1] > 1 else []
    if degenerate:
        log.warning("layers %s have degenerate routing parameters: the prompts may be too similar", degenerate)
        job.note(f"layers {degenerate} have nearly dependent router rows (prompts too similar?)")

    spec = base.spec
    layers = base.num_layers
    dense_mlp = {f"{spec.block(i)}.{rel}": i for i in range(layers)
                 for rel in (layout.dense_gate, layout.dense_up, layout.dense_down)}
    zero_biases = _missing_biases(layout, base)
    base_names = base.reader().keys()
    per_layer = ((3 * len(experts)) if layout.expert_names else 2) + 3 * len(shared) + 1 + (1 if shared else 0)
    total = len(base_names) - len(dense_mlp) + per_layer * layers + len(zero_biases)
    finite = FiniteCheck()
    generator = torch.Generator().manual_seed(int(seed))
    written = 0
    part = job.part(0.25, 0.9)
    public = config.with_models_renamed(lambda ref: _public(cache[ref]))
    public_yaml = yaml.safe_dump(public, sort_keys=False, allow_unicode=True)
    with staged_folder(Path(out_dir), overwrite=overwrite) as staging:
        inner = staging / "moe"
        with ShardedWriter(inner, max_shard_bytes=max_shard_bytes, dtype=dtype) as writer:
            def add(name: str, t: torch.Tensor) -> None:
                nonlocal written
                part.check("the MoE assembly")
                writer.add(name, finite.output(name, t.to(dtype) if dtype is not None and t.is_floating_point()
                                               else t))
                written += 1
                part.step(written, total, name)

            done_layers: set[int] = set()
            for name in base_names:
                layer = dense_mlp.get(name)
                if layer is None:
                    t = base.reader().get(name, dtype=None)
                    finite.input(t, base.name, name)
                    add(name, t)
                    if name in zero_biases:  # Qwen2-MoE's q/k/v have biases, llama's do not
                        add(zero_biases[name], torch.zeros(t.shape[0], dtype=t.dtype))
                elif layer not in done_layers:
                    done_layers.add(layer)
                    stored = dtype or base.reader().meta(name).dtype
                    for out_name, t in _layer_tensors(layout, spec.block(layer), experts, shared, rows[layer],
                                                      shared_rows[layer], generator, finite, stored):
                        add(out_name, t)
                        del t
            writer.copy_support_files(base.support_dir, names=[n for n in SUPPORT_FILES if n != "config.json"])
            writer.write_text("config.json", json.dumps(output_config(layout, base, config, dtype), indent=2) + "\n")
            writer.write_text(CONFIG_NAME, public_yaml)
            writer.add_file("README.md", _card(Path(out_dir).name, layout, config, public, public_yaml, degenerate))
            part.check("the MoE assembly")
        if check_wanted(inner, load_check):
            # Before publishing: an output transformers cannot load or run is not kept.
            loaded = check_output(inner, layout, [e.prompts for e, _ in experts], device=device,
                                  job=job.part(0.9, 1.0)).summary()
        elif load_check is False:
            loaded = "load check turned off"
        else:
            loaded = (f"load check skipped (weights above {LOAD_CHECK_BYTES / 1e9:g} GB, the automatic limit; "
                      "load_check=True / --load-check forces it)")
        add_card_section(inner, "Checks", f"{finite.summary()}; {loaded}.")
        for f in inner.iterdir():
            f.rename(staging / f.name)
        inner.rmdir()
    result = MoeResult(out_dir=Path(out_dir), architecture=layout.architecture, num_experts=len(experts),
                       experts_per_token=config.experts_per_token, gate_mode=config.gate_mode,
                       tensors_written=written, finite_check=finite.summary(), load_check=loaded,
                       shared_experts=len(shared), degenerate_layers=degenerate,
                       seconds=time.perf_counter() - start)
    log.info("wrote %s: %s with %d experts", out_dir, layout.architecture, len(experts))
    return result


def _card(title: str, layout: MoeLayout, config: MoeConfig, public: dict[str, Any], public_yaml: str,
          degenerate: list[int]) -> bytes:
    from checkpoints.cards import CardInfo, build_card

    shared = public.get("shared_experts", [])
    names = list(dict.fromkeys([public["base_model"], *(e["source_model"] for e in [*public["experts"], *shared])]))
    summary = (f"This model is a mixture of experts ({layout.architecture}, {len(config.experts)} experts, "
               f"{config.experts_per_token} per token" + (f", {len(shared)} shared expert" if shared else "")
               + ") assembled with Weightsmith in mergekit-moe's format.")

    def line(label: str, e: dict[str, Any]) -> str:
        prompts = e.get("positive_prompts")
        return f"{label} {e['source_model']}" + (f": {', '.join(map(repr, prompts))}" if prompts else "")

    experts = "\n".join([*(line(f"{i}.", e) for i, e in enumerate(public["experts"])),
                         *(line("- shared (always on, its own sigmoid gate):", e) for e in shared)])
    gates = f"gate_mode `{config.gate_mode}`; attention, norms, embeddings and head from {public['base_model']}."
    if degenerate:
        gates += f" Layers {degenerate} have nearly dependent router rows: some experts will seldom be chosen there."
    info = CardInfo(title=title, relation="merge", base_models=names, summary=summary,
                    tags=["moe", "merge", "weightsmith", layout.model_type], recipe_yaml=public_yaml,
                    extra_sections={"Experts": experts, "Router": gates})
    return str(build_card(info)).encode("utf-8")
