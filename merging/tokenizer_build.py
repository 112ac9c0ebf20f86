"""The merged model's tokenizer, built as mergekit 0.1.5 builds it, and where each model's rows go.

* ``source: base``: the base model's tokenizer (the first model's without a base),
  without tokens at or past its ``vocab_size`` (BPE tokenizers only, as in mergekit);
* ``source: <model>``: that model's tokenizer as it is;
* ``source: union``: the base tokenizer, then every other model's tokens it lacks,
  added in the order the models are listed and, within a model, in its id order
  (mergekit walks a hash map there, so its ids for added tokens can differ run to
  run; the rows each token gets are the same). Special ("added") tokens come last,
  with the settings of the first model that has them;
* then every ``tokens:`` key that is still missing.

For each merged model, :attr:`MergedVocabulary.permutations` maps each output
token id to that model's row for the token, or -1 when the model lacks it.
:mod:`merging.tokenizer_embed` turns that into rows.

Example::

    vocab = build_vocabulary(recipe, ckpts)    # None when the recipe keeps the reference's tokenizer
    vocab.size, vocab.tokens[:5], vocab.permutations["./ft1"][:5]
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from checkpoints.errors import WeightsmithError
from checkpoints.sources import LocalCheckpoint

from .tokenizer_config import TokenizerConfig, effective_tokenizer, input_refs

log = logging.getLogger(__name__)


@dataclass
class MergedVocabulary:
    """The output tokenizer and, per merged model, where its rows go."""

    tokenizer: Any  # a transformers fast tokenizer
    tokens: list[str]  # output id -> token
    size: int  # rows of the output's vocabulary weights (``len(tokens)`` padded up)
    permutations: dict[str, torch.Tensor]  # model ref -> (output id -> that model's row, -1 if absent)
    original_vocabs: dict[str, dict[str, int]]  # model ref -> its own token -> id
    settings: TokenizerConfig
    base: str  # the model the output tokenizer starts from
    donor: LocalCheckpoint  # whose tokenizer files the output copies when ``rebuilt`` is False
    rebuilt: bool  # the tokenizer differs from the donor's files (so it is saved anew)

    def unchanged_for(self, ref: str, rows: int) -> bool:
        """Whether model ``ref``'s vocabulary weights (``rows`` rows) are already the output's."""
        p = self.permutations.get(ref)
        forced = any(s.force for s in self.settings.tokens.values())
        return (p is not None and not forced and rows == len(self.tokens) == self.size
                and bool(torch.equal(p, torch.arange(len(self.tokens)))))

    def save_files(self, folder: Path) -> None:
        """The tokenizer's files, written by transformers into ``folder``."""
        self.tokenizer.save_pretrained(str(folder))


def build_vocabulary(recipe, ckpts: dict[str, LocalCheckpoint]) -> MergedVocabulary | None:
    """The output vocabulary the recipe asks for; None when it keeps the reference model's tokenizer."""
    settings = effective_tokenizer(recipe)
    if settings is None:
        return None
    inputs = input_refs(recipe)
    base = recipe.base_model or inputs[0]
    base_tok, stripped = _stripped(ckpts[base])
    tokenizers = {base: base_tok}
    for ref in inputs:
        if ref != base:
            try:
                tokenizers[ref] = ckpts[ref].load_tokenizer()
            except WeightsmithError as e:  # mergekit's rule: such a model has the base's vocabulary
                log.warning("%s; taking it to have %s's vocabulary", e, ckpts[base].name)
    if settings.source == "union":
        out, donor = _union(ckpts, base, tokenizers), ckpts[base]
    elif settings.source == "base":
        out, donor = _stripped(ckpts[base])[0], ckpts[base]
    else:
        donor = ckpts[settings.source]
        out, stripped = donor.load_tokenizer(), False
    before = len(out.get_vocab())
    missing = [t for t in settings.tokens if t not in out.get_vocab()]
    if missing:
        out.add_tokens(missing)
    vocab = out.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise WeightsmithError(f"the merged tokenizer's ids are not 0..{len(tokens) - 1} without gaps; "
                               "it cannot index embedding rows")
    size = _padded(len(tokens), settings.pad_to_multiple_of)
    originals = {ref: tokenizers.get(ref, base_tok).get_vocab() for ref in inputs}
    permutations = {ref: _permutation(tokens, originals[ref], _rows(ckpts[ref], len(originals[ref])), ckpts[ref].name)
                    for ref in inputs}
    # Unchanged (so its files are copied as they are) when nothing was trimmed or added to the donor's.
    rebuilt = stripped or len(tokens) != (before if settings.source not in ("base", "union")
                                          else len(base_tok.get_vocab()))
    log.info("merged vocabulary: %d tokens (%d rows), from %s", len(tokens), size, settings.source)
    return MergedVocabulary(out, tokens, size, permutations, originals, settings, base, donor, rebuilt)


def _padded(n: int, multiple: int | None) -> int:
    return n if not multiple or n % multiple == 0 else (n // multiple + 1) * multiple


def _rows(ckpt: LocalCheckpoint, fallback: int) -> int:
    """The model's ``vocab_size`` (rows of its embedding), as mergekit reads it from the config."""
    v = ckpt.config.get("vocab_size")
    return v if isinstance(v, int) and not isinstance(v, bool) else fallback


def _permutation(tokens: list[str], own: dict[str, int], rows: int, name: str) -> torch.Tensor:
    p = torch.full((len(tokens),), -1, dtype=torch.long)
    past = []
    for i, tok in enumerate(tokens):
        j = own.get(tok)
        if j is None:
            continue
        if j >= rows:  # a tokenizer entry with no embedding row (mergekit skips it too)
            past.append(tok)
            continue
        p[i] = j
    if past:
        log.warning("%s: %d token(s) have ids past its %d embedding rows (e.g. %r); treated as absent",
                    name, len(past), rows, past[0])
    return p


def _stripped(ckpt: LocalCheckpoint) -> tuple[Any, bool]:
    """The model's tokenizer without entries at or past its ``vocab_size``; and whether any went."""
    tok = ckpt.load_tokenizer()
    rows = _rows(ckpt, len(tok.get_vocab()))
    unused = {t for t, i in tok.get_vocab().items() if i >= rows}
    if not unused:
        return tok, False
    import tokenizers

    if not getattr(tok, "is_fast", False):
        raise WeightsmithError(f"{ckpt.name}: its tokenizer has {len(unused)} tokens past vocab_size {rows} and is "
                               "not a fast tokenizer, so they cannot be removed for a tokenizer merge")
    data = json.loads(tok.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise WeightsmithError(f"{ckpt.name}: its {data['model']['type']} tokenizer has tokens past vocab_size "
                               f"{rows}; only BPE tokenizers can be trimmed for a tokenizer merge")
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < rows]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in unused}
    merges = data["model"].get("merges", [])
    data["model"]["merges"] = [m for m in merges if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok, True


def _union(ckpts: dict[str, LocalCheckpoint], base: str, tokenizers: dict[str, Any]) -> Any:
    """The base tokenizer plus every model's tokens it lacks (see the module's docstring)."""
    plain: dict[str, None] = {}
    special: dict[str, Any] = {}
    for ref, tok in tokenizers.items():
        vocab = tok.get_vocab()
        rows = _rows(ckpts[ref], len(vocab))
        added = tok.added_tokens_decoder
        added_text = {info.content for info in added.values()}
        for t, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if i < rows and t not in added_text:
                plain.setdefault(t)
        for i, info in sorted(added.items()):
            if i >= rows:
                continue
            if info.content in special and special[info.content] != info:
                log.warning("token %r is added with different settings in %s; the first model's are kept",
                            info.content, ckpts[ref].name)
            special.setdefault(info.content, info)
    # A fresh copy of the base tokenizer: the one in ``tokenizers`` still gives the base's own ids.
    with tempfile.TemporaryDirectory(prefix="ws-tokenizer-") as tmp:
        tokenizers[base].save_pretrained(tmp)
        from transformers import AutoTokenizer

        out = AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
    own = tokenizers[base].get_vocab()
    new = [t for t in plain if t not in special and t not in own]
    if new:
        out.add_tokens(new)
    if special:
        out.add_tokens(list(special.values()))
    return out
