"""Perplexity of a model on a token sequence: the one definition (editing's checks and the evaluation tasks use it).

Windows of ``seq_len`` tokens that do not overlap, as lm-eval's rolling
log-likelihood cuts a document: each window's first token is context only, so
``len(token_ids) - windows`` tokens are predicted. It lives on the ground floor
because both ``editing`` (a held-out perplexity after edits) and ``evaluation``
(the perplexity task) need it, and neither may import the other.

Example::

    perplexity(model, tokenizer("some text")["input_ids"], seq_len=256)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import WeightsmithError
from .jobs import Job, ensure


def right_padded(rows: Sequence[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one right-padded batch: (input ids, attention mask), each ``[len(rows), longest]``."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


@torch.no_grad()
def token_nll(model, token_ids: list[int], *, seq_len: int = 256, batch_size: int = 4,
              job: Job | None = None) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods in nats, tokens predicted) over the windows.

    Reports one step per batch of windows through ``job`` and stops there on a cancel.
    """
    if len(token_ids) < 2:
        raise WeightsmithError("perplexity needs at least two tokens")
    if seq_len < 2:
        raise WeightsmithError(f"perplexity windows need at least two tokens, not {seq_len}")
    job = ensure(job)
    device = next(model.parameters()).device
    windows = [token_ids[i:i + seq_len] for i in range(0, len(token_ids), seq_len)]
    windows = [w for w in windows if len(w) > 1]
    nll, count = 0.0, 0
    for s in range(0, len(windows), batch_size):
        job.check("the perplexity")
        job.step(s, len(windows), f"perplexity: window {s + 1}/{len(windows)}")
        ids, mask = right_padded(windows[s:s + batch_size])
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).to(device)
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    job.step(len(windows), len(windows), "perplexity: done")
    return nll, count


def perplexity(model, token_ids: list[int], *, seq_len: int = 256, batch_size: int = 4,
               job: Job | None = None) -> float:
    """exp(mean next-token NLL) over ``token_ids`` cut into consecutive windows of ``seq_len`` (see :func:`token_nll`)."""
    nll, count = token_nll(model, token_ids, seq_len=seq_len, batch_size=batch_size, job=job)
    return math.exp(nll / count)
