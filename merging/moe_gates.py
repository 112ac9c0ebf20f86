"""Router rows of a mixture of experts, as ``mergekit-moe`` computes them (its gate modes).

Each function returns ``[layers, experts, hidden]`` float32: row ``e`` of layer ``l``'s router.

- ``random``: standard normal, from a seeded generator (mergekit draws from the global RNG).
- ``uniform_random``: U(-1/sqrt(hidden), 1/sqrt(hidden)), ``nn.Linear``'s initialisation.
- ``cheap_embed``: the sum of the base's token embeddings over every token of an expert's positive
  prompts (BOS + prompt), normalised; minus the same for the negative prompts; normalised again.
  The same row for every layer.
- ``hidden``: the base model's hidden state entering each layer (``hidden_states[:-1]``) at the last
  token of each prompt, averaged over the prompts; positive minus negative, normalised per layer.
  ``hidden_avg`` averages over the prompt's tokens instead of taking the last one. Computed in float32.

mergekit runs the prompts as one left-padded batch (pad = BOS); here each prompt runs alone, so no
padding shifts positions. With equal-length prompts the two agree.

Example::

    rows = gate_rows(spec, base_ckpt, mode="hidden", device="cpu", seed=0)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Job, ensure
from checkpoints.sources import LocalCheckpoint

log = logging.getLogger(__name__)

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
PROMPTLESS_MODES = ("random", "uniform_random")
DEGENERATE_CONDITION = 5.0  # mergekit's threshold on the condition number of a layer's router


@dataclass(frozen=True)
class Prompts:
    """What one expert is for: prompts routed to it (positive) and away from it (negative)."""

    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()


def _normalise(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def random_rows(layers: int, experts: int, hidden: int, *, mode: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    if mode == "random":
        return torch.randn((layers, experts, hidden), generator=g)
    scale = math.sqrt(1.0 / hidden)
    return torch.rand((layers, experts, hidden), generator=g) * 2 * scale - scale


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The ids mergekit routes by: BOS (when the tokenizer has one) + prompt, no other special tokens."""
    ids = tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise WeightsmithError(f"prompt {prompt!r} has no tokens")
    return list(ids)


def _prompt_rows(encode, prompts: Prompts) -> torch.Tensor:
    """``encode(prompt_list)`` of the positive prompts minus that of the negative ones, normalised."""
    rows = encode(prompts.positive)
    if prompts.negative:
        rows = rows - encode(prompts.negative)
    return _normalise(rows)


def cheap_embed_rows(embed: torch.Tensor, tokenizer, experts: list[Prompts], layers: int) -> torch.Tensor:
    """``[layers, experts, hidden]`` from the embedding matrix ``embed`` (``[vocab, hidden]``)."""
    def encode(prompts: tuple[str, ...]) -> torch.Tensor:
        ids = torch.tensor([i for p in prompts for i in prompt_ids(tokenizer, p)])
        if int(ids.max()) >= embed.shape[0]:
            raise WeightsmithError("a prompt token is outside the base model's embedding matrix")
        return _normalise(embed.float()[ids].sum(dim=0))

    rows = torch.stack([_prompt_rows(encode, e) for e in experts])  # [experts, hidden]
    return rows.unsqueeze(0).repeat(layers, 1, 1)


def hidden_rows(model, tokenizer, experts: list[Prompts], *, average: bool, device: str | torch.device,
                job: Job | None = None) -> torch.Tensor:
    """``[layers, experts, hidden]`` from ``model``'s hidden states entering each layer."""
    job = ensure(job)
    total = sum(len(e.positive) + len(e.negative) for e in experts)
    done = 0

    def encode(prompts: tuple[str, ...]) -> torch.Tensor:
        nonlocal done
        per_prompt = []
        for p in prompts:
            job.check("the gate prompts")
            ids = torch.tensor([prompt_ids(tokenizer, p)], device=device)
            with torch.no_grad():
                out = model(input_ids=ids, output_hidden_states=True, return_dict=True)
            states = torch.stack(out.hidden_states[:-1]).float()[:, 0]  # [layers, seq, hidden]
            per_prompt.append(states.mean(dim=1) if average else states[:, -1])
            done += 1
            job.step(done, total, "gate prompts")
        return torch.stack(per_prompt).mean(dim=0).cpu()  # [layers, hidden]

    return torch.stack([_prompt_rows(encode, e) for e in experts], dim=1)


def degenerate_layers(rows: torch.Tensor, threshold: float = DEGENERATE_CONDITION) -> list[int]:
    """Layers whose router rows are nearly dependent (condition number above ``threshold``, as
    mergekit warns): some experts will seldom be chosen there."""
    return [i for i in range(rows.shape[0]) if float(torch.linalg.cond(rows[i].float())) > threshold]


def gate_rows(mode: str, base: LocalCheckpoint, experts: list[Prompts], *, seed: int = 0,
              device: str | torch.device = "cpu", job: Job | None = None) -> torch.Tensor:
    """The router rows of every layer for ``mode`` (one of :data:`GATE_MODES`) from ``base``."""
    layers = base.num_layers
    hidden = int(base.config.get("hidden_size", 0))
    if mode in PROMPTLESS_MODES:
        return random_rows(layers, len(experts), hidden, mode=mode, seed=seed)
    tokenizer = base.load_tokenizer()
    if mode == "cheap_embed":
        embed_name = f"{base.spec.embeddings[0]}.weight"
        return cheap_embed_rows(base.reader().get(embed_name), tokenizer, experts, layers)
    if mode in ("hidden", "hidden_last", "hidden_avg"):
        model = base.load_model(device=device, dtype=torch.float32)
        try:
            return hidden_rows(model, tokenizer, experts, average=mode == "hidden_avg", device=device, job=job)
        finally:
            del model
    raise WeightsmithError(f"unknown gate_mode {mode!r}: choose one of {', '.join(GATE_MODES)}")
