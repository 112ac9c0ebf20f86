"""One way to open an edit session on a checkpoint, and to prepare its statistics ahead of time.

The app's Edit tab opens its sessions with :func:`open_session`, and ``weightsmith demo-model``
(so ``make run``) calls :func:`prepare_statistics` with the same defaults: the statistics it
stores are exactly the entries (same :class:`editing.stats.StatsKey`: model identity, layer,
corpus, token count) that the app's first edit looks up, so that edit finds them on disk
instead of sampling them for minutes.

Example::

    with tqdm_job("demo statistics") as job:
        prepare_statistics("demo", job=job)       # default layer (C and M) + MEMIT's layers, model-sampled corpus
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from checkpoints.jobs import Job
from checkpoints.sources import resolve

from .memit import MemitHyperParams
from .session import EditSession
from .stats import StatsCache

log = logging.getLogger(__name__)

# A deployment may name a text file for the statistics; the server and the preparation read it here.
CORPUS_ENV = "WEIGHTSMITH_EDIT_CORPUS"


def configured_corpus() -> str | None:
    """The statistics corpus this installation uses: ``$WEIGHTSMITH_EDIT_CORPUS`` or None (model-sampled)."""
    return os.environ.get(CORPUS_ENV) or None


def open_session(ckpt, *, stats: StatsCache | None = None, corpus: str | Path | None = None,
                 stats_tokens: int | None = None, device: str = "cpu", method: str | None = None) -> EditSession:
    """An :class:`EditSession` on a resolved checkpoint, loaded as the CLI, the app and the preparation
    load it (float32 on ``device``: the same load gives the same model identity, hence the same statistics
    keys); the edited model is saved in the checkpoint's own dtype. ``method`` None: the default."""
    model, tokenizer = ckpt.load_model(device=device), ckpt.load_tokenizer()
    return EditSession(model, tokenizer, stats=stats, base_name=ckpt.hub_id or ckpt.name, corpus=corpus,
                       stats_tokens=stats_tokens, method=method, store_dtype=ckpt.stored_dtype)


def patch_possible(session: EditSession) -> bool:
    """Whether the default method, patch, can edit this architecture (a gated MLP); the rest of its
    check needs the statistics this module prepares."""
    from .patch import gated_mlp

    return gated_mlp(session.spec)


def default_layers(session: EditSession) -> list[int]:
    """The layers an edit without a layer uses: ROME's default layer and MEMIT's default span."""
    spread = MemitHyperParams().layers_for(session.spec.model_type, session.num_layers)
    return sorted({session.default_layer, *spread})


@dataclass
class Prepared:
    """What :func:`prepare_statistics` did: the layers, those it had to compute (the others were cached), its time."""

    layers: list[int]
    computed: list[int]
    seconds: float


def prepare_statistics(ref: str = "demo", *, layers: list[int] | None = None, corpus: str | Path | None = None,
                       stats_tokens: int | None = None, stats: StatsCache | None = None, device: str = "cpu",
                       job: Job | None = None) -> Prepared:
    """Compute (or find) the statistics of ``ref``'s default edit layers in the statistics cache.

    ``corpus`` None: the installation's (:func:`configured_corpus`); ``stats``: the on-disk cache under
    ``weightsmith_home()/stats`` that the app reads. Statistics already there are not recomputed.
    """
    t0 = time.time()
    stats = stats if stats is not None else StatsCache()
    session = open_session(resolve(ref), stats=stats, corpus=corpus if corpus is not None else configured_corpus(),
                           stats_tokens=stats_tokens, device=device)
    layers = list(layers) if layers is not None else default_layers(session)
    computed: list[int] = []
    if patch_possible(session):  # the default method's statistics: the MLP inputs' at its layer (kind M)
        session.statistics(session.default_layer, job=job, kind="M")
        computed += stats.last_missing
    session.statistics(layers, job=job)  # ROME's and MEMIT's (also the default's fallback)
    computed += [layer for layer in stats.last_missing if layer not in computed]
    if job is not None:
        job.progress(1.0, "statistics ready")
    done = Prepared(layers, computed, time.time() - t0)
    log.info("statistics of %s for layers %s ready in %.1f s (computed: %s)", ref, layers, done.seconds,
             done.computed or "none, all cached")
    return done
