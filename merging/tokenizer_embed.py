"""Embedding and head rows for a merged vocabulary, with mergekit 0.1.5's rules.

Each merged model's vocabulary weight (the token embedding and the head, as
:meth:`checkpoints.arch.ArchSpec.is_vocabulary_weight` declares them) is laid
out in the output's token order. A model keeps its own row for every token it
has; a token it lacks (or a ``force``\\d one) gets a default row:

* the ``tokens:`` entry's source when the recipe gives one (a model's row for the
  token, a model's row for another token, or zeros);
* else, when only one model has the token, that model's row;
* else, when the base model has it, the base's row;
* else the mean of the rows of the models that have it (zeros when none has).

Rows past the tokens (``pad_to_multiple_of``) are the mean of the token rows.
The merge method then merges these aligned tensors as any other.

The merge engine never sees any of this: :func:`align_checkpoints` gives each
model whose rows move a reader that serves its aligned weights (and its other
tensors untouched), so planning, reading, LiNeS and the writer work unchanged.

Example::

    vocab = build_vocabulary(recipe, ckpts)
    ckpts = align_checkpoints(recipe, ckpts, vocab)   # then plan and merge as usual
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Sequence

import torch

from checkpoints.errors import WeightsmithError
from checkpoints.sources import LocalCheckpoint
from checkpoints.tensors import CheckpointReader, TensorMeta

from .tokenizer_build import MergedVocabulary

log = logging.getLogger(__name__)


def aligned_rows(models: Sequence[str], tensors: Sequence[torch.Tensor], vocab: MergedVocabulary,
                 base: str | None) -> list[torch.Tensor]:
    """Each model's vocabulary weight in the output's token order (``[vocab.size, ...]``).

    Args:
        models: the refs of the models merged into this weight, in the recipe's order.
        tensors: their weights, rows = their own token ids.
        vocab: the merged vocabulary (its permutations are keyed by the same refs).
        base: the base model's ref, or None.
    """
    n = len(vocab.tokens)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    tensors = [t.to(dtype) for t in tensors]
    shape = tensors[0].shape[1:]
    for ref, t in zip(models, tensors):
        if t.shape[1:] != shape:
            raise WeightsmithError(f"vocabulary weights differ in width: {models[0]} has {list(shape)} per token "
                                   f"but {ref} has {list(t.shape[1:])}")
    perms = [vocab.permutations[m] for m in models]
    present = torch.stack([p >= 0 for p in perms])  # [models, tokens]
    count = present.sum(0)
    forced = torch.zeros(n, dtype=torch.bool)
    chosen = torch.zeros(n, dtype=torch.bool)  # tokens whose default the recipe sets
    ids = vocab.tokenizer.get_vocab()
    for token, setting in vocab.settings.tokens.items():
        chosen[ids[token]] = True
        forced[ids[token]] = setting.force
    need = forced | (count < len(models))
    default = torch.zeros((n, *shape), dtype=dtype)

    def take(i: int, sel: torch.Tensor) -> None:
        default[sel] = tensors[i][perms[i][sel]]

    rule = need & ~chosen
    for i in range(len(models)):  # a token only one model has: that model's row
        take(i, rule & (count == 1) & present[i])
    shared = rule & (count > 1)
    if base in models:  # a token several models have, the base among them: the base's row
        b = list(models).index(base)
        take(b, shared & present[b])
        shared &= ~present[b]
    if shared.any():  # otherwise the mean of the rows that exist, summed in the models' order
        where = shared.nonzero().squeeze(1)
        total = torch.zeros((len(where), *shape), dtype=dtype)
        for i in range(len(models)):
            has = present[i, where]
            total[has] += tensors[i][perms[i][where[has]]]
        default[where] = total / count[where].to(dtype).view(-1, *([1] * len(shape)))
    nowhere = rule & (count == 0)
    if nowhere.any():
        log.warning("%d token(s) are in no merged model (e.g. %r); their rows are zeros",
                    int(nowhere.sum()), vocab.tokens[int(nowhere.nonzero()[0])])
    for token, setting in vocab.settings.tokens.items():
        i = ids[token]
        if need[i]:
            default[i] = _chosen_row(token, setting, models, tensors, perms, vocab, i)

    out = []
    for t, p, has in zip(tensors, perms, present):
        rows = torch.zeros((vocab.size, *shape), dtype=dtype)
        rows[:n] = default
        own = has & ~forced
        rows[:n][own] = t[p[own]]
        if vocab.size > n:  # padding rows: the mean of the token rows
            rows[n:] = rows[:n].mean(dim=0)
        out.append(rows)
    return out


def _chosen_row(token: str, setting, models: Sequence[str], tensors: Sequence[torch.Tensor],
                perms: Sequence[torch.Tensor], vocab: MergedVocabulary, token_id: int) -> torch.Tensor:
    """The row a ``tokens:`` entry gives ``token``."""
    src = setting.source
    where = f"tokenizer.tokens[{token!r}]"
    if src is None:
        raise WeightsmithError(f"{where}: some merged models lack this token (or it is forced); "
                               "give it a source (a model, {kind: model_token, ...} or {kind: zero})")
    if src.kind == "zero":
        return torch.zeros(tensors[0].shape[1:], dtype=tensors[0].dtype)
    if src.model not in models:
        raise WeightsmithError(f"{where}: its source {src.model} is not merged into this weight")
    i = list(models).index(src.model)
    if src.kind == "model":
        row = int(perms[i][token_id])
        if row < 0:
            raise WeightsmithError(f"{where}: {src.model} has no such token to take a row from")
    elif src.token_id is not None:
        row = src.token_id
    else:
        row = vocab.original_vocabs[src.model].get(src.token, -1)  # type: ignore[arg-type]
        if row < 0:
            raise WeightsmithError(f"{where}: token {src.token!r} is not in {src.model}'s tokenizer")
    if not 0 <= row < tensors[i].shape[0]:
        raise WeightsmithError(f"{where}: row {row} is outside {src.model}'s {tensors[i].shape[0]} rows")
    return tensors[i][row]


class _Aligner:
    """Aligned vocabulary weights of every model, computed once per weight and handed out once each.

    One run's state, shared by the models' readers (which may be called from the
    merge's read-ahead thread, hence the lock). Only the latest weight's results are
    kept, so memory holds one vocabulary weight per model at most.
    """

    def __init__(self, recipe, ckpts: dict[str, LocalCheckpoint], vocab: MergedVocabulary):
        self.recipe, self.ckpts, self.vocab = recipe, ckpts, vocab
        self.dtype = recipe.torch_dtype("dtype")  # mergekit rounds inputs to it before aligning
        self.lock = threading.Lock()
        self.name: str | None = None
        self.ready: dict[str, torch.Tensor] = {}

    def models_and_base(self, ref: str, name: str) -> tuple[list[str], str | None]:
        """The models merged into weight ``name`` (mergekit's inputs of that tensor), ``ref`` among them."""
        r = self.recipe
        if r.models:
            models = [m.model for m in r.models]
            base = r.base_model
            if base and base not in models:
                models.append(base)
        else:
            spec = self.ckpts[ref].spec
            sl = r.slices[-1] if spec.locate(name).kind == "head" else r.slices[0]
            models = list(dict.fromkeys(s.model for s in sl.sources))
            base = sl.base_model or r.base_model
        return (models if ref in models else [*models, ref]), base

    def get(self, ref: str, name: str) -> torch.Tensor:
        with self.lock:
            key = self.ckpts[ref].spec.strip_optional_prefix(name)
            if self.name != key or ref not in self.ready:
                models, base = self.models_and_base(ref, name)
                tensors = [self._read(m, name) for m in models]
                self.name, self.ready = key, dict(zip(models, aligned_rows(models, tensors, self.vocab, base)))
            return self.ready.pop(ref)

    def _read(self, ref: str, name: str) -> torch.Tensor:
        """Model ``ref``'s weight ``name`` (however it spells the optional prefix); a head it does not
        store is its embedding (a tied head, as mergekit's tied names say)."""
        ckpt = self.ckpts[ref]
        spec, reader = ckpt.spec, ckpt.reader()
        head = spec.locate(name).kind == "head"
        for w in (name, *([f"{e}.weight" for e in spec.embeddings[:1]] if head else [])):
            for cand in (w, spec.strip_optional_prefix(w), spec.module_name(w) + ".weight"):
                if cand in reader:
                    t = reader.get(cand, dtype=None)
                    return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t
        raise WeightsmithError(f"{ckpt.name} has no {name} to align to the merged vocabulary")


class _AlignedReader(CheckpointReader):
    """A model's reader whose vocabulary weights come out aligned (other tensors read as before)."""

    def __init__(self, original: CheckpointReader, ref: str, aligner: _Aligner, vocab_size: int):
        spec = aligner.ckpts[ref].spec
        metas = original.metas()
        for name, m in list(metas.items()):
            if spec.is_vocabulary_weight(name):
                # No byte extent: the loader asks ``get`` for it.
                metas[name] = TensorMeta(name, (vocab_size, *m.shape[1:]), m.dtype, m.file)
        super().__init__(metas, headers=original.headers())  # every read goes through ``get`` below
        self._original, self._ref, self._aligner = original, ref, aligner

    def get(self, name: str, *, dtype: torch.dtype | None = torch.float32,
            device: str | torch.device = "cpu") -> torch.Tensor:
        if not self._aligner.ckpts[self._ref].spec.is_vocabulary_weight(name):
            return self._original.get(name, dtype=dtype, device=device)
        t = self._aligner.get(self._ref, name)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)


def align_checkpoints(recipe, ckpts: dict[str, LocalCheckpoint],
                      vocab: MergedVocabulary | None) -> dict[str, LocalCheckpoint]:
    """``ckpts`` with each merged model whose vocabulary rows move replaced by an aligned view of it
    (its config's ``vocab_size`` the output's). Models already in the output's layout stay as they are."""
    if vocab is None:
        return ckpts
    aligner = _Aligner(recipe, dict(ckpts), vocab)
    out = dict(ckpts)
    for ref in vocab.permutations:
        ckpt = ckpts[ref]
        if vocab.unchanged_for(ref, int(ckpt.config.get("vocab_size") or -1)):
            continue
        reader = _AlignedReader(ckpt.reader(), ref, aligner, vocab.size)
        out[ref] = dataclasses.replace(ckpt, config={**ckpt.config, "vocab_size": vocab.size}, _reader=reader)
    return out
