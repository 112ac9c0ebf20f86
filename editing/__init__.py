"""Fact editing: causal tracing, ROME, r-ROME, AlphaEdit, MEMIT, edit sessions with exact undo, CounterFact scores.

Public API (stable)::

    from editing.trace import causal_trace, plot_trace, save_trace, TraceResult
    from editing.request import EditRequest
    from editing.session import EditSession          # apply / apply_batch / undo / history / export_model / export_adapter
    from editing.evaluate import evaluate_edit, load_records, run_eval
    from editing.stats import StatsCache, corpus_from_file, sampled_corpus, resolve_corpus
    from editing.rome import RomeHyperParams, default_layer
    from editing.memit import MemitHyperParams
    from editing.methods import METHODS, DEFAULT_METHOD   # rome, r-rome, alphaedit, memit, alphaedit-memit, patch
    from editing.alphaedit import AlphaEditHyperParams
    from editing.checks import CheckSettings             # disabling-edit checks: edit.info["checks"]

Submodules import torch/transformers lazily from the caller's side: nothing is
imported here, so ``import editing`` stays cheap.
"""
