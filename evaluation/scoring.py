"""Scoring a loaded model: log-likelihood of continuations (multiple choice) and greedy answers (generation).

Multiple choice follows lm-eval-harness (``lm_eval/api/task.py`` and ``models/huggingface.py``):

* each choice is a continuation ``" " + choice`` of the query; the pair is encoded as the whole
  text, and the continuation's tokens are those after the context's (trailing spaces of the
  context move to the continuation first); no special tokens; an empty context starts from the
  tokenizer's BOS/EOS token;
* a choice's score is the sum of its tokens' log-probabilities;
* ``acc``: the argmax of the scores is the gold index; ``acc_norm``: the argmax of each score
  divided by the choice's length in characters (``len(choice)``, without the space) is.
  Ties go to the first choice (``numpy.argmax``).

Generation is greedy, batched with left padding built here (the shared tokenizer is never
mutated), optionally through the chat template as the Playground sends a user message.

Example::

    loglikelihoods(model, tok, [("The capital of France is", " Paris")])  # [(-3.2, True)]
"""

from __future__ import annotations

import re
import string
from typing import Sequence

import torch
import torch.nn.functional as F

from checkpoints.jobs import Job, ensure
from checkpoints.perplexity import right_padded

from .tasks import ChoiceItem


def _special_id(tokenizer) -> int:
    for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if t is not None:
            return int(t)
    return 0


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval encodes a log-likelihood request."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    if not ctx:
        ctx = [_special_id(tokenizer)]
    return ctx, cont


def max_length(model, default: int = 2048) -> int:
    n = getattr(model.config, "max_position_embeddings", None)
    return min(int(n), default) if n else default


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 8,
                   job: Job | None = None) -> list[tuple[float, bool]]:
    """(sum log P(continuation | context), is the continuation the greedy one) for each request, in order.

    Requests are scored longest first in right-padded batches (little padding, and a memory
    problem shows on the first batch); each batch reports a step and honours a cancel.
    """
    job = ensure(job)
    device = next(model.parameters()).device
    limit = max_length(model)
    rows: list[tuple[list[int], int]] = []  # (input tokens, continuation length)
    for ctx, cont in requests:
        c, k = encode_pair(tokenizer, ctx, cont)
        tokens = (c + k)[-(limit + 1):]
        rows.append((tokens, len(k)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for s in range(0, len(order), batch_size):
        job.check("the evaluation")
        job.step(s, len(order), f"scoring choices {s + 1}/{len(order)}")
        batch = order[s:s + batch_size]
        inputs = [rows[i][0][:-1] for i in batch]
        ids, mask = right_padded(inputs)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for j, i in enumerate(batch):
            tokens, k = rows[i]
            n = len(inputs[j])
            logp = F.log_softmax(logits[j, n - k:n].float(), dim=-1)
            target = torch.tensor(tokens[-k:], device=device)
            greedy = bool((logp.argmax(-1) == target).all())
            out[i] = (float(logp.gather(-1, target[:, None]).sum()), greedy)
    job.step(len(order), len(order), "choices scored")
    return out


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first on a tie (as ``numpy.argmax``)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def choice_metrics(item: ChoiceItem, lls: Sequence[float]) -> dict[str, float]:
    """lm-eval's ``acc`` and ``acc_norm`` of one question from its choices' log-likelihoods."""
    acc = float(argmax(lls) == item.gold)
    norm = [ll / len(c) for ll, c in zip(lls, item.choices, strict=True)]
    return {"acc": acc, "acc_norm": float(argmax(norm) == item.gold)}


def choice_requests(items: Sequence[ChoiceItem]) -> list[tuple[str, str]]:
    """Every (context, continuation) pair of ``items``, question by question."""
    return [(it.query, " " + c) for it in items for c in it.choices]


# -- generation ------------------------------------------------------------------------------------------
def prompt_text(tokenizer, prompt: str, chat: bool) -> str:
    """The prompt as the model sees it: a user message through the chat template when asked and there is one."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48, chat: bool = True,
                   batch_size: int = 8, job: Job | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (special tokens dropped, stripped), batch by batch."""
    job = ensure(job)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _special_id(tokenizer)
    encoded = [tokenizer(prompt_text(tokenizer, p, chat), add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out = [""] * len(encoded)
    for s in range(0, len(order), batch_size):
        job.check("the evaluation")
        job.step(s, len(order), f"answering {s + 1}/{len(order)}")
        batch = order[s:s + batch_size]
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(batch):  # left padding: every row ends where generation starts
            ids[j, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[j, width - len(encoded[i]):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
        for j, i in enumerate(batch):
            out[i] = tokenizer.decode(gen[j, width:], skip_special_tokens=True).strip()
    job.step(len(order), len(order), "answers done")
    return out


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_metrics(answer: str, accepted: Sequence[str]) -> dict[str, float]:
    """``exact_match``: the answer's first line, normalised, is an accepted answer; ``contains``: an accepted
    answer appears in it as whole words (a chatty "The capital is Paris." still counts)."""
    first = normalize_answer(answer.strip().split("\n")[0]) if answer.strip() else ""
    whole = f" {normalize_answer(answer)} "
    targets = [normalize_answer(a) for a in accepted]
    return {"exact_match": float(first in targets),
            "contains": float(any(t and f" {t} " in whole for t in targets))}
