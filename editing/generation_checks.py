"""Checks by generation: does the edited model *say* the new fact, keep the neighbours' facts, stay fluent?

Teacher-forced scores (:mod:`editing.evaluate`) compare two given answers'
probabilities; they can call an edit a success while the model never writes
the new answer ("The Mirage of Model Editing", 2025). These checks generate.

Definitions (all greedy decoding, so they are deterministic):

* a continuation is the text of the first ``answer_tokens`` (default 20) new
  tokens after the prompt (special tokens dropped);
* :func:`mentions` — the answer occurs in that text as a whole-word,
  case-insensitive match (``"Rome"`` matches ``"rome."`` but not ``"Romeo"``;
  runs of whitespace inside the answer match any whitespace);
* **gen_efficacy** — the continuation of the edit prompt mentions the new target (0/1 per record);
* **gen_paraphrase** — the fraction of paraphrase prompts whose continuation mentions the new target;
* **gen_neighborhood** — the fraction of neighbourhood prompts whose continuation still mentions
  *their true answer* (an absolute score like NS; the unedited model's score on the same
  prompts is the reference, benches report both);
* **fluency** — ROME's weighted n-gram entropy (Meng et al. 2022, authors'
  ``compute_n_gram_entropy``): for n = 2 and 3, H_n = −Σ f log₂ f over the relative
  frequencies f of the word n-grams of a text, and the text's score is
  mean(2/3·H₂, 4/3·H₃) = (H₂ + 2·H₃)/3; the reported value is the arithmetic mean
  over texts. A text is the prompt plus ``fluency_tokens`` (default 60) greedy new tokens,
  generated from the edit prompt and its paraphrases. Words are ``\\w+`` runs and single
  punctuation marks (the authors use NLTK's word_tokenize, which differs only on
  contractions and a few symbols); a text with fewer than n words has H_n = 0.
  A model that repeats itself ("17.n 1821.J 17.n ...") scores low.

Example::

    gen = generation_scores(model, tok, record)   # {"gen_efficacy": 1.0, "gen_paraphrase": 0.5, ...}
    fluency_on(model, tok, FLUENCY_PROMPTS)       # ~5 bits on a healthy small model
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from .records import EvalRecord, parse_record
from .request import pad_id, prompt_ids

# Topic-neutral prompts for the fluency of a model as a whole (e.g. after many edits).
FLUENCY_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "My favourite thing to do on a weekend is",
    "The history of the city begins",
    "Scientists have recently discovered that",
    "The most important lesson I learned at school was",
    "In the summer of 1998, the band",
    "The recipe calls for",
    "The football match ended",
)

_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass
class GenerationConfig:
    """How much to generate: ``answer_tokens`` for the answer checks, ``fluency_tokens`` for fluency."""

    answer_tokens: int = 20
    fluency_tokens: int = 60
    batch_size: int = 16


def words(text: str) -> list[str]:
    """The word tokens n-gram entropy counts: runs of word characters and single punctuation marks."""
    return _WORD.findall(text)


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """ROME's weighted n-gram entropy of one text, in bits: mean over n of weight_n · H_n."""
    toks = words(text)
    parts = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


def mean_ngram_entropy(texts: list[str]) -> float:
    """Arithmetic mean of :func:`ngram_entropy` over texts (ROME's ``n_gram_entropy``)."""
    return sum(ngram_entropy(t) for t in texts) / len(texts) if texts else 0.0


def mentions(text: str, answer: str) -> bool:
    """Whole-word, case-insensitive occurrence of ``answer`` in ``text``."""
    parts = answer.split()
    if not parts:
        return False
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(p) for p in parts) + r"(?!\w)"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int, *,
                         batch_size: int = 16) -> list[list[int]]:
    """Greedy new token ids after each prompt (left-padded batches; stops at EOS)."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        rows = [prompt_ids(tokenizer, p) for p in prompts[s:s + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                             temperature=None, top_p=None, top_k=None)
        for row in gen[:, width:].tolist():
            # After EOS, generate pads; keep what the model wrote up to and including EOS.
            if eos is not None and eos in row:
                row = row[:row.index(eos) + 1]
            out.append(row)
    return out


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def generations(model, tokenizer, prompts: list[str], config: GenerationConfig | None = None
                ) -> list[tuple[str, str]]:
    """For each prompt: (answer text: first ``answer_tokens`` new tokens, fluency text: prompt + ``fluency_tokens``)."""
    cfg = config or GenerationConfig()
    n = max(cfg.answer_tokens, cfg.fluency_tokens)
    rows = greedy_continuations(model, tokenizer, prompts, n, batch_size=cfg.batch_size)
    return [(_decode(tokenizer, r[:cfg.answer_tokens]), p + _decode(tokenizer, r[:cfg.fluency_tokens]))
            for p, r in zip(prompts, rows)]


def fluency_on(model, tokenizer, prompts: list[str] | tuple[str, ...] = FLUENCY_PROMPTS,
               config: GenerationConfig | None = None) -> float:
    """Mean n-gram entropy of prompt + greedy continuation over ``prompts``."""
    cfg = config or GenerationConfig()
    rows = greedy_continuations(model, tokenizer, list(prompts), cfg.fluency_tokens, batch_size=cfg.batch_size)
    return mean_ngram_entropy([p + _decode(tokenizer, r) for p, r in zip(prompts, rows)])


def generation_scores(model, tokenizer, record: Any, config: GenerationConfig | None = None,
                      *, texts: dict[str, list[str]] | None = None) -> dict[str, float]:
    """gen_efficacy, gen_paraphrase, gen_neighborhood and fluency of the model as it is now on one record.

    ``record`` is an :class:`editing.evaluate.EvalRecord` or a dict in either
    record format. Scores whose prompts are missing are left out. If
    ``texts`` is a dict, the answer texts are stored in it per group (for display).
    """

    rec: EvalRecord = parse_record(record) if isinstance(record, dict) else record
    cfg = config or GenerationConfig()
    ntrue = rec.neighborhood_true or rec.target_true
    own = [rec.text] + rec.paraphrases
    gens = generations(model, tokenizer, own, cfg)
    # Neighbours only need their answer: generate no further than that.
    short = GenerationConfig(cfg.answer_tokens, 0, cfg.batch_size)
    near = generations(model, tokenizer, rec.neighborhood, short) if ntrue and rec.neighborhood else []
    groups = [("gen_efficacy", gens[:1], rec.target_new), ("gen_paraphrase", gens[1:], rec.target_new),
              ("gen_neighborhood", near, ntrue)]
    scores: dict[str, float] = {}
    for name, part, answer in groups:
        if not part:
            continue
        scores[name] = sum(mentions(a, answer) for a, _ in part) / len(part)
        if texts is not None:
            texts[name] = [a for a, _ in part]
    scores["fluency"] = mean_ngram_entropy([f for _, f in gens])
    return scores
