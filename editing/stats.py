"""Second-moment statistics C = E[k kᵀ] of the MLP down-projection inputs, cached on disk.

A second kind, ``M`` (``kind="M"``), is the second moment of the MLP's own inputs x augmented with a
constant, E[[x; 1][x; 1]ᵀ]: its corner holds the mean input E[x]. Key-gated neurons
(:mod:`editing.patch`) are built from it.

ROME's update direction is u = C⁻¹k*, so C must describe what the edited
layer's keys look like on ordinary text. It is computed once per
(model identity, layer, corpus, token count) and stored under
``weightsmith_home()/stats``; nothing is kept in module globals.

* the **model identity** hashes exactly the weights that determine the keys
  of that layer: embeddings, the blocks below it, and the block itself except
  its down projection. An edit of layer ``l`` therefore keeps layer ``l``'s
  statistics valid (ROME's own code also reuses them), while a different
  model, or an edit below, gets fresh ones;
* the **corpus** is a text file, a ``datasets`` corpus (online), or, as the
  offline default, text the model samples itself (:func:`sampled_corpus`).

Example::

    cache = StatsCache()
    C = cache.get(model, tokenizer, spec, layer=4, corpus=corpus_from_file("wiki.txt"), n_tokens=100_000)[4]
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from checkpoints.arch import ArchSpec
from checkpoints.errors import WeightsmithError
from checkpoints.home import weightsmith_home

from .hooks import StopForward, forward_with_cache, get_module, stop_after
from .nullspace import nullspace_projector
from .patch import is_patch_parameter
from .request import start_token_id

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

DEFAULT_TOKENS = 100_000
DEFAULT_SAMPLED_TOKENS = 10_000  # sampling costs a full forward per token: fewer, still > 6x the key width
SEQ_LEN = 256


@dataclass(frozen=True)
class Corpus:
    """Where the statistics' text comes from.

    ``kind`` is ``file``, ``dataset`` or ``sampled``; ``name`` is safe to show
    (a file name, a dataset id, ``model-sampled``), never a local path;
    ``digest`` identifies the content.
    """

    kind: str
    name: str
    digest: str
    text: str | None = None
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "digest": self.digest[:16]}


def corpus_from_file(path: str | Path) -> Corpus:
    """A UTF-8 text file as corpus (e.g. ``wiki.test.raw``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise WeightsmithError(f"statistics corpus {p.name}: cannot read: {e.strerror or e}") from None
    if not text.strip():
        raise WeightsmithError(f"statistics corpus {p.name} is empty")
    return Corpus("file", p.name, hashlib.sha256(text.encode()).hexdigest(), text)


def corpus_from_dataset(name: str = "wikitext", config: str | None = "wikitext-103-raw-v1",
                        split: str = "train", max_chars: int = 2_000_000) -> Corpus:
    """A Hugging Face ``datasets`` corpus (needs ``datasets`` and a connection or a local cache)."""
    try:
        import datasets  # noqa: F401
        from datasets import load_dataset
    except ImportError:
        raise WeightsmithError("the `datasets` package is not installed: use a text file or the model-sampled corpus") from None
    try:
        ds = load_dataset(name, config, split=split, streaming=True)
        parts, size = [], 0
        for row in ds:
            t = row.get("text") or ""
            parts.append(t)
            size += len(t)
            if size >= max_chars:
                break
    except Exception as e:  # offline, unknown dataset, ...: one line for the user
        raise WeightsmithError(f"dataset {name}/{config}: cannot load ({str(e).splitlines()[0] if str(e) else e})") from None
    text = "\n".join(parts)
    return Corpus("dataset", f"{name}/{config}:{split}", hashlib.sha256(text.encode()).hexdigest(), text)


def sampled_corpus(seed: int = 0) -> Corpus:
    """Text sampled from the model itself (offline default); identified by its seed."""
    return Corpus("sampled", "model-sampled", f"sampled-seed{seed}", None, seed)


def resolve_corpus(spec: str | Path | None) -> Corpus:
    """``None``/``"sampled"`` → model-sampled; ``"hf:NAME[/CONFIG]"`` → datasets; else a text file."""
    if spec is None or str(spec) in ("", "sampled", "model-sampled"):
        return sampled_corpus()
    s = str(spec)
    if s.startswith("hf:"):
        name, _, config = s[3:].partition("/")
        return corpus_from_dataset(name, config or None)
    p = Path(s).expanduser()
    if not p.is_file():
        raise WeightsmithError(f"statistics corpus {p.name}: no such file")
    return corpus_from_file(p)


# -- model identity ---------------------------------------------------------------------------------------
def _tensor_digest(t: torch.Tensor) -> bytes:
    h = hashlib.sha256()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.digest()


def layer_identity(model: torch.nn.Module, spec: ArchSpec, layer: int) -> str:
    """Hash of the weights that determine the down-projection inputs of ``layer``."""
    edited = spec.module("mlp_out", layer) + "."
    h = hashlib.sha256(spec.model_type.encode())
    for name, p in model.named_parameters():
        loc = spec.locate(name)
        if loc.kind == "head" or is_patch_parameter(name):  # a session's patches are edits, not the model
            continue
        if loc.kind == "block" and (loc.block > layer or (loc.block == layer and name.startswith(edited))):
            continue
        h.update(name.encode())
        h.update(_tensor_digest(p))
    return h.hexdigest()


# -- computation -----------------------------------------------------------------------------------------
# What a statistic is taken of: "C" the down projection's inputs (ROME's keys), "M" the MLP's inputs
# with a constant 1 appended (so the mean input is part of the same matrix).
KINDS: dict[str, str] = {"C": "mlp_out", "M": "mlp"}


class _Accumulator:
    """Running Σ k kᵀ (float64) and count for several layers, fed by forward pre-hooks."""

    def __init__(self, model, spec: ArchSpec, layers: list[int], kind: str = "C"):
        self.sums: dict[int, torch.Tensor] = {}
        self.count = 0
        self.mask: torch.Tensor | None = None  # [B, T] of valid positions for the current batch
        self.augment = kind == "M"
        self.handles = []
        for layer in layers:
            self.handles.append(get_module(model, spec.module(KINDS[kind], layer)).register_forward_pre_hook(  # type: ignore[arg-type]
                self._hook(layer)))

    def _hook(self, layer: int):
        def hook(_mod, args):
            k = args[0].detach().float()
            k = k.reshape(-1, k.shape[-1]) if self.mask is None else k[self.mask]
            if self.augment:
                k = torch.cat([k, torch.ones_like(k[:, :1])], dim=1)
            s = (k.T @ k).double()
            self.sums[layer] = s if layer not in self.sums else self.sums[layer] + s
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def text_batches(tokenizer, text: str, n_tokens: int, seq_len: int) -> list[torch.Tensor]:
    # Tokenise paragraph by paragraph (fast tokenizers batch well), stop once we have enough.
    ids: list[int] = []
    paras = [p for p in text.split("\n") if p.strip()]
    step = 256
    for i in range(0, len(paras), step):
        for row in tokenizer(paras[i:i + step], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
        if len(ids) >= n_tokens:
            break
    ids = ids[:n_tokens]
    if len(ids) < min(n_tokens, 2 * seq_len):
        log.warning("statistics corpus has only %d tokens", len(ids))
    if not ids:
        raise WeightsmithError("the statistics corpus has no tokens")
    return [torch.tensor(ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)]


@torch.no_grad()
def compute_second_moments(model, tokenizer, spec: ArchSpec, layers: list[int], corpus: Corpus,
                           n_tokens: int, *, batch_size: int = 16, seq_len: int = SEQ_LEN,
                           progress: Progress | None = None, device: str | torch.device | None = None,
                           kind: str = "C") -> tuple[dict[int, torch.Tensor], int]:
    """E[k kᵀ] (float32) of the down-projection inputs of each layer in ``layers`` (``kind="M"``: of the
    MLP inputs with a 1 appended); returns (the matrix by layer, tokens used)."""
    device = device or next(model.parameters()).device
    acc = _Accumulator(model, spec, layers, kind)
    top = spec.module("mlp_out", max(layers))
    t0 = time.time()
    try:
        if corpus.kind == "sampled":
            _sample_into(model, tokenizer, acc, n_tokens, corpus.seed, progress, device)
        else:
            cfg = model.config
            limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
            chunks = text_batches(tokenizer, corpus.text or "", n_tokens, min(seq_len, limit or seq_len))
            for i in range(0, len(chunks), batch_size):
                group = chunks[i:i + batch_size]
                width = max(len(c) for c in group)
                ids = torch.zeros(len(group), width, dtype=torch.long)
                mask = torch.zeros(len(group), width, dtype=torch.bool)
                for j, c in enumerate(group):
                    ids[j, :len(c)] = c
                    mask[j, :len(c)] = True
                acc.mask = mask.to(device)
                with stop_after(model, top):
                    try:
                        model(input_ids=ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
                    except StopForward:
                        pass
                acc.count += int(mask.sum())
                if progress:
                    progress(min(1.0, acc.count / max(1, n_tokens)), "second-moment statistics")
    finally:
        acc.close()
    log.info("statistics for layers %s over %d tokens of %s in %.1f s", layers, acc.count, corpus.name, time.time() - t0)
    return {layer: (s / max(1, acc.count)).float() for layer, s in acc.sums.items()}, acc.count


def _sample_into(model, tokenizer, acc: _Accumulator, n_tokens: int, seed: int, progress, device,
                 batch: int = 64, length: int = 128) -> None:
    """Sample text from the model; the hooks see every sampled token's keys as it is generated."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    length = min(length, (getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or length) - 1)
    start = start_token_id(tokenizer)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    while acc.count < n_tokens:
        b = min(batch, max(1, (n_tokens - acc.count) // length + 1))
        ids = torch.full((b, 1), start, dtype=torch.long, device=device)
        past = None
        acc.mask = None
        for step in range(length):
            out, past = forward_with_cache(model, past, input_ids=ids[:, -1:])
            acc.count += b
            logits = out.logits[:, -1, :].float().cpu()
            logits[:, special] = float("-inf")  # keep to running text
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            ids = torch.cat([ids, nxt.to(device)], dim=1)
            if acc.count >= n_tokens:
                break
            # A batch is a minute or more on a small CPU: report (and let a Stop land) as it goes.
            if progress and step % 8 == 7:
                progress(min(1.0, acc.count / max(1, n_tokens)), "sampling text for statistics")
        if progress:
            progress(min(1.0, acc.count / max(1, n_tokens)), "sampling text for statistics")


# -- cache ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatsKey:
    model_id: str
    layer: int
    corpus: str
    n_tokens: int
    # "C" the second moment; "M" the MLP inputs' augmented one (:data:`KINDS`); "P<threshold>"
    # AlphaEdit's null-space projector of that C
    kind: str = "C"

    def filename(self) -> str:
        suffix = "" if self.kind == "C" else f"-{self.kind}"
        return f"{self.model_id[:20]}-L{self.layer}-{self.corpus[:20]}-{self.n_tokens}{suffix}.safetensors"

    @property
    def tensor_name(self) -> str:
        return self.kind if self.kind in KINDS else "P"

    def projector(self, threshold: float) -> "StatsKey":
        """The key of the null-space projector computed from this C with ``threshold``."""
        return StatsKey(self.model_id, self.layer, self.corpus, self.n_tokens, f"P{threshold:.6g}")


class StatsCache:
    """Explicit cache of second moments (and AlphaEdit projectors made from them): in memory for
    this object, and on disk under ``root``.

    Keyed by :class:`StatsKey`, so two models, layers, corpora or thresholds never share an entry.
    """

    def __init__(self, root: Path | None = None, *, memory: bool = True):
        self.root = Path(root) if root is not None else weightsmith_home() / "stats"
        self._mem: dict[StatsKey, torch.Tensor] = {}
        self.memory = memory
        self.last_computed_seconds: float | None = None
        self.last_missing: list[int] = []  # layers the last :meth:`get` had to compute (the others were cached)

    def key(self, model, spec: ArchSpec, layer: int, corpus: Corpus, n_tokens: int,
            identities: dict[int, str] | None = None, kind: str = "C") -> StatsKey:
        """``identities``: the caller's remembered :func:`layer_identity` by layer (hashing the
        embeddings and the blocks below costs a second or more per layer on a small CPU)."""
        ident = identities.get(layer) if identities else None
        return StatsKey(ident or layer_identity(model, spec, layer), layer, corpus.digest, int(n_tokens), kind)

    def lookup(self, key: StatsKey) -> torch.Tensor | None:
        if key in self._mem:
            return self._mem[key]
        path = self.root / key.filename()
        if path.is_file():
            try:
                c = load_file(str(path))[key.tensor_name]
            except Exception:  # a damaged cache file is recomputed, not fatal
                log.warning("ignoring unreadable statistics cache %s", path.name)
                return None
            if self.memory:
                self._mem[key] = c
            return c
        return None

    def store(self, key: StatsKey, c: torch.Tensor, meta: dict[str, str]) -> None:
        if self.memory:
            self._mem[key] = c
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".stats-", suffix=".partial", dir=self.root)
        os.close(fd)
        try:
            save_file({key.tensor_name: c.contiguous()}, tmp, metadata=meta)
            os.replace(tmp, self.root / key.filename())
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get(self, model, tokenizer, spec: ArchSpec, layers: int | list[int], corpus: Corpus,
            n_tokens: int | None = None, *, progress: Progress | None = None,
            device: str | torch.device | None = None, identities: dict[int, str] | None = None,
            kind: str = "C") -> dict[int, torch.Tensor]:
        """C (or ``kind="M"``, :data:`KINDS`) for each layer (the missing ones in one pass over the corpus)."""
        if kind not in KINDS:
            raise WeightsmithError(f"unknown statistics kind {kind!r}: one of {', '.join(KINDS)}")
        layers = [layers] if isinstance(layers, int) else list(layers)
        if n_tokens is None:
            n_tokens = DEFAULT_SAMPLED_TOKENS if corpus.kind == "sampled" else DEFAULT_TOKENS
        keys = {layer: self.key(model, spec, layer, corpus, n_tokens, identities, kind) for layer in layers}
        out = {layer: c for layer in layers if (c := self.lookup(keys[layer])) is not None}
        missing = [layer for layer in layers if layer not in out]
        self.last_missing = missing
        if missing:
            t0 = time.time()
            computed, used = compute_second_moments(model, tokenizer, spec, missing, corpus, n_tokens,
                                                    progress=progress, device=device, kind=kind)
            self.last_computed_seconds = time.time() - t0
            for layer, c in computed.items():
                self.store(keys[layer], c, {"layer": str(layer), "corpus": corpus.name, "tokens": str(used),
                                            "model_type": spec.model_type})
                out[layer] = c
        return out

    def projectors(self, model, tokenizer, spec: ArchSpec, layers: int | list[int], corpus: Corpus,
                   n_tokens: int | None = None, *, threshold: float, progress: Progress | None = None,
                   device: str | torch.device | None = None, identities: dict[int, str] | None = None
                   ) -> dict[int, tuple[torch.Tensor, int]]:
        """AlphaEdit's null-space projector P of each layer's C: ``{layer: (P, kept directions)}``.

        Computed once per (model identity, layer, corpus, tokens, threshold), from the cached C,
        and cached the same way (the eigendecomposition costs about a second per layer).
        """
        layers = [layers] if isinstance(layers, int) else list(layers)
        if n_tokens is None:
            n_tokens = DEFAULT_SAMPLED_TOKENS if corpus.kind == "sampled" else DEFAULT_TOKENS
        keys = {layer: self.key(model, spec, layer, corpus, n_tokens, identities).projector(threshold)
                for layer in layers}
        out: dict[int, tuple[torch.Tensor, int]] = {}
        for layer in layers:
            P = self.lookup(keys[layer])
            if P is not None:
                out[layer] = (P, int(round(float(P.diagonal().sum()))))  # trace of a projector = its rank
        missing = [layer for layer in layers if layer not in out]
        if missing:
            Cs = self.get(model, tokenizer, spec, missing, corpus, n_tokens, progress=progress, device=device,
                          identities=identities)
            for layer in missing:
                P, kept = nullspace_projector(Cs[layer], threshold)
                self.store(keys[layer], P, {"layer": str(layer), "corpus": corpus.name, "threshold": f"{threshold:g}",
                                            "kept": str(kept), "model_type": spec.model_type})
                out[layer] = (P, kept)
        return out
