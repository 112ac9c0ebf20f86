"""ROME in three steps: key k*, value v*, rank-one update (Meng et al. 2022).

* :func:`compute_key` — input of the MLP down projection at the subject's last
  token, averaged over the bare prompt and ~20 prefixes the model samples;
* :func:`compute_value` — v* = W k* + δ, with δ optimised (Adam) as an
  addition to that module's output at the subject's last token, so that the
  model predicts the new target after every prefixed prompt, while a KL term
  on "{subject} is a" keeps what else the model says about the subject;
* :func:`rank_one_update` — ΔW = (v* − W k)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k), in the
  ``[out, in]`` view (GPT-2's Conv1D is converted by the architecture map).
  The direction is always C⁻¹k* (k* the mean key); ``k`` is where the update is
  made exact. The paper's equation takes k = k*; the authors' code takes the
  bare prompt's own key, so the edited prompt gets exactly δ whatever its key's
  angle to the mean (``RomeHyperParams.update_at``, default "prompt"). r-ROME
  (Gupta et al. 2024, method ``r-rome`` in :mod:`editing.methods`) is
  ``update_at="mean"``: that mismatch between the key v* was optimised for and the
  key the update is exact at is what they found behind *disabling edits*.

Speed on a CPU comes from where the optimisation spends no work: δ only
changes positions from the subject's last token on, so everything before it
is run once and kept as a key/value cache; each step runs only the remaining
tokens, computes vocabulary logits only at the target positions (and the one
KL position), takes no weight gradients, and stops early.

Example::

    prefixes = generate_prefixes(model, tok)
    result = compute_rome(model, tok, spec, EditRequest("{} is in", "Eiffel Tower", "Rome"), C, prefixes=prefixes)
    # result.B [out], result.A [in]:  ΔW = outer(B, A)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from checkpoints.arch import ArchSpec
from checkpoints.errors import WeightsmithError
from checkpoints.perplexity import right_padded

from .hooks import StopForward, capture_input, forward_with_cache, get_module, patch_output, stop_after
from .request import EditRequest, Tokenised, fill, pad_id, start_token_id, target_ids, tokenise

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

# Edited layer by (model_type, number of layers), measured with causal tracing and
# CounterFact edits where we could (SmolLM2-135M); else the authors' choices.
DEFAULT_LAYER: dict[tuple[str, int], int] = {
    # SmolLM2-135M(-Instruct): the mean MLP indirect effect (window 10) at the subject's last token
    # peaks at layers 4-5 (0.203/0.207, bench/trace_layers.py, 6 known facts); on 25 CounterFact
    # records layers 3/4/5/6 give ES/PS/NS 1.00/0.84/0.64, 1.00/0.96/0.64, 1.00/0.92/0.64,
    # 1.00/0.92/0.64 (bench/rome_counterfact.py, update_at="mean"): 4 has the best paraphrase score.
    ("llama", 30): 4,
    ("gpt2", 48): 17,  # GPT-2 XL (authors)
    ("gpt2", 24): 8,  # GPT-2 medium (authors)
    ("gpt2", 12): 5,
    ("llama", 32): 5,  # Llama-7B (EasyEdit)
    ("gptj", 28): 5,
}


def default_layer(model_type: str, num_layers: int) -> int:
    """The layer ROME edits when the user names none (table, else a fraction of the depth)."""
    if (model_type, num_layers) in DEFAULT_LAYER:
        return DEFAULT_LAYER[(model_type, num_layers)]
    # Factual recall sits in early-middle MLPs: about a sixth of the way up in rotary
    # models, a third in GPT-2 (the authors' choices above).
    frac = 0.35 if model_type == "gpt2" else 0.16
    return max(0, min(num_layers - 1, round(frac * (num_layers - 1))))


def plausible_layers(model_type: str, num_layers: int) -> range:
    """Layers where a ROME edit of a fact is plausible: the early-middle MLPs.

    Every published choice (GPT-2 medium/XL 8/17, GPT-J 5, Llama-7B 5) and our
    SmolLM2 traces (peak 4-5 of 30) lie between 10% and 45% of the depth; the
    lowest layers are left out because restoring them restores the (noised)
    token embeddings themselves. Always includes :func:`default_layer`.
    """
    lo = max(1, round(0.10 * num_layers)) if num_layers > 2 else 0
    hi = max(lo + 1, round(0.45 * num_layers) + 1)
    d = default_layer(model_type, num_layers)
    return range(min(lo, d), min(num_layers, max(hi, d + 1)))


@dataclass
class RomeHyperParams:
    """ROME settings; defaults tuned on SmolLM2-135M from the authors' table (GPT-2/GPT-J/Llama)."""

    v_lr: float = 1.0  # authors: 0.5; 1.0 needs fewer steps on SmolLM2 with the same quality
    v_steps: int = 20
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    v_weight_decay: float = 1e-3
    early_stop_loss: float = 5e-2
    # When v*'s optimisation stops: "loss" once the target NLL is below early_stop_loss (the authors'
    # rule); "argmax" as soon as every target token is the most probable one in every prompt of the
    # loss (MPES, Gupta et al. 2025, "Lifelong Sequential Knowledge Editing without Model
    # Degradation"): a smaller δ, so a smaller update, which is what keeps long sequences sound.
    early_stop: str = "loss"
    # How δ is optimised. "adam" (the authors'): per-coordinate steps of v_lr, so δ grows dense and on
    # SmolLM2 always ends at the clamp (‖δ‖ = clamp_norm_factor·‖v‖, 75-98 for MEMIT's layer 5).
    # "lbfgs": L-BFGS from δ = 0 on the same loss plus v_norm_penalty·‖δ‖²/‖v‖², which finds a δ that
    # reaches the same target NLL with a quarter (penalty 25) to a half (penalty 5) of the norm; v_steps
    # then counts the loss evaluations, line-search ones included. Not the default: in a MEMIT sequence
    # the smaller updates drifted as far from the unedited model (docs/editing-at-scale.md), so what
    # Adam adds on top is inert, and L-BFGS costs more evaluations.
    v_optimizer: str = "adam"
    v_norm_penalty: float = 25.0
    prefix_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))  # (tokens, how many)
    # Prefixed prompts in v*'s loss (None = all 20). k* always averages over all of them; 5 in
    # the loss cost a quarter of the time with the same CounterFact scores on SmolLM2 (bench).
    v_prompts: int | None = 5
    seed: int = 0
    mom2_ridge: float = 0.0  # added to C's diagonal (relative to its mean diagonal); 0 = plain C⁻¹
    # Where ΔW must reproduce v* exactly: "prompt" (the bare prompt's key, as the authors' code
    # does) or "mean" (k*, the paper's equation). With "mean" the bare prompt only receives
    # δ·(u·k)/(u·k*), which on SmolLM2 left 3 of 50 CounterFact edits short of the target.
    update_at: str = "prompt"
    # What ΔW must produce at that key (matters only with update_at="mean"): "key" is v* = W k* + δ,
    # so the prompts' mean output moves by exactly the δ the optimisation added to each of them;
    # "prompt" is v* = W k(s) + δ, as the r-ROME authors' code does (its v* starts from the bare
    # prompt's output), which adds W (k(s) − k*) to the change at k*.
    value_from: str = "key"


@dataclass
class RomeResult:
    """A computed (not yet applied) ROME edit of module ``module``: ΔW[out,in] = outer(B, A)."""

    layer: int
    module: str
    B: torch.Tensor  # [out]
    A: torch.Tensor  # [in]
    info: dict[str, Any] = field(default_factory=dict)
    key: torch.Tensor | None = None  # k*, kept by the session as a key later AlphaEdit edits preserve

    def delta_out_in(self) -> torch.Tensor:
        return self.B[:, None] * self.A[None, :]


# -- prefixes ------------------------------------------------------------------------------------------
def _start_ids(tokenizer) -> list[int]:
    return [start_token_id(tokenizer)]


@torch.no_grad()
def generate_prefixes(model, tokenizer, lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10)), *,
                      seed: int = 0, top_k: int = 5) -> list[str]:
    """Short texts the model writes itself (top-k sampling, seeded), used as "{prefix}. {prompt}"."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    special = sorted(set(tokenizer.all_special_ids))
    out: list[str] = []
    for n_tokens, count in lengths:
        ids = torch.tensor([_start_ids(tokenizer)] * count, device=device)
        past = None
        cur = ids
        for _ in range(n_tokens):
            o, past = forward_with_cache(model, past, input_ids=cur)
            logits = o.logits[:, -1, :].float().cpu()
            logits[:, special] = float("-inf")
            top = logits.topk(top_k, dim=-1)
            pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)
            cur = top.indices.gather(1, pick).to(device)
            ids = torch.cat([ids, cur], dim=1)
        for row in ids[:, 1:]:
            text = tokenizer.decode(row.tolist(), skip_special_tokens=True)
            text = " ".join(text.replace("{", " ").replace("}", " ").split())
            out.append(text)
    return out


def loss_prefixes(prefixes: list[str], v_prompts: int | None) -> list[str]:
    """The prefixes v*'s loss uses: all of them, or an even spread of ``v_prompts`` of them (which keeps
    both lengths, 5 and 10 tokens, in the loss)."""
    if v_prompts is None or v_prompts >= len(prefixes):
        return prefixes
    return [prefixes[(i * len(prefixes)) // v_prompts] for i in range(v_prompts)]


def prefixed(prefixes: list[str], text: str) -> list[str]:
    """The bare prompt followed by each "{prefix}. {prompt}"."""
    return [text] + [f"{p}. {text}" for p in prefixes]


def prefixed_sequences(tokenizer, prefixes: list[str], request: EditRequest,
                       target: list[int] | None = None) -> list[Tokenised]:
    """:func:`prefixed` texts of ``request`` tokenised, each with the subject located in its prompt part
    (a prefix may itself contain the subject's words), and ``target`` appended if given."""
    return [tokenise(tokenizer, t, request.subject, target=target,
                     subject_at=len(t) - len(request.text) + request.text.find(request.subject))
            for t in prefixed(prefixes, request.text)]


# -- batching ------------------------------------------------------------------------------------------
@torch.no_grad()
def compute_keys(model, tokenizer, spec: ArchSpec, layer: int, seqs: list[Tokenised], *,
                 role: str = "mlp_out") -> torch.Tensor:
    """Down-projection inputs of ``layer`` at each sequence's subject-last token: ``[n, in]``
    (``role="mlp"``: the MLP's own inputs, what a patch neuron's gate reads)."""
    device = next(model.parameters()).device
    ids, mask = right_padded([s.ids for s in seqs], pad_id(tokenizer))
    name = spec.module(role, layer)  # type: ignore[arg-type]
    with capture_input(model, name) as seen, stop_after(model, name):
        try:
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        except StopForward:
            pass
    idx = torch.tensor([s.subject_last for s in seqs], device=device)
    return seen.value[torch.arange(len(seqs), device=device), idx].float()  # type: ignore[index]


class SplitBatch:
    """Sequences run as a cached, unchanging head plus a "live" tail re-run on every call.

    Row ``i`` is split at ``split[i]``: tokens before it do not depend on what
    we optimise, so they run once (left-padded) and their keys/values are
    cached; :meth:`run` feeds the tails (right-padded) on top of that cache.
    """

    def __init__(self, model, tokenizer, rows: list[list[int]], split: list[int]):
        from transformers import DynamicCache

        self.model = model
        self.base = model.base_model
        self.device = next(model.parameters()).device
        pad = pad_id(tokenizer)
        heads = [r[:s] for r, s in zip(rows, split)]
        tails = [r[s:] for r, s in zip(rows, split)]
        self.head_len = torch.tensor([len(h) for h in heads])
        width = int(self.head_len.max())
        self.head_mask = torch.zeros(len(rows), width, dtype=torch.long)
        self.kv = None
        if width:
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            for i, h in enumerate(heads):
                if h:
                    ids[i, width - len(h):] = torch.tensor(h)
                    self.head_mask[i, width - len(h):] = 1
            pos = (self.head_mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                _, cache = forward_with_cache(self.base, None, input_ids=ids.to(self.device),
                                              attention_mask=self.head_mask.to(self.device),
                                              position_ids=pos.to(self.device))
            self.kv = [(layer.keys, layer.values) for layer in cache.layers]
            self._cache_cls = DynamicCache
        self.tail_ids, self.tail_mask = right_padded(tails, pad)
        self.tail_pos = self.head_len[:, None] + torch.arange(self.tail_ids.shape[1])[None, :]

    def run(self) -> torch.Tensor:
        """Final hidden states (after the final norm) of the tails: ``[rows, tail_len, hidden]``."""
        cache = None
        if self.kv is not None:
            cache = self._cache_cls(ddp_cache_data=self.kv, config=self.model.config)
        mask = torch.cat([self.head_mask, self.tail_mask], dim=1)
        out, _ = forward_with_cache(self.base, cache, use_cache=cache is not None,
                                    input_ids=self.tail_ids.to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=self.tail_pos.to(self.device))
        return out.last_hidden_state


def _target_positions(seqs: list[Tokenised], split: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols, tgts = [], [], []
    for i, (s, cut) in enumerate(zip(seqs, split)):
        for j, t in enumerate(s.target):
            rows.append(i)
            cols.append(s.prompt_len - 1 + j - cut)
            tgts.append(t)
    return torch.tensor(rows), torch.tensor(cols), torch.tensor(tgts)


def compute_value(model, tokenizer, spec: ArchSpec, request: EditRequest, layer: int, prefixes: list[str],
                  hparams: RomeHyperParams, *, module: str | None = None, progress: Progress | None = None,
                  gain: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Optimise δ added to ``module``'s output at the subject's last token.

    ``module`` defaults to ``layer``'s down projection (ROME); MEMIT passes the
    block itself. Returns ``(delta, v_init, info)``: the change of that
    output, the output itself on the bare prompt, and a log (losses, steps,
    target probabilities before/after).

    ``gain`` maps the layer's MLP inputs at the prompts' subject-last tokens ``[rows, d]`` to how
    much of δ each prompt receives ``[rows]`` (default: all of it): a key-gated neuron
    (:mod:`editing.patch`) adds δ in proportion to its activation, so v* is optimised for that.
    """
    if hparams.early_stop not in ("loss", "argmax"):
        raise WeightsmithError(f"early_stop must be 'loss' or 'argmax', not {hparams.early_stop!r}")
    if hparams.v_optimizer not in ("adam", "lbfgs"):
        raise WeightsmithError(f"v_optimizer must be 'adam' or 'lbfgs', not {hparams.v_optimizer!r}")
    device = next(model.parameters()).device
    module = module or spec.module("mlp_out", layer)
    tgt = target_ids(tokenizer, request.target)
    prefixes = loss_prefixes(prefixes, hparams.v_prompts)
    seqs = prefixed_sequences(tokenizer, prefixes, request, tgt)
    kl_text = fill("{} is a", request.subject)
    kl = tokenise(tokenizer, kl_text, request.subject, subject_at=0)
    all_seqs = seqs + [kl]
    split = [s.subject_last for s in all_seqs]
    batch = SplitBatch(model, tokenizer, [s.ids for s in all_seqs], split)
    rows, cols, tg = _target_positions(seqs, split[:-1])
    rows, cols, tg = rows.to(device), cols.to(device), tg.to(device)
    n_tgt = torch.bincount(rows, minlength=len(seqs)).float()
    kl_row, kl_col = len(seqs), kl.prompt_len - 1 - kl.subject_last
    head = model.get_output_embeddings()

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            hidden = _run_capturing(batch, model, module)
            h0, v_out = hidden
            v_init = v_out[0, 0].float().clone()
            ref_logp = F.log_softmax(head(h0[kl_row, kl_col]).float(), -1)
            lp0 = F.log_softmax(head(h0[rows, cols]).float(), -1).gather(-1, tg[:, None])[:, 0]
            prob_before = float(torch.exp(_per_prompt_mean(lp0, rows, n_tgt)).mean())
            sel = torch.zeros(1, batch.tail_ids.shape[1], 1, device=device)
            sel[0, 0, 0] = 1.0  # every tail starts at the subject's last token
            if gain is not None:
                with capture_input(model, spec.module("mlp", layer)) as seen:
                    batch.run()
                sel = sel * gain(seen.value[:, 0].float())[:, None, None]
        delta = torch.zeros_like(v_init, requires_grad=True)
        max_norm = hparams.clamp_norm_factor * v_init.norm()
        v_sq = v_init.norm() ** 2 + 1e-12
        losses: list[float] = []
        t0 = time.time()

        def evaluate() -> tuple[torch.Tensor, bool]:
            """The loss at the current δ (recorded in ``losses``) and whether v*'s stopping rule is met."""
            with patch_output(model, module, lambda y: y + sel.to(y.dtype) * delta.to(y.dtype)):
                h = batch.run()
            logits = head(h[rows, cols]).float()
            lp = F.log_softmax(logits, -1).gather(-1, tg[:, None])[:, 0]
            nll = -_per_prompt_mean(lp, rows, n_tgt).mean()
            logp_kl = F.log_softmax(head(h[kl_row, kl_col]).float(), -1)
            kl_loss = F.kl_div(logp_kl, ref_logp, log_target=True, reduction="sum")
            loss = nll + hparams.kl_factor * kl_loss + hparams.v_weight_decay * delta.norm() / v_sq
            if hparams.v_optimizer == "lbfgs":
                loss = loss + hparams.v_norm_penalty * (delta ** 2).sum() / v_sq
            losses.append(round(float(nll.detach()), 4))
            if progress:
                progress(min(1.0, len(losses) / hparams.v_steps),
                         f"optimising v* (step {len(losses)}, target NLL {losses[-1]:.3f})")
            done = losses[-1] < hparams.early_stop_loss or (
                hparams.early_stop == "argmax" and bool((logits.argmax(-1) == tg).all()))
            return loss, done

        if hparams.v_optimizer == "adam":
            opt = torch.optim.Adam([delta], lr=hparams.v_lr)
            for _ in range(hparams.v_steps):
                opt.zero_grad()
                loss, done = evaluate()
                if done:
                    break
                loss.backward()
                opt.step()
                _clamp_norm(delta, max_norm)
        else:
            _optimise_lbfgs(delta, evaluate, hparams.v_steps)
            _clamp_norm(delta, max_norm)  # the same bound as Adam's (rarely reached: the penalty keeps δ small)
        steps = len(losses)
        prob_after = float(torch.exp(-torch.tensor(losses[-1]))) if losses else prob_before
    finally:
        for p in params:
            p.requires_grad_(True)
    info = {"nll": losses, "steps": steps, "seconds_v": round(time.time() - t0, 3),
            "target_prob_before": round(prob_before, 5), "target_prob_after_geomean": round(prob_after, 5),
            "delta_norm": round(float(delta.detach().norm()), 5), "v_init_norm": round(float(v_init.norm()), 5),
            "prompts": len(seqs)}
    return delta.detach(), v_init, info


@torch.no_grad()
def _clamp_norm(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    n = delta.norm()
    if n > max_norm:
        delta.mul_(max_norm / n)


class _StopRuleMet(Exception):
    """Raised from L-BFGS's closure at the first evaluated δ that meets v*'s stopping rule."""


def _optimise_lbfgs(delta: torch.Tensor, evaluate: Callable[[], tuple[torch.Tensor, bool]], max_evals: int) -> None:
    """Minimise ``evaluate()``'s loss over ``delta`` in place with L-BFGS, stopping at the first evaluated
    point (line-search trial points included) where the stopping rule holds; that point is kept.

    torch's LBFGS has no hook to end early from inside a line search, so the closure raises and the
    optimiser's state is dropped (each v* is a fresh problem). Every point the line search tries is a
    complete candidate δ, so keeping the one that met the rule is sound."""
    opt = torch.optim.LBFGS([delta], lr=1.0, max_iter=max_evals, max_eval=max_evals, history_size=10,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss, done = evaluate()
        if done:
            raise _StopRuleMet
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except _StopRuleMet:
        pass


def _per_prompt_mean(lp: torch.Tensor, rows: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(n), device=lp.device, dtype=lp.dtype).index_add(0, rows, lp) / n.to(lp.device)


def _run_capturing(batch: SplitBatch, model, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    from .hooks import capture_output

    with capture_output(model, module) as seen:
        h = batch.run()
    return h, seen.value  # type: ignore[return-value]


def rank_one_update(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, C: torch.Tensor, *,
                    ridge: float = 0.0, at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ΔW = (v − W a)(C⁻¹k)ᵀ / ((C⁻¹k)ᵀ a) for ``W`` in ``[out, in]``, with ``a = at`` (default ``k``).

    ``k`` sets the direction C⁻¹k; ``(W + ΔW) a = v`` holds exactly. Returns
    ``(B [out], A [in])`` in float32 with ΔW = outer(B, A) exactly, so the
    rank-one LoRA export (B·A) is the same update. Solved in float64.
    """
    C64 = C.double()
    if ridge:
        C64 = C64 + ridge * C64.diagonal().mean() * torch.eye(C64.shape[0], dtype=C64.dtype, device=C64.device)
    k64 = k.double()
    a64 = k64 if at is None else at.double()
    u = torch.linalg.solve(C64, k64)
    denom = float(u @ a64)
    if not math.isfinite(denom) or abs(denom) < 1e-20:
        raise WeightsmithError("the statistics matrix is singular for this key: use a larger statistics corpus")
    resid = v.double() - W.double() @ a64
    B = (resid / denom).float()
    A = u.float()
    return B, A


@dataclass
class KeyValue:
    """What a ROME edit needs besides the statistics: ΔW = rank_one_update(W, k_star, v, C, at=at)."""

    W: torch.Tensor  # [out, in], float32
    k_star: torch.Tensor  # mean key over the bare and prefixed prompts
    at: torch.Tensor  # key where the update is exact (bare prompt's key, or k_star)
    v: torch.Tensor  # W·(at or the bare prompt's key, see RomeHyperParams.value_from) + δ
    info: dict[str, Any]
    k_prompt: torch.Tensor | None = None  # the bare prompt's key k(s)

    def update(self, C: torch.Tensor, *, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        return rank_one_update(self.W, self.k_star, self.v, C.to(self.W.device), ridge=ridge, at=self.at)


def compute_key_value(model, tokenizer, spec: ArchSpec, request: EditRequest, *, layer: int, prefixes: list[str],
                      hparams: RomeHyperParams | None = None, progress: Progress | None = None) -> KeyValue:
    """k* and v* of ``request`` at ``layer`` (they do not depend on the statistics)."""
    hp = hparams or RomeHyperParams()
    if hp.update_at not in ("prompt", "mean"):
        raise WeightsmithError(f"update_at must be 'prompt' or 'mean', not {hp.update_at!r}")
    if hp.value_from not in ("key", "prompt"):
        raise WeightsmithError(f"value_from must be 'key' or 'prompt', not {hp.value_from!r}")
    name = spec.module("mlp_out", layer)
    W = spec.as_out_in(get_module(model, name).weight.detach()).float()
    seqs = prefixed_sequences(tokenizer, prefixes, request)
    keys = compute_keys(model, tokenizer, spec, layer, seqs)
    k_star = keys.mean(0)
    at = keys[0] if hp.update_at == "prompt" else k_star  # seqs[0] is the bare prompt
    base = at if hp.value_from == "key" else keys[0]
    delta, _v_init, info = compute_value(model, tokenizer, spec, request, layer, prefixes, hp, progress=progress)
    info["update_at"] = hp.update_at
    if hp.update_at == "mean":
        info["value_from"] = hp.value_from
    return KeyValue(W, k_star, at, W @ base + delta, info, keys[0])


def compute_rome(model, tokenizer, spec: ArchSpec, request: EditRequest, C: torch.Tensor, *, layer: int,
                 prefixes: list[str], hparams: RomeHyperParams | None = None,
                 progress: Progress | None = None) -> RomeResult:
    """Compute (do not apply) the ROME edit of ``request`` at ``layer`` with statistics ``C``."""
    hp = hparams or RomeHyperParams()
    t0 = time.time()
    kv = compute_key_value(model, tokenizer, spec, request, layer=layer, prefixes=prefixes, hparams=hp,
                           progress=progress)
    B, A = kv.update(C, ridge=hp.mom2_ridge)
    info = kv.info
    name = spec.module("mlp_out", layer)
    info.update({"seconds": round(time.time() - t0, 3), "layer": layer, "module": name})
    return RomeResult(layer, name, B, A, info, kv.k_star)
