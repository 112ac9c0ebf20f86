"""Causal tracing (Meng et al. 2022): where in the network is a fact recalled?

1. Clean run: the model's answer to the prompt and its probability (high score).
2. Corrupted runs: Gaussian noise (``noise`` × the std of the token
   embeddings, default 3) on the subject tokens' embeddings; the answer's
   probability drops (low score). One noise draw per sample, shared by every
   restoration of that sample.
3. For each (token, layer): restore the clean hidden state (``kind="hidden"``),
   or the clean MLP / attention output over a window of layers
   (``kind="mlp"|"attn"``) at that token, and record the answer's probability.

Speed: restoring at layer ``l`` changes nothing below it, so those runs start
at block ``l+1`` from the cached corrupted residual stream (blocks below do
no work); all tokens and samples of one layer run as one batch; only the last
position goes through the vocabulary head; tokens before the subject are not
corrupted, so their restorations are the low score without running anything.

Example::

    result = causal_trace(model, tok, "The Eiffel Tower is located in the city of", "Eiffel Tower")
    result.scores.shape      # (tokens, layers)
    fig = plot_trace(result); save_trace(result, Path("trace.png"))   # + trace.json
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from checkpoints.arch import spec_for
from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Job

from .hooks import capture_output, patch_output, patch_outputs, start_from_block
from .request import EditRequest, check_request, prompt_ids, subject_span

log = logging.getLogger(__name__)

Kind = Literal["hidden", "mlp", "attn"]
Progress = Callable[[float, str], None]


@dataclass
class TraceResult:
    """Outcome of :func:`causal_trace`.

    ``scores[t, l]`` is P(answer) with token ``t`` restored at layer ``l``
    (tokens × layers); ``subject_range`` is ``(first, last + 1)`` in tokens.
    """

    prompt: str
    subject: str
    kind: str
    scores: torch.Tensor
    tokens: list[str]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    low_score: float
    high_score: float
    samples: int
    noise: float
    window: int
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def effect_profile(self) -> torch.Tensor:
        """Indirect effect per layer (``[layers]``, in units of high − low) that :meth:`suggest_layer` ranks.

        ROME reads its key at the subject's last token, so for MLP/attention
        traces that token's row is the paper's criterion. When that row is
        flat (less than a quarter of the strongest subject-token effect: the
        recall happens at an earlier subject token, as with " Tower" vs
        "iffel" on SmolLM2), and for hidden-state traces (whose subject rows
        fall with depth as the information moves on), the per-layer maximum
        over the subject tokens is used instead.
        """
        a, b = self.subject_range
        span = max(self.high_score - self.low_score, 1e-12)
        effect = ((self.scores[a:b] - self.low_score) / span).clamp(min=0.0)
        best_any = effect.max(dim=0).values
        last = effect[-1]
        if self.kind != "hidden" and float(last.max()) >= 0.25 * float(best_any.max()) and float(last.max()) > 0:
            return last
        return best_any

    def suggest_layer(self, layers: range | None = None) -> int:
        """The layer to edit: argmax of :meth:`effect_profile` within ``layers``.

        ``layers`` defaults to the plausible ROME range for this depth
        (:func:`editing.rome.plausible_layers`: early-middle MLPs, 10-45% of the depth); a trace
        with no effect anywhere in it (the model does not know the fact)
        returns the range's default layer.
        """
        from .rome import default_layer, plausible_layers

        L = self.scores.shape[1]
        model_type = self.extra.get("model_type", "")
        rng = layers if layers is not None else plausible_layers(model_type, L)
        prof = self.effect_profile()[rng.start:rng.stop]
        if prof.numel() == 0 or float(prof.max()) <= 0:
            return default_layer(model_type, L)
        return rng.start + int(prof.argmax())

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "subject": self.subject, "kind": self.kind, "answer": self.answer,
                "answer_id": self.answer_id, "tokens": self.tokens, "subject_range": list(self.subject_range),
                "scores": [[round(float(x), 6) for x in row] for row in self.scores],
                "low_score": self.low_score, "high_score": self.high_score, "samples": self.samples,
                "noise": self.noise, "window": self.window, "suggested_layer": self.suggest_layer(),
                "seconds": round(self.seconds, 2)}


def _module_names(spec, kind: str, n: int) -> list[str]:
    role = {"mlp": "mlp", "attn": "attention"}[kind]
    return [spec.module(role, i) for i in range(n)]  # type: ignore[arg-type]


@torch.no_grad()
def causal_trace(model, tokenizer, prompt: str, subject: str, *, kind: Kind = "hidden", samples: int = 3,
                 noise: float = 3.0, window: int = 10, progress: Progress | None = None, job: Job | None = None,
                 device: str | torch.device | None = None, seed: int = 0) -> TraceResult:
    """Trace ``prompt`` (containing ``subject`` or ``{}``) and return a :class:`TraceResult`.

    ``noise`` is in units of the token embeddings' standard deviation;
    ``samples`` noise draws are averaged (the paper uses 10; 3 keeps a
    30-layer model under half a minute on a laptop CPU).
    """
    progress = job.callback("the trace") if job is not None else progress
    if kind not in ("hidden", "mlp", "attn"):
        raise WeightsmithError(f"unknown trace kind {kind!r}: use hidden, mlp or attn")
    if samples < 1:
        raise WeightsmithError("samples must be at least 1")
    t_start = time.time()
    spec = spec_for(getattr(model.config, "model_type", None), strict=True)
    L = spec.num_layers(model.config)
    req = EditRequest(prompt, subject, "x")
    check_request(req, tokenizer, L)
    text = req.text
    device = device or next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, text)], device=device)
    T = ids.shape[1]
    first, last = subject_span(tokenizer, text, text.find(subject), subject)
    blocks = [spec.block(i) for i in range(L)]
    head = model.get_output_embeddings()
    base = model.base_model

    def answer_probs(h_last: torch.Tensor) -> torch.Tensor:
        return torch.softmax(head(h_last).float(), -1)

    # 1. clean run: block outputs (and module outputs for mlp/attn) at every layer.
    mods = _module_names(spec, kind, L) if kind != "hidden" else []
    boxes = {}
    import contextlib

    with contextlib.ExitStack() as st:
        for name in blocks + mods:
            boxes[name] = st.enter_context(capture_output(model, name))
        h = base(input_ids=ids, use_cache=False).last_hidden_state
    clean = {name: boxes[name].value[0] for name in blocks + mods}  # each [T, H]
    probs = answer_probs(h[0, -1])
    answer_id = int(probs.argmax())
    high = float(probs[answer_id])

    # 2. corrupted runs, one noise draw per sample.
    emb = model.get_input_embeddings()
    scale = noise * float(emb.weight.float().std())
    gen = torch.Generator().manual_seed(seed)
    eps = (torch.randn(samples, last - first + 1, emb.weight.shape[1], generator=gen) * scale).to(device)

    def add_noise(y: torch.Tensor) -> torch.Tensor:
        y = y.clone()
        y[:, first:last + 1] += eps.to(y.dtype)
        return y

    batch_ids = ids.expand(samples, T)
    with contextlib.ExitStack() as st:
        st.enter_context(patch_output(model, spec_emb_name(model, emb), add_noise))
        for name in blocks:
            boxes[name] = st.enter_context(capture_output(model, name))
        h = base(input_ids=batch_ids, use_cache=False).last_hidden_state
    corrupt = {name: boxes[name].value for name in blocks}  # each [S, T, H]
    low = float(answer_probs(h[:, -1])[:, answer_id].mean())

    # 3. restorations.
    scores = torch.full((T, L), low)
    toks = list(range(first, T))  # earlier tokens are not corrupted: restoring them changes nothing
    rows = len(toks) * samples
    tok_of_row = torch.tensor(toks, device=device).repeat_interleave(samples)
    sample_of_row = torch.arange(samples, device=device).repeat(len(toks))
    ids_rows = ids.expand(rows, T)
    r = torch.arange(rows, device=device)
    for layer in range(L):
        if kind == "hidden":
            start = layer + 1
            H = corrupt[blocks[layer]][sample_of_row].clone()
            H[r, tok_of_row] = clean[blocks[layer]][tok_of_row]
            with start_from_block(model, blocks, start, H):
                out = base(input_ids=ids_rows, use_cache=False).last_hidden_state[:, -1]
        else:
            lo, hi = max(0, layer - window // 2), min(L, layer - (-window // 2))
            H = corrupt[blocks[lo - 1]][sample_of_row] if lo > 0 else None

            def restore(name):
                def fn(y, name=name):
                    y = y.clone()
                    y[r, tok_of_row] = clean[name][tok_of_row].to(y.dtype)
                    return y
                return fn

            patches = {mods[j]: restore(mods[j]) for j in range(lo, hi)}
            with contextlib.ExitStack() as st:
                if H is not None:
                    st.enter_context(start_from_block(model, blocks, lo, H))
                else:
                    st.enter_context(patch_output(model, spec_emb_name(model, emb),
                                                  lambda y: y + _noise_rows(y, eps, sample_of_row, first, last)))
                st.enter_context(patch_outputs(model, patches))
                out = base(input_ids=ids_rows, use_cache=False).last_hidden_state[:, -1]
        p = answer_probs(out)[:, answer_id].reshape(len(toks), samples).mean(1)
        scores[first:, layer] = p.cpu()
        if progress:  # with a job, this also stops a cancelled trace at the next layer
            progress((layer + 1) / L, f"tracing layer {layer + 1}/{L}")
    tokens = [tokenizer.decode([int(t)]) for t in ids[0]]
    return TraceResult(text, subject, kind, scores, tokens, (first, last + 1), tokenizer.decode([answer_id]),
                       answer_id, low, high, samples, noise, window, time.time() - t_start,
                       extra={"model_type": spec.model_type})


def _noise_rows(y: torch.Tensor, eps: torch.Tensor, sample_of_row: torch.Tensor, first: int, last: int) -> torch.Tensor:
    z = torch.zeros_like(y)
    z[:, first:last + 1] = eps[sample_of_row].to(y.dtype)
    return z


def spec_emb_name(model, emb) -> str:
    """Dotted name of the token-embedding module."""
    for name, mod in model.named_modules():
        if mod is emb:
            return name
    raise WeightsmithError("cannot find the token embedding module")


def plot_trace(result: TraceResult):
    """Heatmap of ``result.scores`` (tokens × layers), subject tokens marked with ``*``; a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    T, L = result.scores.shape
    fig = Figure(figsize=(max(6.0, 0.22 * L + 2.5), max(3.0, 0.32 * T + 1.5)), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    cmap = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}[result.kind]
    im = ax.imshow(result.scores.numpy(), aspect="auto", cmap=cmap, vmin=min(result.low_score, float(result.scores.min())),
                   interpolation="nearest")
    a, b = result.subject_range
    labels = [(f"{t!r}*" if a <= i < b else repr(t)) for i, t in enumerate(result.tokens)]
    ax.set_yticks(range(T), labels=labels, fontsize=8)
    for i in range(a, b):
        ax.get_yticklabels()[i].set_fontweight("bold")
    ax.set_xticks(range(0, L, max(1, L // 15)))
    ax.set_xlabel("layer" + ("" if result.kind == "hidden" else f" (centre of a window of {result.window})"))
    what = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}[result.kind]
    ax.set_title(f"Restoring the clean {what}; * = subject token\n"
                 f"P({result.answer.strip()!r}): clean {result.high_score:.3f}, corrupted {result.low_score:.3f}",
                 fontsize=9)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"P({result.answer.strip()!r})")
    fig.tight_layout()
    return fig


def save_trace(result: TraceResult, out_png: str | Path) -> tuple[Path, Path]:
    """Write the heatmap to ``out_png`` and the numbers to the same name with ``.json``."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    plot_trace(result).savefig(out_png)
    out_json = out_png.with_suffix(".json")
    out_json.write_text(json.dumps(result.to_dict(), indent=1))
    return out_png, out_json
