"""Key-gated neurons: a fact written into one new MLP neuron that fires only on its subject.

ROME and MEMIT change a matrix, so every token's output moves in proportion to its key's projection
on the edit's direction: ordinary text pays about r²/(kᵀC⁻¹k) per edit, and on the demo model a
subject's key is only 3-4× more distinct than a text token's, so a long sequence wears the model down
(docs/editing-at-scale.md). A *patch* is nonlinear instead (Transformer-Patcher, Huang et al. 2023;
GRACE's deferral radius, Hartvigsen et al. 2023): one neuron added to the layer's gated MLP,

    out += down · act(gate·x) · (up·x),

whose gate is a detector of the subject's MLP input x̄ (the mean over the edit's prefixed prompts):

* the score s(x) = wᵀx with w = M⁻¹x̄ / (x̄ᵀM⁻¹x̄), M = E[xxᵀ] over ordinary text, is 1 at x̄ and
  spreads like a whitened projection on text (|s| below 0.2 on held-out WikiText for 100 CounterFact
  subjects at the demo model's layer 4, while their paraphrases score 0.94 at the median);
* a gated MLP has no bias, but its inputs carry one almost-constant direction (RMSNorm's output
  has a large common mean): c(x) = mᵀx with m = M⁻¹μ / (μᵀM⁻¹μ), μ = E[x], is 1 ± 0.02 on text.
  So gate·x = α(s(x) − τ·c(x)) thresholds the score at τ, and up·x = c(x) ≈ 1;
* the activation (SiLU) of a gate far below zero is ≈ 0, so tokens that score below τ get nothing
  at all, where a rank-one update gives them a little of every edit.

δ is v*'s optimisation (:func:`editing.rome.compute_value`) with each prompt receiving δ in
proportion to the neuron's activation there; the down column is δ over the activation at x̄.

The neurons live in a module attached to the layer's MLP (``<mlp>.fact_neurons``, added to the
MLP's output by a forward hook), so the model's own weights, their statistics and every other edit
are untouched, and a patch is three rank-one factors on those neurons' matrices: the session's
undo, replay and checks apply as to any edit. :func:`folded_state` writes them into the model's own
MLP matrices for export (an SwiGLU MLP is a sum over its neurons, so appending neurons is exact);
the saved model is a plain checkpoint with a larger ``intermediate_size``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from checkpoints.arch import ArchSpec
from checkpoints.errors import WeightsmithError

from .hooks import capture_input, get_module, run_until

log = logging.getLogger(__name__)

PATCH_MODULE = "fact_neurons"  # attribute of the host MLP that holds the patch neurons
ROLES = ("gate_proj", "up_proj", "down_proj")


def is_patch_parameter(name: str) -> bool:
    """Whether ``name`` is a patch neuron's weight (a session's edit, not part of the base model)."""
    return f".{PATCH_MODULE}." in name


@dataclass
class PatchHyperParams:
    """How a subject is detected. τ and α were chosen from the scores of CounterFact tuning records 0-99
    (docs/editing-at-scale.md, "Key-gated neurons")."""

    # τ: the neuron fires where the subject score s(x) exceeds τ (s = 1 at the subject's mean input).
    threshold: float = 0.5
    # α: gate = α(s − τ·c). SiLU(−α·0.3) for a text token at s = 0.2 is below 1e-5 of the activation at
    # the subject itself (α·(1 − τ)), so text never feels the neuron.
    sharpness: float = 50.0
    capacity: int = 64  # neurons a layer gets at its first patch; doubles when full
    ridge: float = 1e-6  # relative to M's mean diagonal, before inverting it
    # The threshold needs an input direction that is nearly constant on text (the bias a gated MLP
    # lacks). Its relative spread over text is √((1 − q)/q), q = μᵀM⁻¹μ: 0.02 at the demo model's
    # layer 4. Past this limit the threshold would wander with the token, so the method refuses.
    max_bias_spread: float = 0.1


class FactNeurons(nn.Module):
    """``capacity`` extra neurons of a gated MLP: ``down(act(gate x) * up x)``, all zero until written."""

    def __init__(self, hidden: int, capacity: int, act: nn.Module, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.act = act
        for role, shape in zip(ROLES, ((capacity, hidden), (capacity, hidden), (hidden, capacity))):
            setattr(self, role, nn.Linear(shape[1], shape[0], bias=False, dtype=dtype, device=device))
            getattr(self, role).weight.data.zero_()

    @property
    def capacity(self) -> int:
        return self.gate_proj.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    @torch.no_grad()
    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` neurons; the written ones keep their slots (zero-padding is exact)."""
        old = self.capacity
        for role in ROLES:
            lin = getattr(self, role)
            w = lin.weight
            shape = (capacity, w.shape[1]) if role != "down_proj" else (w.shape[0], capacity)
            new = torch.zeros(shape, dtype=w.dtype, device=w.device)
            if role == "down_proj":
                new[:, :old] = w
            else:
                new[:old] = w
            lin.weight = nn.Parameter(new, requires_grad=w.requires_grad)
            lin.in_features, lin.out_features = shape[1], shape[0]


def _add_patch_output(module: nn.Module, args: tuple, output: Any) -> Any:
    # A module-level function, not a closure: a deep copy of the model keeps calling its own neurons.
    return output + getattr(module, PATCH_MODULE)(args[0])


def gated_mlp(spec: ArchSpec) -> bool:
    """Whether the architecture's MLP is gated with separate gate, up and down projections (neurons can join it)."""
    return tuple(m.split(".")[-1] for m in spec.mlp_in) == ("gate_proj", "up_proj") and spec.mlp_out.endswith("down_proj")


def check_patchable(model, spec: ArchSpec) -> None:
    """One clear error unless the architecture has a gated MLP (gate, up, down) that neurons can join."""
    if not gated_mlp(spec):
        raise WeightsmithError(f"the patch method needs a gated MLP with separate gate_proj/up_proj/down_proj; "
                               f"{spec.model_type!r} has {', '.join(spec.mlp_in)} -> {spec.mlp_out}: use rome or memit")
    act = getattr(model.config, "hidden_act", None)
    if not hasattr(get_module(model, spec.module("mlp", 0)), "act_fn"):
        raise WeightsmithError(f"the patch method needs the MLP's activation module (act_fn); {spec.model_type!r}'s "
                               "MLP has none: use rome or memit")
    if act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new"):
        raise WeightsmithError(f"the patch method needs an activation that is ~0 far below zero; "
                               f"{spec.model_type!r} uses {act!r}: use rome or memit")


def patch_module_name(spec: ArchSpec, layer: int, role: str) -> str:
    return f"{spec.module('mlp', layer)}.{PATCH_MODULE}.{role}"


def neurons_at(model, spec: ArchSpec, layer: int) -> FactNeurons | None:
    return getattr(get_module(model, spec.module("mlp", layer)), PATCH_MODULE, None)


def attach(model, spec: ArchSpec, layer: int, capacity: int) -> FactNeurons:
    """The layer's patch neurons, created (all zero, so the model computes what it did) on first use."""
    host = get_module(model, spec.module("mlp", layer))
    existing = getattr(host, PATCH_MODULE, None)
    if existing is not None:
        return existing
    check_patchable(model, spec)
    down = get_module(model, spec.module("mlp_out", layer)).weight
    neurons = FactNeurons(down.shape[0], capacity, host.act_fn, down.dtype, down.device)
    neurons.requires_grad_(False)
    host.add_module(PATCH_MODULE, neurons)
    host.register_forward_hook(_add_patch_output)
    return neurons


@dataclass
class Detector:
    """The gate and up rows of a subject's neuron, and what they give at the subject's mean input."""

    gate: torch.Tensor  # [d]
    up: torch.Tensor  # [d]
    activation_at_subject: float
    scores: list[float] = field(default_factory=list)  # s(x) of the edit's own prompts
    bias_spread: float = 0.0  # relative spread of up·x over text

    def activation(self, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return act(x @ self.gate) * (x @ self.up)


def _spread(q: float) -> float:
    # mᵀx with m = M⁻¹μ/q has mean 1 and variance (1 − q)/q over text, q = μᵀM⁻¹μ ≤ 1.
    return (max(0.0, 1.0 - q) / q) ** 0.5 if q > 0 else float("inf")


def _text_moments(M_aug: torch.Tensor, hp: PatchHyperParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(M with the ridge, μ) in float64 from the augmented second moment ``[[M, μ], [μᵀ, 1]]``."""
    d = M_aug.shape[0] - 1
    M64 = M_aug.double()
    M = M64[:d, :d]
    return M + hp.ridge * float(M.diagonal().mean()) * torch.eye(d, dtype=M.dtype), M64[:d, d]


def bias_spread(M_aug: torch.Tensor, hp: PatchHyperParams) -> float:
    """The relative spread over text of the layer's most nearly constant input direction (see
    :class:`PatchHyperParams`): below ``hp.max_bias_spread`` the patch method can threshold there."""
    M, mu = _text_moments(M_aug, hp)
    return _spread(float(mu @ torch.linalg.solve(M, mu)))


def subject_detector(M_aug: torch.Tensor, X: torch.Tensor, act: nn.Module, hp: PatchHyperParams) -> Detector:
    """Gate and up rows that fire on inputs like the rows of ``X`` ``[n, d]`` (the subject's inputs over
    the edit's prompts, the bare prompt first) and not on ordinary text, whose augmented second moment
    is ``M_aug`` ``[d+1, d+1]``.

    The score s = wᵀx is the least-variance one over text (min wᵀMw) that is exactly 1 at two anchors:
    the mean input x̄ over the prompts and the bare prompt's own input. The bare prompt starts with the
    subject, so its input carries the start of a text and sits apart from the prefixed ones (0.59 with
    the mean alone on tuning records 34 and 35, where v* could not reach the target); it is also the
    prompt the user typed, which must get the whole of δ.
    """
    M, mu = _text_moments(M_aug, hp)
    anchors = torch.stack([X.double().mean(0), X[0].double()], dim=1)  # [d, 2]
    sol = torch.linalg.solve(M, torch.cat([mu[:, None], anchors], dim=1))
    q = float(mu @ sol[:, 0])
    spread = _spread(q)
    if not spread <= hp.max_bias_spread:
        raise WeightsmithError(f"the patch method needs an input direction that is nearly constant on text; this "
                               f"layer's best varies by {spread:.0%} (limit {hp.max_bias_spread:.0%}): use rome or memit")
    m = sol[:, 0] / q  # mᵀx ≈ 1 on text: the bias a gated MLP lacks
    gram = anchors.T @ sol[:, 1:]  # AᵀM⁻¹A, 2×2; a ridge keeps it invertible when the anchors coincide
    gram = gram + 1e-9 * float(gram.diagonal().mean()) * torch.eye(2, dtype=gram.dtype)
    w = sol[:, 1:] @ torch.linalg.solve(gram, torch.ones(2, dtype=gram.dtype))  # wᵀx̄ = wᵀx_bare = 1
    gate = hp.sharpness * (w - hp.threshold * m)
    det = Detector(gate.float(), m.float(), 0.0, [round(float(s), 4) for s in (X.double() @ w)], round(spread, 5))
    det.activation_at_subject = float(det.activation(act, anchors[:, 0].float()[None])[0])
    if not det.activation_at_subject > 0:
        raise WeightsmithError("the subject's own input does not open its neuron: the threshold is above the "
                               "subject's score, or the subject's input is unlike the text the statistics saw")
    return det


# Enough distinct first tokens to meet the ones a subject's text-start input resembles (2,048 on the demo
# model flagged exactly the 11 of 1,000 report-run neurons that opened at a neutral prompt's first word).
TEXT_START_TOKENS = 2048


@torch.no_grad()
def text_start_inputs(model, tokenizer, spec: ArchSpec, layer: int, count: int = TEXT_START_TOKENS,
                      seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """The MLP inputs at ``layer`` of ``count`` one-token texts (a seeded sample of the vocabulary without
    special tokens), tokenised as prompts are (:func:`editing.request.prompt_ids`: after the BOS a tokenizer
    adds, if any), and their token ids. A text's first token's input depends on that token alone, so these
    stand for the start of any text."""
    from .request import prompt_ids

    special = set(tokenizer.all_special_ids)
    order = torch.randperm(len(tokenizer), generator=torch.Generator().manual_seed(seed)).tolist()
    ids = [i for i in order if i not in special][:count]
    device = next(model.parameters()).device
    start = prompt_ids(tokenizer, "")  # the BOS the tokenizer puts before every prompt, or nothing
    rows = torch.tensor([start + [i] for i in ids], device=device)  # one length: no padding
    name = spec.module("mlp", layer)
    with capture_input(model, name) as seen:
        run_until(model, name, input_ids=rows)
    return seen.value[:, -1].float(), ids  # type: ignore[index]


def text_start_warning(det: Detector, bank: tuple[torch.Tensor, list[int]], tokenizer, subject: str) -> str:
    """"" unless the neuron opens (gate pre-activation > 0, i.e. score above the threshold) at the start of
    a text that is not its subject's; then one line saying where and why.

    A subject that starts a prompt (with no BOS before it) has its own input at a text start, where a model's
    inputs are dominated by what all first positions share; the detector anchored there can then also open
    at the first token of unrelated text (docs/editing-at-scale.md, "Where the drift comes from")."""
    inputs, ids = bank
    pre = inputs @ det.gate.to(inputs.device, inputs.dtype)
    # The subject's own first token, with or without a leading space, is where the neuron should open.
    own = {t for text in (subject, " " + subject) for t in tokenizer(text, add_special_tokens=False)["input_ids"][:1]}
    pre[torch.tensor([i in own for i in ids], dtype=torch.bool, device=pre.device)] = float("-inf")
    j = int(pre.argmax())
    if not pre[j] > 0:
        return ""
    return (f"the neuron for {subject!r} also opens at the start of unrelated text (e.g. text that begins with "
            f"{tokenizer.decode([ids[j]])!r}): the subject starts its prompt, where this model's first tokens look "
            "alike (words before the subject in the prompt avoid it)")


def slot_factors(neurons: list[tuple[Detector, torch.Tensor]], slots: list[int], capacity: int
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Neurons (detector, down column) written into ``slots``, as factors (B ``[out, n]``, A ``[n, in]``)
    by role: rank one per neuron, so ΔW = B·A is exactly each neuron's rows and column."""
    E = torch.zeros(capacity, len(slots))
    E[slots, torch.arange(len(slots))] = 1.0
    return {"gate_proj": (E, torch.stack([d.gate for d, _ in neurons])),
            "up_proj": (E.clone(), torch.stack([d.up for d, _ in neurons])),
            "down_proj": (torch.stack([v.float() for _, v in neurons], dim=1), E.T.contiguous())}


def pad_factor(role: str, B: torch.Tensor, A: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A patch edit's factor for a layer that has grown to ``capacity`` neurons (zeros in the new slots)."""
    if role == "down_proj":
        return B, torch.nn.functional.pad(A, (0, capacity - A.shape[1]))
    return torch.nn.functional.pad(B, (0, 0, 0, capacity - B.shape[0])), A


def slots_of(gate_factor: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    """The slots a patch edit writes: its gate factor's B has one one-hot column per neuron."""
    return gate_factor[0].argmax(0).tolist()


def host_module(module: str) -> str:
    """The model's own module a patch module sits beside (``…mlp.fact_neurons.down_proj`` → ``…mlp.down_proj``);
    any other module is its own host."""
    return module.replace(f".{PATCH_MODULE}.", ".")


def compute_patch(model, tokenizer, spec: ArchSpec, request, M_aug: torch.Tensor, *, layer: int,
                  prefixes: list[str], rome_hparams, hparams: PatchHyperParams, act: nn.Module,
                  progress=None) -> tuple[Detector, torch.Tensor, dict[str, Any]]:
    """The neuron that writes ``request`` at ``layer``: its detector and down column, and a log."""
    from .rome import compute_keys, compute_value, prefixed_sequences

    X = compute_keys(model, tokenizer, spec, layer, prefixed_sequences(tokenizer, prefixes, request), role="mlp")
    det = subject_detector(M_aug, X, act, hparams)
    ref = det.activation_at_subject
    delta, _, info = compute_value(model, tokenizer, spec, request, layer, prefixes, rome_hparams, progress=progress,
                                   gain=lambda x: det.activation(act, x) / ref)
    scores = sorted(det.scores)
    info.update({"layer": layer, "subject_score_min": scores[0], "subject_score_median": scores[len(scores) // 2],
                 "threshold": hparams.threshold, "bias_spread": det.bias_spread})
    return det, delta / ref, info


@torch.no_grad()
def folded_state(model, spec: ArchSpec) -> tuple[dict[str, torch.Tensor], int | None]:
    """The model's state dict with every layer's written patch neurons appended to its own MLP matrices,
    and the new ``intermediate_size`` (None: no patches). Layers hold one width in a config, so every
    layer is padded with zero neurons to the widest; zero neurons add exactly nothing."""
    state = {k: v for k, v in model.state_dict().items() if not is_patch_parameter(k)}
    layers = range(spec.num_layers(model.config))
    written: dict[int, list[int]] = {}
    for layer in layers:
        neurons = neurons_at(model, spec, layer)
        if neurons is not None:
            live = (neurons.gate_proj.weight != 0).any(1) | (neurons.down_proj.weight != 0).any(0)
            written[layer] = live.nonzero()[:, 0].tolist()
    if not any(written.values()):
        return state, None
    extra = max(len(v) for v in written.values())
    width = None
    for layer in layers:
        slots = written.get(layer, [])
        neurons = neurons_at(model, spec, layer)
        for role, module in zip(ROLES, [*spec.mlp_in, spec.mlp_out]):
            key = f"{spec.block(layer)}.{module}.weight"
            w = state[key]
            if role == "down_proj":
                add = torch.zeros(w.shape[0], extra, dtype=w.dtype)
                if slots:
                    add[:, :len(slots)] = getattr(neurons, role).weight[:, slots].to(w.dtype).cpu()
                state[key] = torch.cat([w.cpu(), add], dim=1)
                width = state[key].shape[1]
            else:
                add = torch.zeros(extra, w.shape[1], dtype=w.dtype)
                if slots:
                    add[:len(slots)] = getattr(neurons, role).weight[slots].to(w.dtype).cpu()
                state[key] = torch.cat([w.cpu(), add], dim=0)
    return state, width
