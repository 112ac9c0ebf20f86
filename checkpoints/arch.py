"""Architecture map: everything Weightsmith knows about model layouts, in one place.

Merging (per-block schedules), LiNeS (depth scaling) and ROME (which MLP to
edit, which way round its weight is stored) all read :func:`spec_for`. None of
them guesses from tensor shapes: a square Conv1D weight looks exactly like a
square Linear weight, and that guess is the classic ROME-port bug.

Example::

    spec = spec_for("llama")
    spec.locate("model.layers.3.mlp.down_proj.weight")   # Location(kind="block", block=3)
    spec.module("mlp_out", 3)                             # "model.layers.3.mlp.down_proj"
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

import torch

from .errors import WeightsmithError

log = logging.getLogger(__name__)

TensorKind = Literal["block", "embedding", "final_norm", "head", "other"]


@dataclass(frozen=True)
class Location:
    """Where a parameter sits: inside block ``block`` (0-based) or outside the stack."""

    kind: TensorKind
    block: int | None = None


@dataclass(frozen=True)
class ArchSpec:
    """Declared layout of one ``model_type``.

    Module templates take the block index through ``{}``. ``weight_layout`` is
    ``"out_in"`` for ``nn.Linear`` (weight is ``[out, in]``) and ``"in_out"`` for
    GPT-2's ``Conv1D`` (weight is stored transposed, ``[in, out]``).
    """

    model_type: str
    block_prefix: str  # e.g. "model.layers.{}"
    embeddings: tuple[str, ...]  # parameter-name prefixes outside the blocks
    final_norm: tuple[str, ...]
    head: tuple[str, ...]
    mlp_in: tuple[str, ...]  # relative to the block, e.g. ("mlp.gate_proj", "mlp.up_proj")
    mlp_out: str  # relative to the block: ROME edits this module's weight
    attention: str  # relative to the block: the attention module (causal tracing restores its output)
    mlp: str  # relative to the block: the MLP module (causal tracing restores its output)
    weight_layout: Literal["out_in", "in_out"] = "out_in"
    num_layers_key: str = "num_hidden_layers"
    # Optional prefixes seen in checkpoints saved without the task head wrapper
    # (e.g. gpt2 on the Hub stores "h.0.attn..." rather than "transformer.h.0...").
    optional_prefixes: tuple[str, ...] = ()
    generic: bool = False
    # GGUF export: the architecture llama.cpp runs this model_type as (None: no export), and the
    # q/k projections (relative to the block) whose rows llama.cpp's converter permutes into its
    # rotary layout (transformers' GGUF loader permutes them back).
    gguf_arch: str | None = None
    gguf_rope_permute: tuple[str, str] | None = None
    # Whether the head shares the embedding matrix when a config does not say
    # (``tie_word_embeddings`` missing): transformers' GPT2Config ties by default.
    tied_head_default: bool = False
    _block_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        head, _, tail = self.block_prefix.partition("{}")
        # A checkpoint may store names without an optional wrapper prefix
        # ("h.0.mlp..." for "transformer.h.0.mlp..."): accept both spellings.
        heads = {head} | {head[len(p):] for p in self.optional_prefixes if head.startswith(p)}
        alternatives = "|".join(re.escape(h) for h in sorted(heads, key=len, reverse=True))
        pattern = rf"^(?:{alternatives})(\d+){re.escape(tail)}\."
        object.__setattr__(self, "_block_re", re.compile(pattern))

    # -- parameter names -------------------------------------------------
    def strip_optional_prefix(self, name: str) -> str:
        """``name`` without its optional wrapper prefix (``transformer.h.0`` -> ``h.0``), if it has one."""
        for p in self.optional_prefixes:
            if name.startswith(p):
                return name[len(p):]
        return name

    def locate(self, name: str) -> Location:
        """Return where parameter ``name`` lives (its block, or which non-block part)."""
        m = self._block_re.match(name)
        if m:
            return Location("block", int(m.group(1)))
        for kind, prefixes in (
            ("embedding", self.embeddings),
            ("final_norm", self.final_norm),
            ("head", self.head),
        ):
            for p in prefixes:
                short = self.strip_optional_prefix(p)
                if name.startswith(p) or self.strip_optional_prefix(name)[: len(short)] == short:
                    return Location(kind)  # type: ignore[arg-type]
        return Location("other")

    def block_of(self, name: str) -> int | None:
        """Block index of ``name``, or None for parameters outside the stack."""
        return self.locate(name).block

    # -- modules -----------------------------------------------------------
    def block(self, index: int) -> str:
        """Module path of block ``index``, e.g. ``model.layers.3``."""
        return self.block_prefix.format(index)

    def module(self, role: Literal["mlp_out", "mlp", "attention"], index: int) -> str:
        """Full module path of ``role`` in block ``index``."""
        rel = {"mlp_out": self.mlp_out, "mlp": self.mlp, "attention": self.attention}[role]
        return f"{self.block(index)}.{rel}"

    def mlp_in_modules(self, index: int) -> list[str]:
        return [f"{self.block(index)}.{rel}" for rel in self.mlp_in]

    # -- weights -----------------------------------------------------------
    @property
    def transposed(self) -> bool:
        """True when 2-D weights are stored ``[in, out]`` (GPT-2 Conv1D)."""
        return self.weight_layout == "in_out"

    def as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """View a stored 2-D projection weight as ``[out, in]``."""
        return weight.T if self.transposed else weight

    def from_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`as_out_in`: an ``[out, in]`` tensor in stored layout."""
        return weight.T if self.transposed else weight

    def module_transposed(self, module: str) -> bool:
        """True when ``module``'s weight is stored ``[in, out]``.

        ``weight_layout`` describes the projections inside the blocks: GPT-2's
        Conv1D lives there, while its head outside the blocks is an ``nn.Linear``.
        """
        return self.transposed and self.locate(f"{module}.weight").kind == "block"

    def weight_name(self, module: str, names: Iterable[str]) -> str | None:
        """The checkpoint tensor among ``names`` holding ``module``'s weight, or None.

        ``module`` is named as in the loaded model (``transformer.h.0.mlp.c_fc``);
        a checkpoint may store it without an optional prefix (``h.0.mlp.c_fc.weight``).
        """
        names = names if isinstance(names, (set, frozenset, dict)) else set(names)
        candidates = [f"{module}.weight"] + [f"{module[len(p):]}.weight" for p in self.optional_prefixes
                                             if module.startswith(p)]
        return next((c for c in candidates if c in names), None)

    def module_name(self, weight: str) -> str:
        """Inverse of :meth:`weight_name`: the loaded model's module path of checkpoint tensor ``weight``."""
        module = weight[: -len(".weight")] if weight.endswith(".weight") else weight
        if self.optional_prefixes and not any(module.startswith(p) for p in self.optional_prefixes):
            return self.optional_prefixes[0] + module
        return module

    def is_vocabulary_weight(self, name: str) -> bool:
        """True for a weight with one row per token, stored ``[vocab, hidden]``: the token
        embedding (the first of ``embeddings``; GPT-2's position table is not one) or the head."""
        short = self.strip_optional_prefix(name)
        return any(short == self.strip_optional_prefix(f"{p}.weight") for p in (*self.embeddings[:1], *self.head))

    def tied_head_names(self, config: Mapping[str, Any]) -> list[str]:
        """Names of head weights that a tied-embedding model does not store.

        For ``tie_word_embeddings`` models (gpt2, SmolLM2) ``lm_head.weight`` is
        the embedding matrix; writing it again would double the file and, worse,
        let a merge make the two differ.
        """
        tied = config.get("tie_word_embeddings")
        if tied is None:
            tied = self.tied_head_default
        return [f"{h}.weight" for h in self.head] if tied else []

    def num_layers(self, config: Mapping[str, Any] | Any) -> int:
        """Number of transformer blocks, from a config object or dict."""
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        for key in (self.num_layers_key, "num_hidden_layers", "n_layer", "num_layers"):
            value = get(key, None)
            if isinstance(value, int):
                return value
        raise WeightsmithError(f"config of {self.model_type!r} has no layer count ({self.num_layers_key})")


def _llama_like(model_type: str, **overrides: Any) -> ArchSpec:
    base = dict(
        model_type=model_type,
        block_prefix="model.layers.{}",
        embeddings=("model.embed_tokens",),
        final_norm=("model.norm",),
        head=("lm_head",),
        mlp_in=("mlp.gate_proj", "mlp.up_proj"),
        mlp_out="mlp.down_proj",
        attention="self_attn",
        mlp="mlp",
    )
    base.update(overrides)
    return ArchSpec(**base)


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        _llama_like("llama", gguf_arch="llama", gguf_rope_permute=("self_attn.q_proj", "self_attn.k_proj")),
        _llama_like("mistral", gguf_arch="llama", gguf_rope_permute=("self_attn.q_proj", "self_attn.k_proj")),
        _llama_like("qwen2", gguf_arch="qwen2"),
        _llama_like("qwen3"),
        _llama_like("gemma"),
        _llama_like("gemma2"),
        _llama_like("olmo2"),
        _llama_like("phi3", mlp_in=("mlp.gate_up_proj",)),
        ArchSpec(
            model_type="gpt2",
            block_prefix="transformer.h.{}",
            embeddings=("transformer.wte", "transformer.wpe"),
            final_norm=("transformer.ln_f",),
            head=("lm_head",),
            mlp_in=("mlp.c_fc",),
            mlp_out="mlp.c_proj",
            attention="attn",
            mlp="mlp",
            weight_layout="in_out",  # transformers' Conv1D stores [in, out]
            num_layers_key="n_layer",
            optional_prefixes=("transformer.",),
            gguf_arch="gpt2",
            tied_head_default=True,  # GPT2Config ties the head to wte unless told otherwise
        ),
        ArchSpec(
            model_type="gpt_neox",
            block_prefix="gpt_neox.layers.{}",
            embeddings=("gpt_neox.embed_in",),
            final_norm=("gpt_neox.final_layer_norm",),
            head=("embed_out",),
            mlp_in=("mlp.dense_h_to_4h",),
            mlp_out="mlp.dense_4h_to_h",
            attention="attention",
            mlp="mlp",
        ),
    )
}


@dataclass(frozen=True)
class MoeLayout:
    """How a mixture of experts built from dense ``source_types`` models is stored (``weightsmith moe``).

    Names are relative to the block. The router holds one row per expert. Without ``expert_names``
    the experts are fused as transformers 5 loads them natively (mergekit 0.1.5 writes the same):
    ``gate_up`` is ``[experts, 2*intermediate, hidden]`` (each expert's gate rows, then its up
    rows) and ``down`` is ``[experts, hidden, intermediate]``. With ``expert_names`` (templates with
    ``{e}``, in gate/up/down order) each expert's three matrices are stored apart: the layout
    transformers' own ``save_pretrained`` writes and its conversion mapping fuses on load.
    ``dense_gate``/``dense_up``/``dense_down`` are the dense MLP's weights each expert contributes.

    ``shared_experts`` is how many always-on experts the layout takes (mergekit-moe's
    ``shared_experts``); their weights go to ``shared_names`` and their one-row gate to ``shared_gate``.
    ``required_biases`` must exist in the output; a source without one gets zeros (as mergekit does).
    ``mergekit_name`` is the name mergekit-moe's ``architecture:`` key matches by prefix.
    """

    model_type: str
    architecture: str
    source_types: tuple[str, ...]
    router: str
    gate_up: str
    down: str
    dense_gate: str
    dense_up: str
    dense_down: str
    num_experts_key: str
    experts_per_token_key: str
    mergekit_name: str = ""
    shared_experts: int = 0
    expert_names: tuple[str, str, str] | None = None
    shared_names: tuple[str, str, str] | None = None
    shared_gate: str | None = None
    required_biases: tuple[str, ...] = ()
    # Output config values beyond the base's settings; the *_intermediate_size keys copy intermediate_size.
    config_overrides: tuple[tuple[str, Any], ...] = ()
    intermediate_keys: tuple[str, ...] = ()


MOE_LAYOUTS: dict[str, MoeLayout] = {
    # Order matters: mergekit-moe prefers Mixtral whenever it fits.
    "mixtral": MoeLayout(
        model_type="mixtral", architecture="MixtralForCausalLM", source_types=("llama", "mistral"),
        router="mlp.gate.weight", gate_up="mlp.experts.gate_up_proj", down="mlp.experts.down_proj",
        dense_gate="mlp.gate_proj.weight", dense_up="mlp.up_proj.weight", dense_down="mlp.down_proj.weight",
        num_experts_key="num_local_experts", experts_per_token_key="num_experts_per_tok", mergekit_name="Mixtral"),
    "qwen2_moe": MoeLayout(
        model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", source_types=("llama", "mistral", "qwen2"),
        router="mlp.gate.weight", gate_up="mlp.experts.gate_up_proj", down="mlp.experts.down_proj",
        dense_gate="mlp.gate_proj.weight", dense_up="mlp.up_proj.weight", dense_down="mlp.down_proj.weight",
        num_experts_key="num_experts", experts_per_token_key="num_experts_per_tok", mergekit_name="Qwen MoE",
        shared_experts=1,
        expert_names=("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                      "mlp.experts.{e}.down_proj.weight"),
        shared_names=("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight",
                      "mlp.shared_expert.down_proj.weight"),
        shared_gate="mlp.shared_expert_gate.weight",
        required_biases=("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        config_overrides=(("decoder_sparse_step", 1), ("norm_topk_prob", True), ("use_sliding_window", False),
                          ("mlp_only_layers", []), ("qkv_bias", True),
                          ("layer_types", None)),  # None: rebuilt without sliding windows, as mergekit turns them off
        intermediate_keys=("moe_intermediate_size", "shared_expert_intermediate_size")),
}


def moe_layout_for(model_type: str | None, *, shared_experts: int = 0) -> MoeLayout:
    """The MoE layout dense ``model_type`` experts with ``shared_experts`` always-on experts are
    assembled into, chosen as mergekit-moe chooses (Mixtral first); one error line otherwise."""
    for layout in MOE_LAYOUTS.values():
        if model_type in layout.source_types and shared_experts == layout.shared_experts:
            return layout
    fits = [layout for layout in MOE_LAYOUTS.values() if model_type in layout.source_types]
    if fits:
        wants = "; ".join(f"{layout.architecture} takes exactly {layout.shared_experts}" for layout in fits)
        raise WeightsmithError(f"{model_type} experts with {shared_experts} shared_experts fit no MoE layout "
                               f"({wants}); mergekit-moe's rule")
    kinds = ", ".join(dict.fromkeys(t for layout in MOE_LAYOUTS.values() for t in layout.source_types))
    raise WeightsmithError(f"mixture-of-experts assembly takes {kinds} models, not {model_type!r}")


_GENERIC_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class GenericSpec(ArchSpec):
    """Fallback for unknown architectures: blocks found by the ``layers.N.`` / ``h.N.`` rule."""

    def locate(self, name: str) -> Location:  # noqa: D102 - same contract as ArchSpec
        m = _GENERIC_BLOCK.search(name)
        if m:
            return Location("block", int(m.group(1)))
        low = name.lower()
        if "embed" in low or low.startswith(("wte", "wpe")) or ".wte" in low or ".wpe" in low:
            return Location("embedding")
        if "lm_head" in low or low.startswith("embed_out"):
            return Location("head")
        if "norm" in low or "ln_f" in low:
            return Location("final_norm")
        return Location("other")


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def spec_for(model_type: str | None, *, strict: bool = False) -> ArchSpec:
    """The declared :class:`ArchSpec` for ``model_type``.

    An unknown type falls back to a generic ``layers.N.`` / ``h.N.`` rule and
    logs a warning; with ``strict=True`` (ROME, which must know the MLP) it
    raises :class:`WeightsmithError` instead.
    """
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if strict:
        raise WeightsmithError(
            f"unsupported architecture {model_type!r}: supported are {', '.join(supported_architectures())}"
        )
    log.warning(
        "architecture %r is not in the map; assigning blocks by the generic 'layers.N.' / 'h.N.' name rule",
        model_type,
    )
    return GenericSpec(
        model_type=str(model_type),
        block_prefix="layers.{}",
        embeddings=(),
        final_norm=(),
        head=(),
        mlp_in=(),
        mlp_out="",
        attention="",
        mlp="",
        generic=True,
    )
