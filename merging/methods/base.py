"""What every merge method shares: the registry entry, parameter specs, and the per-tensor context.

A merge method is a plain function of tensors::

    func(base, tensors, params, per_model, ctx) -> Tensor

* ``base``: the base model's tensor (float32) or ``None`` for methods without a base;
* ``tensors``: the other models' tensors, in recipe order (float32). The function
  owns them and may overwrite them in place (this keeps peak memory low);
* ``params``: shared parameters (``lambda``, ``normalize``, ``t``...) resolved for this tensor;
* ``per_model``: one dict per entry of ``tensors`` (``weight``, ``density``...);
* ``ctx``: :class:`TensorContext` (tensor name, seeded generator, observers).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from checkpoints.errors import WeightsmithError

from ..numbers import finite_float

ParamType = Literal["float", "bool", "int"]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method, as the app's forms and the recipe validator see it.

    ``per_model`` parameters are set per input model (``models[i].parameters``);
    the others are shared (top-level ``parameters``). ``default=None`` with
    ``required=True`` means the recipe must give it.
    """

    name: str
    type: ParamType
    default: Any
    min: float | None = None
    max: float | None = None
    per_model: bool = False
    help: str = ""
    required: bool = False
    min_exclusive: bool = False  # True when ``min`` itself is not allowed (density > 0)

    def coerce(self, value: Any, where: str) -> Any:
        """Validate one scalar value; raise one clear line naming ``where`` on a bad one."""
        if self.type == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise WeightsmithError(f"{where}: {self.name} must be true or false, got {value!r}")
        if isinstance(value, bool):
            raise WeightsmithError(f"{where}: {self.name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise WeightsmithError(f"{where}: {self.name} must be a number, got {value!r}") from None
        finite_float(number, f"{where}: {self.name}")
        low_bad = self.min is not None and (number <= self.min if self.min_exclusive else number < self.min)
        if low_bad or (self.max is not None and number > self.max):
            lo = "(" if self.min_exclusive else "["
            raise WeightsmithError(
                f"{where}: {self.name} must be in {lo}{self.min if self.min is not None else '-inf'}, "
                f"{self.max if self.max is not None else 'inf'}], got {number:g}"
            )
        return int(number) if self.type == "int" else number


@dataclass
class TensorContext:
    """Per-tensor facts and hooks handed to a method.

    ``seed`` makes random methods reproducible: the generator is seeded from the
    recipe seed and the tensor name, so a tensor's mask does not depend on the
    order tensors are processed in. ``observe_delta(i, delta)`` receives each
    model's raw task vector (the engine turns them into per-block norms);
    ``observe_task_sum(sum)`` receives Σ_t τ_t after sparsification (LiNeS auto α).
    """

    name: str
    seed: int = 0
    device: str | torch.device = "cpu"
    observe_delta: Callable[[int, torch.Tensor], None] | None = None
    observe_task_sum: Callable[[torch.Tensor], None] | None = None
    # Scratch float32 tensors for a method's output (the engine's reusable buffers).
    new_tensor: Callable[[torch.Size], torch.Tensor] | None = None
    # Reproduce mergekit's sort order among tied magnitudes at a density cut (see sparsify).
    exact_ties: bool = True
    # True when this 2-D weight is stored [in, out] (GPT-2 Conv1D: ArchSpec.module_transposed), so
    # methods whose result depends on which side is the output (Iso-CTS's projection) can tell.
    transposed: bool = False
    _generator: torch.Generator | None = field(default=None, repr=False)

    def empty_like(self, t: torch.Tensor) -> torch.Tensor:
        """An uninitialised float32 tensor shaped like ``t`` (from the engine's pool when it has one)."""
        if self.new_tensor is not None and t.dtype == torch.float32 and t.device.type == "cpu":
            return self.new_tensor(t.shape)
        return torch.empty_like(t)

    def generator(self) -> torch.Generator:
        if self._generator is None:
            g = torch.Generator(device=torch.device(self.device))
            g.manual_seed((int(self.seed) * 1_000_003 + zlib.crc32(self.name.encode())) % (2**63))
            self._generator = g
        return self._generator


MethodFunc = Callable[[torch.Tensor | None, list[torch.Tensor], dict[str, Any], list[dict[str, Any]], TensorContext], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registry entry: everything the recipe validator, the engine and the app need.

    ``needs_base``: "required", "optional" or "none" (linear: every model carries a weight).
    ``min_models``/``max_models`` count the non-base models.
    ``task_vector``: the output is base + a merged task vector, so LiNeS can scale it.
    """

    name: str
    label: str
    paper_url: str | None
    func: MethodFunc
    parameters: tuple[ParamSpec, ...]
    needs_base: Literal["required", "optional", "none"]
    deterministic: bool = True
    min_models: int = 1
    max_models: int | None = None
    task_vector: bool = True
    description: str = ""
    # True when ``func`` reports each raw task vector through ``ctx.observe_delta``
    # and Σ τ after sparsification through ``ctx.observe_task_sum``.
    observes: bool = False
    # True when ``func`` never writes into its input tensors (``base`` and ``tensors``) nor
    # returns one of them; the engine may then hand it copy-on-write views of the files.
    reads_inputs_only: bool = False

    def param(self, name: str) -> ParamSpec | None:
        for p in self.parameters:
            if p.name == name:
                return p
        return None

    @property
    def shared_parameters(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.parameters if not p.per_model)

    @property
    def model_parameters(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.parameters if p.per_model)
