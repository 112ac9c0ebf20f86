"""Edit requests and the tokenisation rules every editing step shares.

Two rules matter more than anything else in a ROME port:

* targets are scored and optimised as ``" " + target`` tokenised WITHOUT
  special tokens (a BOS inside the target, or a missing leading space, is the
  classic bug that makes edits "work" on the wrong tokens);
* the subject's last token is found from character offsets of the real
  prompt, not by re-tokenising the subject alone (BPE merges differ).

Example::

    req = EditRequest("{} is located in the city of", "Eiffel Tower", "Rome")
    req.text                               # "Eiffel Tower is located in the city of"
    target_ids(tok, req.target)            # ids of " Rome", no BOS
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


from checkpoints.errors import WeightsmithError

# ROME prompts are one sentence; a long prompt only slows the optimisation and
# usually means the wrong text was pasted. Also capped by the model's context.
MAX_PROMPT_TOKENS = 200


@dataclass
class EditRequest:
    """One fact to write: ``prompt`` (with ``{}`` for the subject, or containing it), ``subject``, new ``target``.

    ``layer`` overrides the default edited layer. ``target_true`` (optional)
    is the old answer, used only for evaluation and the edit log.
    """

    prompt: str
    subject: str
    target: str
    layer: int | None = None
    target_true: str | None = None

    @property
    def template(self) -> str:
        """The prompt with ``{}`` where the subject goes."""
        if "{}" in self.prompt:
            return self.prompt
        i = self.prompt.find(self.subject)
        return self.prompt[:i] + "{}" + self.prompt[i + len(self.subject):]

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return fill(self.template, self.subject)

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.template, "subject": self.subject, "target_new": self.target,
                "target_true": self.target_true, "layer": self.layer}


def fill(template: str, subject: str) -> str:
    """``template`` with its first ``{}`` replaced by ``subject`` (no str.format: prompts may hold braces)."""
    return template.replace("{}", subject, 1)


def check_request(req: EditRequest, tokenizer: Any, num_layers: int, *, max_positions: int | None = None) -> None:
    """Raise one clear :class:`WeightsmithError` if ``req`` cannot be edited; touches nothing."""
    if not isinstance(req.subject, str) or not req.subject.strip():
        raise WeightsmithError("the subject is empty")
    if not isinstance(req.target, str) or not req.target.strip():
        raise WeightsmithError("the new target is empty")
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise WeightsmithError("the prompt is empty")
    if "{}" not in req.prompt and req.subject not in req.prompt:
        raise WeightsmithError(f"the subject {req.subject!r} does not occur in the prompt {req.prompt!r} (write it there or use {{}})")
    if req.template.count("{}") > 1:
        raise WeightsmithError("the prompt has more than one {} placeholder")
    if req.template.strip() == "{}":
        raise WeightsmithError("the prompt is only the subject: add the text that leads to the answer")
    if req.layer is not None and not (0 <= int(req.layer) < num_layers):
        raise WeightsmithError(f"layer {req.layer} is out of range: the model has layers 0..{num_layers - 1}")
    n = len(prompt_ids(tokenizer, req.text))
    limit = MAX_PROMPT_TOKENS if max_positions is None else min(MAX_PROMPT_TOKENS, max_positions // 2)
    if n > limit:
        raise WeightsmithError(f"the prompt is too long: {n} tokens (at most {limit})")
    if not target_ids(tokenizer, req.target):
        raise WeightsmithError(f"the target {req.target!r} tokenises to nothing")
    subject_span(tokenizer, req.text, req.text.find(req.subject), req.subject)


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt, with the special tokens the tokenizer adds by default (e.g. a BOS)."""
    return list(tokenizer(text)["input_ids"])


def target_ids(tokenizer: Any, target: str) -> list[int]:
    """Ids of ``" " + target`` WITHOUT special tokens: the tokens that follow a prompt."""
    text = target if target.startswith(" ") else " " + target.strip()
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_id(tokenizer: Any) -> int:
    """The id a batch is padded with: the tokenizer's pad token, else EOS, else 0 (masked out anyway)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def subject_span(tokenizer: Any, text: str, start: int, subject: str) -> tuple[int, int]:
    """Token range ``[first, last]`` (inclusive) covering ``text[start:start+len(subject)]``.

    Uses the fast tokenizer's character offsets; without them, re-tokenises
    prefixes of ``text`` (slower, same answer for BPE tokenizers).
    """
    if start < 0:
        raise WeightsmithError(f"the subject {subject!r} does not occur in the prompt")
    end = start + len(subject)
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    except (NotImplementedError, TypeError, ValueError):
        hits = []
        ids = prompt_ids(tokenizer, text)
        n_before = len(prompt_ids(tokenizer, text[:start].rstrip())) if text[:start].strip() else len(prompt_ids(tokenizer, ""))
        n_through = len(prompt_ids(tokenizer, text[:end]))
        hits = list(range(min(n_before, n_through - 1), min(n_through, len(ids))))
    if not hits:
        raise WeightsmithError(f"the subject {subject!r} covers no token of the prompt")
    return hits[0], hits[-1]


@dataclass
class Tokenised:
    """A prompt as token ids, with its subject span and (optionally) target ids appended."""

    ids: list[int]
    subject_first: int
    subject_last: int
    prompt_len: int  # tokens of the prompt alone; target token j is predicted at prompt_len - 1 + j
    target: list[int] = field(default_factory=list)


def tokenise(tokenizer: Any, text: str, subject: str, *, subject_at: int | None = None,
             target: list[int] | None = None) -> Tokenised:
    """Tokenise ``text`` and locate ``subject`` (first occurrence, or the one at character ``subject_at``)."""
    start = text.find(subject) if subject_at is None else subject_at
    first, last = subject_span(tokenizer, text, start, subject)
    ids = prompt_ids(tokenizer, text)
    tgt = list(target or [])
    return Tokenised(ids + tgt[:-1] if tgt else ids, first, last, len(ids), tgt)


def start_token_id(tokenizer) -> int:
    """The token that opens a neutral document: the one sampled text and ROME's prefixes start from."""
    # A document boundary is the most neutral start: GPT-2 style "<|endoftext|>" if the
    # vocabulary has it, else BOS, else EOS.
    vocab = tokenizer.get_vocab()
    for t in ("<|endoftext|>",):
        if t in vocab:
            return vocab[t]
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
