"""Edit a loaded model fact by fact: apply, list, undo (bit-exact), export.

Undo is exact even out of order because weights are never "un-added": the
session keeps a pristine copy of every tensor it has touched and each edit's
exact delta, and after any change sets the tensor to
``pristine + Δ₁ + Δ₂ + …`` over the still-active edits, always in the same
order with the same float operations. So undoing the last edit returns the
bits from before it, undoing all edits returns the original bits, and
undoing edit 1 of 2 gives exactly ``pristine + Δ₂``.

Methods (:mod:`editing.methods`): ``rome``, ``r-rome``, ``alphaedit`` (one layer) and
``memit``, ``alphaedit-memit`` (several layers), per session or per call. The
session keeps every active edit's keys per layer, so a later AlphaEdit edit also
preserves them (sequential editing); undoing an edit drops its keys. Statistics
(and AlphaEdit's projectors) describe the unedited model: they are computed and
looked up with the pristine weights swapped in.

Every edit is checked (:mod:`editing.checks`): a non-finite update is refused;
‖ΔW‖, ‖ΔW‖/‖W‖ and the KL on neutral text land in ``info["checks"]``, with a
``warning`` when the update looks like a disabling edit.

Example::

    session = EditSession(model, tokenizer, corpus=corpus_from_file("wiki.txt"))
    e = session.apply(EditRequest("{} is located in the city of", "Eiffel Tower", "Rome"))
    session.history            # [{"id": 1, "subject": "Eiffel Tower", "checks": {...}, ...}]
    session.apply(EditRequest(...), method="alphaedit")
    session.export_adapter(Path("eiffel-rome-lora"))
    session.undo(e.id)
"""

from __future__ import annotations

import logging
from functools import partial
import time
from contextlib import contextmanager
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from checkpoints.arch import spec_for
from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Job
from checkpoints.sources import public_name

from .alphaedit import AlphaEditHyperParams, compute_alphaedit
from .deltas import Deltas, delta_of
from .checks import CheckSettings, NeutralProbe, require_finite, target_check, update_checks, update_norms
from .methods import FALLBACK_METHOD, MULTI_LAYER, batch_method, check_method, rome_hparams_for
from .patch import PatchHyperParams, host_module, is_patch_parameter
from .patch_session import PatchEdits
from .session_export import ExportEdits
from .stored_precision import PrecisionReport
from .request import EditRequest, check_request
from .rome import RomeHyperParams, compute_rome, default_layer, generate_prefixes
from .stats import Corpus, StatsCache, layer_identity, resolve_corpus

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


@dataclass
class AppliedEdit:
    """One entry of the history: a ROME edit (one request) or a MEMIT batch (several).

    ``factors[module] = (B [out, r], A [r, in])`` with ``ΔW[out,in] = B @ A``;
    ``deltas[param name]`` is the exact delta added to the stored weight;
    ``keys[layer]`` ``[n, in]`` the keys the edit wrote (later AlphaEdit edits preserve them).
    """

    id: int
    method: str
    requests: list[EditRequest]
    layers: list[int]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    deltas: Mapping[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        facts = [r.as_dict() for r in self.requests]
        out: dict[str, Any] = {"id": self.id, "method": self.method, "layers": self.layers}
        if len(facts) == 1:
            out.update({k: v for k, v in facts[0].items() if k != "layer"})
        else:
            out["facts"] = [{k: v for k, v in f.items() if k != "layer"} for f in facts]
        out.update({k: v for k, v in self.info.items() if k in (
            "seconds", "steps", "target_prob_before", "target_prob_after_geomean", "corpus", "stats_tokens",
            "update_at", "value_from", "nullspace_dim", "residual_unreached", "slots", "subject_score_min",
            "threshold", "checks")})
        return out

    @property
    def warning(self) -> str:
        """The checks' one-line warning ("" when the update looks normal)."""
        return str(self.info.get("checks", {}).get("warning", ""))


class _Stages:
    """One monotone bar over an edit's two stages: the statistics (first use only) and the update.

    The statistics take the first half when they are computed; found in the cache they
    report nothing, and the update then has the whole bar.
    """

    def __init__(self, progress: Progress | None):
        self.progress, self.used_first = progress, False

    def first(self, fraction: float, text: str) -> None:
        self.used_first = True
        if self.progress:
            self.progress(0.5 * fraction, text)

    def rest(self, fraction: float, text: str) -> None:
        if self.progress:
            start = 0.5 if self.used_first else 0.0
            self.progress(start + (1 - start) * fraction, text)


class EditSession(PatchEdits, ExportEdits):
    """Edits applied in place to ``model`` (a loaded transformers causal LM).

    Args:
        model, tokenizer: the loaded pair (float32 recommended on CPU).
        stats: the statistics cache (default: on disk under ``weightsmith_home()``).
        hparams: ROME settings (:class:`RomeHyperParams`), also the keys/values of r-ROME and AlphaEdit.
        method: default method of :meth:`apply` (:data:`editing.methods.METHODS`); None: ``patch`` where
            the model can hold it, else ``memit`` (:data:`editing.methods.DEFAULT_METHOD`).
        alpha_hparams: AlphaEdit settings (:class:`AlphaEditHyperParams`).
        patch_hparams: how the patch method detects a subject (:class:`editing.patch.PatchHyperParams`).
        check_settings: thresholds of the disabling-edit checks (:class:`CheckSettings`).
        store_dtype: the dtype :meth:`export_model` writes (the checkpoint's own, e.g. bfloat16); None: the model's.
        corpus: statistics corpus: a :class:`Corpus`, a text-file path, ``"hf:NAME/CONFIG"``,
            or None for text the model samples itself (offline default).
        stats_tokens: tokens of corpus for the statistics (default 100k for text, 10k sampled).
        base_name: public name of the base model for cards (default: from the config).
    """

    def __init__(self, model, tokenizer, *, stats: StatsCache | None = None,
                 hparams: RomeHyperParams | None = None, corpus: Corpus | str | Path | None = None,
                 stats_tokens: int | None = None, base_name: str | None = None, memit_hparams: Any = None,
                 method: str | None = None, alpha_hparams: AlphaEditHyperParams | None = None,
                 check_settings: CheckSettings | None = None, patch_hparams: PatchHyperParams | None = None,
                 store_dtype: torch.dtype | None = None):
        self.model = model
        self.store_dtype = store_dtype
        self.precision_report: PrecisionReport | None = None  # the last export's check at its stored dtype
        self.tokenizer = tokenizer
        self.spec = spec_for(getattr(model.config, "model_type", None), strict=True)
        if not self.spec.mlp_out:
            raise WeightsmithError(f"unsupported architecture {self.spec.model_type!r} for editing")
        self.num_layers = self.spec.num_layers(model.config)
        self.stats = stats if stats is not None else StatsCache()
        self.hparams = hparams or RomeHyperParams()
        self.memit_hparams = memit_hparams
        # None: the default, chosen per model and layer (:meth:`_default_method`); else the named method.
        self.method = check_method(method) if method else None
        self._defaults: dict[int, str] = {}
        self._text_start_banks: dict[int, tuple[torch.Tensor, list[int]]] = {}  # patch checks, per layer
        self.alpha_hparams = alpha_hparams or AlphaEditHyperParams()
        self.check_settings = check_settings or CheckSettings()
        self.patch_hparams = patch_hparams or PatchHyperParams()
        # ‖ΔW‖ of every unflagged edit made in this session (undone ones too), per method: the outlier
        # check's reference.
        self._norms: dict[str, list[float]] = {}
        self._neutral_probe = NeutralProbe(model, tokenizer, self.check_settings.prompts)
        self.corpus = corpus if isinstance(corpus, Corpus) else resolve_corpus(corpus)
        self.stats_tokens = stats_tokens
        self.base_name = public_name(base_name or getattr(model.config, "_name_or_path", "") or "model")
        self._pristine: dict[str, torch.Tensor] = {}
        self._edits: list[AppliedEdit] = []
        self._next_id = 1
        self._prefixes: list[str] | None = None
        # layer -> identity of the unedited weights that feed it (the statistics' cache key): the
        # pristine weights never change, so each layer is hashed once per session, not once per edit.
        self._identities: dict[int, str] = {}

    # -- helpers ---------------------------------------------------------------------------------------
    @property
    def default_layer(self) -> int:
        return default_layer(self.spec.model_type, self.num_layers)

    @property
    def max_positions(self) -> int | None:
        c = self.model.config
        return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)

    def prefixes(self) -> list[str]:
        """The model-written prefixes (sampled once per session, seeded)."""
        if self._prefixes is None:
            self._prefixes = generate_prefixes(self.model, self.tokenizer, self.hparams.prefix_lengths,
                                               seed=self.hparams.seed)
        return self._prefixes

    @contextmanager
    def _pristine_weights(self):
        # Statistics describe the unedited model (as in the authors' code, which computes them once):
        # with the pristine tensors in place the cache key is the base model's, so edits never force a
        # recomputation (MEMIT's lower layers change the identity of the layers above them).
        touched = {n for e in self._edits for n in e.deltas}
        current = {n: self.model.get_parameter(n).detach().clone() for n in touched}
        with torch.no_grad():
            for name in touched:
                self.model.get_parameter(name).copy_(self._pristine[name])
        try:
            yield
        finally:
            with torch.no_grad():  # a copy back, not a refold: O(1) in the number of edits
                for name, w in current.items():
                    self.model.get_parameter(name).copy_(w)

    def statistics(self, layers: int | list[int], progress: Progress | None = None, *,
                   job: Job | None = None, kind: str = "C") -> dict[int, torch.Tensor]:
        """C = E[kkᵀ] of the unedited model for ``layers`` from the cache (computed on first use);
        ``kind="M"``: the MLP inputs' augmented second moment (:mod:`editing.stats`)."""
        progress = job.callback("computing the statistics") if job is not None else progress
        with self._pristine_weights():
            return self.stats.get(self.model, self.tokenizer, self.spec, layers, self.corpus, self.stats_tokens,
                                  progress=progress, identities=self._layer_identities(layers), kind=kind)

    def projectors(self, layers: int | list[int], progress: Progress | None = None, *,
                   job: Job | None = None) -> dict[int, tuple[torch.Tensor, int]]:
        """AlphaEdit's null-space projector of each layer's C: ``{layer: (P, kept directions)}`` (cached)."""
        progress = job.callback("computing the projector") if job is not None else progress
        with self._pristine_weights():
            return self.stats.projectors(self.model, self.tokenizer, self.spec, layers, self.corpus,
                                         self.stats_tokens, threshold=self.alpha_hparams.nullspace_threshold,
                                         progress=progress, identities=self._layer_identities(layers))

    def _layer_identities(self, layers: int | list[int]) -> dict[int, str]:
        # Called with the pristine weights in place (statistics describe the unedited model).
        for layer in [layers] if isinstance(layers, int) else layers:
            if layer not in self._identities:
                self._identities[layer] = layer_identity(self.model, self.spec, layer)
        return self._identities

    def prior_keys(self, layer: int) -> torch.Tensor | None:
        """Keys ``[in, m]`` the active edits wrote at ``layer`` (K_p of sequential AlphaEdit), or None."""
        rows = [e.keys[layer] for e in self._edits if layer in e.keys]
        return torch.cat(rows, dim=0).T.contiguous() if rows else None

    def _neutral(self) -> torch.Tensor:
        return self._neutral_probe.at(tuple(e.id for e in self._edits))

    def _layer_of(self, request: EditRequest) -> int:
        return self.default_layer if request.layer is None else int(request.layer)

    def check(self, request: EditRequest) -> None:
        """Raise one clear error if ``request`` cannot be applied (nothing is touched)."""
        check_request(request, self.tokenizer, self.num_layers, max_positions=self.max_positions)

    def _param_name(self, module: str) -> str:
        return f"{module}.weight"

    def _refold(self, names: set[str]) -> None:
        # pristine + Δ₁ + Δ₂ + … over active edits, always in history order: bit-exact undo.
        with torch.no_grad():
            for pname in names:
                w = self._pristine[pname].clone()
                for e in self._edits:
                    if pname in e.deltas:
                        w = w + e.deltas[pname]
                self.model.get_parameter(pname).copy_(w)

    def _commit(self, method: str, requests: list[EditRequest], layers: list[int],
                factors: dict[str, tuple[torch.Tensor, torch.Tensor]], info: dict[str, Any], *,
                keys: dict[int, torch.Tensor] | None = None, before: torch.Tensor | None = None,
                checks: dict[str, Any] | None = None) -> AppliedEdit:
        require_finite(factors)  # before anything changes
        # A patch's gate and up rows detect its subject; only its down column changes what the layer says,
        # and it is measured against the layer's own down projection.
        measured = {m: f for m, f in factors.items() if not is_patch_parameter(m) or m.endswith("down_proj")}
        current = {m: self.spec.as_out_in(self.model.get_parameter(self._param_name(host_module(m))).detach())
                   for m in measured}
        norm, relative = update_norms(measured, current)
        for module in factors:
            pname = self._param_name(module)
            if pname not in self._pristine:
                self._pristine[pname] = self.model.get_parameter(pname).detach().clone()
        deltas = self._deltas(factors)
        edit = AppliedEdit(self._next_id, method, requests, layers, factors, deltas, info,
                           {layer: k.detach().float() for layer, k in (keys or {}).items()})
        self._next_id += 1
        self._edits.append(edit)
        with torch.no_grad():
            # The weights are pristine + Δ₁ + … + Δₙ₋₁ (the refold invariant), so adding Δₙ gives the
            # refold's bits without re-summing every earlier edit (linear, not quadratic, in a sequence).
            for pname, d in deltas.items():
                param = self.model.get_parameter(pname)
                param.copy_(param + d)
        after = self._neutral() if before is not None else None
        # Did it take? One teacher-forced pass per fact on its own prompt (r-ROME's update is exact at
        # the mean key, so a prompt whose key lies far from it can keep its old answer).
        targets = ([(r.target, target_check(self.model, self.tokenizer, r.text, r.target)) for r in requests]
                   if before is not None else None)
        earlier = self._norms.setdefault(method, [])
        unedited = self._neutral_probe.unedited(self._pristine_weights) if after is not None else None
        info["checks"] = (dict(checks) if checks is not None else
                          update_checks(norm, relative, before, after, list(earlier), self.check_settings, targets,
                                        unedited=unedited, active_edits=len(self._edits), notes=info.pop("notes", ())))
        if not info["checks"].get("flag"):
            earlier.append(norm)  # flagged updates would drag the reference median up towards themselves
        if info["checks"].get("warning") and checks is None:  # a replayed edit's warning was logged in its own run
            log.warning("edit %d: %s", edit.id, info["checks"]["warning"])
        return edit

    def _deltas(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Deltas:
        stored, rank_one = {}, {}
        for module, (B, A) in factors.items():
            pname = self._param_name(module)
            make = partial(delta_of, self.spec, B, A, self.model.get_parameter(pname).dtype)
            if B.shape[1] == 1:
                rank_one[pname] = make
            else:
                stored[pname] = make()
        return Deltas(stored, rank_one)

    # -- public API ------------------------------------------------------------------------------------
    def apply(self, request: EditRequest, progress: Progress | None = None, *,
              method: str | None = None, job: Job | None = None) -> AppliedEdit:
        """Compute and apply one edit (``method``: default the session's); returns the history entry.

        ``memit``/``alphaedit-memit`` go through :meth:`apply_batch` with this one request
        (around the request's layer, if given: :meth:`MemitHyperParams.layers_for`).
        Bad input raises before any change; so does a non-finite update.
        """
        progress = job.callback("the edit") if job is not None else progress  # a Stop lands before the commit
        stages = _Stages(progress)
        chosen = bool(method or self.method)
        method = check_method(method or self.method) if chosen else self._default_method(self._layer_of(request))
        if method in MULTI_LAYER:
            layers = None
            if request.layer is not None:
                from .memit import MemitHyperParams

                layers = (self.memit_hparams or MemitHyperParams()).layers_for(
                    self.spec.model_type, self.num_layers, request.layer)
            return self.apply_batch([request], progress=progress, method=method, layers=layers)
        self.check(request)
        layer = self._layer_of(request)
        t0 = time.time()
        before = self._neutral()
        module = self.spec.module("mlp_out", layer)
        if method == "alphaedit":
            P, kept = self.projectors(layer, progress=stages.first)[layer]
            t_stats = time.time() - t0
            B, A, K, info = compute_alphaedit(self.model, self.tokenizer, self.spec, [request], P, layer=layer,
                                              prefixes=self.prefixes(), hparams=self.hparams, alpha=self.alpha_hparams,
                                              prior_keys=self.prior_keys(layer), progress=stages.rest)
            info["nullspace_dim"] = kept
            factors, keys = {module: (B, A)}, {layer: K.T}
        elif method == "patch":
            try:
                factors, info = self._compute_patches([request], layer, stages)
            except WeightsmithError as e:
                if chosen:
                    raise
                # The default, not the user's choice: a subject this model's patch cannot detect gets MEMIT.
                log.warning("patch cannot write %r (%s): editing it with %s", request.subject, e, FALLBACK_METHOD)
                return self.apply(request, progress, method=FALLBACK_METHOD)
            t_stats, keys = info.pop("seconds_stats"), {}
        else:
            C = self.statistics(layer, progress=stages.first)[layer]
            t_stats = time.time() - t0
            result = compute_rome(self.model, self.tokenizer, self.spec, request, C, layer=layer,
                                  prefixes=self.prefixes(), hparams=rome_hparams_for(method, self.hparams),
                                  progress=stages.rest)
            info = dict(result.info)
            factors, keys = {module: (result.B[:, None], result.A[None, :])}, {layer: result.key[None, :]}
        info.update({"corpus": self.corpus.describe(), "stats_tokens": self.stats_tokens,
                     "seconds_stats": round(t_stats, 3)})
        req = EditRequest(request.prompt, request.subject, request.target, layer, request.target_true)
        edit = self._commit(method, [req], [layer], factors, info, keys=keys, before=before)
        info["seconds"] = round(time.time() - t0, 3)
        log.info("edit %d (%s): %s -> %s at layer %d in %.1f s", edit.id, method, request.subject, request.target,
                 layer, info["seconds"])
        return edit

    def replay(self, method: str, requests: list[EditRequest], layers: list[int],
               factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, keys: dict[int, torch.Tensor] | None = None,
               checks: dict[str, Any] | None = None) -> AppliedEdit:
        """Apply an edit computed earlier (its ``factors``, e.g. saved between the runs of a long sequence)
        without recomputing it. ``checks`` are the original run's: the history's flags and the outlier
        check's reference stay as they were; without them only the norm checks run (there is no "before")."""
        method = check_method(method)
        if method == "patch":
            factors = self._fit_patch_factors(layers[0], factors)
        return self._commit(method, list(requests), list(layers), factors, {"replayed": True}, keys=keys,
                            checks=checks)

    def apply_batch(self, requests: list[EditRequest], *, layers: list[int] | None = None,
                    progress: Progress | None = None, method: str | None = None,
                    job: Job | None = None) -> AppliedEdit:
        """Apply many facts at once as one history entry.

        ``method``: ``memit`` (default; ``alphaedit-memit`` when the session's method is an
        AlphaEdit one) spreads them over ``layers``; ``alphaedit`` writes them all into one
        layer (``layers=[L]`` or the default layer).
        """
        from .memit import MemitHyperParams, compute_memit, guard_directions

        progress = job.callback("the edit") if job is not None else progress
        stages = _Stages(progress)
        chosen = bool(method or self.method)
        if method is None:
            method = batch_method(self.method or ("memit" if layers and len(layers) > 1 else
                                                  self._default_method((layers or [self.default_layer])[0])))
        method = check_method(method)
        if method in ("rome", "r-rome"):
            raise WeightsmithError(f"{method} edits one fact at a time: use apply(), or method memit, "
                                   "alphaedit-memit or alphaedit for a batch")
        if not requests:
            raise WeightsmithError("no edits given")
        for r in requests:
            self.check(r)
        if method == "patch":
            layers = list(layers or [self.default_layer])
            if len(layers) != 1 or not 0 <= layers[0] < self.num_layers:
                raise WeightsmithError(f"patch writes one layer: give one of 0..{self.num_layers - 1}")
            t0, before = time.time(), self._neutral()
            try:
                factors, info = self._compute_patches(list(requests), layers[0], stages)
            except WeightsmithError as e:
                if chosen:
                    raise
                log.warning("patch cannot write this batch (%s): editing it with %s", e, FALLBACK_METHOD)
                return self.apply_batch(requests, progress=progress, method=FALLBACK_METHOD)
            edit = self._commit(method, list(requests), layers, factors, info, before=before)
            info["seconds"] = round(time.time() - t0, 3)
            return edit
        hp = self.memit_hparams or MemitHyperParams()
        if method == "alphaedit":
            layers = list(layers or [self.default_layer])
            if len(layers) != 1:
                raise WeightsmithError("alphaedit edits one layer: give one layer, or use alphaedit-memit")
        layers = list(layers or hp.layers_for(self.spec.model_type, self.num_layers))
        for layer in layers:
            if not 0 <= layer < self.num_layers:
                raise WeightsmithError(f"layer {layer} is out of range: the model has layers 0..{self.num_layers - 1}")
        t0 = time.time()
        before = self._neutral()
        if method == "alphaedit":
            layer = layers[0]
            P, kept = self.projectors(layer, progress=stages.first)[layer]
            B, A, K, info = compute_alphaedit(self.model, self.tokenizer, self.spec, requests, P, layer=layer,
                                              prefixes=self.prefixes(), hparams=self.hparams, alpha=self.alpha_hparams,
                                              prior_keys=self.prior_keys(layer), progress=stages.rest)
            info.update({"nullspace_dim": kept, "corpus": self.corpus.describe(), "stats_tokens": self.stats_tokens})
            edit = self._commit(method, list(requests), layers, {self.spec.module("mlp_out", layer): (B, A)}, info,
                                keys={layer: K.T}, before=before)
            info["seconds"] = round(time.time() - t0, 3)
            return edit
        alpha, projectors, prior, Cs, guarded = None, None, None, {}, None
        if method == "alphaedit-memit":
            alpha = self.alpha_hparams
            found = self.projectors(layers, progress=stages.first)
            projectors = {layer: P for layer, (P, _) in found.items()}
            prior = {layer: self.prior_keys(layer) for layer in layers}
        else:
            Cs = self.statistics(layers, progress=stages.first)
            if hp.keep_edit_keys or hp.shared_key_guard:
                prior = {layer: self.prior_keys(layer) for layer in layers}
            if hp.shared_key_guard or hp.gain_guard:
                guarded = {}
                for layer in layers:
                    W = guard_directions(hp, Cs[layer], (prior or {}).get(layer),
                                         self.stacked_factors(self.spec.module("mlp_out", layer)))
                    if W is not None:
                        guarded[layer] = W
        # compute_memit applies its layers as it goes (later layers see earlier ones). Those changes are
        # temporary: the touched weights are saved first and copied back afterwards (also on failure),
        # which restores their exact bits in O(1) per weight, where a refold would re-sum every earlier
        # edit (quadratic in a long sequence); the batch is committed as one entry below.
        saved: dict[str, torch.Tensor] = {}
        try:
            factors, info = compute_memit(self.model, self.tokenizer, self.spec, requests, layers, Cs,
                                          prefixes=self.prefixes(), hparams=hp, rome=self.hparams,
                                          apply_layer=partial(self._apply_memit_layer, saved), progress=stages.rest,
                                          alpha=alpha, projectors=projectors, prior_keys=prior, guarded=guarded)
        finally:
            with torch.no_grad():
                for pname, w in saved.items():
                    self.model.get_parameter(pname).copy_(w)
        keys = {layer: K.T for layer, K in info.pop("keys").items()}
        if alpha is not None:
            info["nullspace_dim"] = {layer: kept for layer, (_, kept) in found.items()}
        info.update({"corpus": self.corpus.describe(), "stats_tokens": self.stats_tokens})
        edit = self._commit(method, list(requests), layers, factors, info, keys=keys, before=before)
        info["seconds"] = round(time.time() - t0, 3)
        return edit

    def _apply_memit_layer(self, saved: dict[str, torch.Tensor], module: str, B: torch.Tensor,
                           A: torch.Tensor) -> None:
        # A temporary change so the next MEMIT layer sees this one; apply_batch copies ``saved`` back.
        pname = self._param_name(module)
        param = self.model.get_parameter(pname)
        if pname not in self._pristine:
            self._pristine[pname] = param.detach().clone()
        if pname not in saved:
            saved[pname] = param.detach().clone()
        with torch.no_grad():
            param.copy_(param + delta_of(self.spec, B, A, param.dtype))

    def undo(self, edit_id: int) -> None:
        """Remove edit ``edit_id`` (any order); the weights become exactly pristine + the other deltas."""
        match = [e for e in self._edits if e.id == edit_id]
        if not match:
            raise WeightsmithError(f"no active edit with id {edit_id} (active: {[e.id for e in self._edits]})")
        self._edits.remove(match[0])
        self._refold(set(match[0].deltas))

    def undo_all(self) -> None:
        names = set(self._pristine)
        self._edits.clear()
        self._refold(names)

    @property
    def edits(self) -> list[AppliedEdit]:
        return list(self._edits)

    @property
    def history(self) -> list[dict[str, Any]]:
        """The active edits, oldest first, as plain dicts (id, prompt, subject, targets, layer(s), timings)."""
        return [e.summary() for e in self._edits]
