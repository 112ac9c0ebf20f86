"""Mix LoRA adapters with PEFT's ``add_weighted_adapter``, scale the mix by depth (LiNeS), write it.

The mixing itself is PEFT's: adapters are attached to a PEFT model of the base
(:func:`checkpoints.peft_adapter.attach_adapters`) and combined with
``LoraModel.add_weighted_adapter`` (which calls ``peft.utils.merge_utils``).
The base model is never read for a mix: PEFT only needs the module tree, so it
gets a skeleton built from the base's config with uninitialised storage
(``to_empty``), which costs address space, not memory. Only a merge into the
base (:func:`merging.adapter_merge.write_merged_model`) streams the base weights.

Example::

    recipe = AdapterMixRecipe.from_yaml(Path("assets/recipes/mix-caps-pirate.yml"))
    result = mix_adapters(recipe, Path("out/caps-pirate"), job=Job.recording())
    result.out_dir, result.rank, result.exact_in_delta_w
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from checkpoints.cards import CardInfo, write_card
from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Job, legacy_job
from checkpoints.model_cache import building_models
from checkpoints.peft_adapter import (
    LoraAdapter,
    attach_adapters,
    compact_targets,
    factors_from_state,
    unit_scale_config,
    write_adapter,
)
from checkpoints.sources import LocalCheckpoint, public_name, resolve
from merging.adapter_files import check_compatible, load_adapter
from merging.adapter_merge import write_merged_model
from merging.adapter_methods import ADAPTER_METHODS, AdapterMethod, lines_lambda
from merging.adapter_recipe import AdapterMixRecipe
from merging.lines import auto_alpha

log = logging.getLogger(__name__)

MIX_NAME = "weightsmith_mix"

Progress = Callable[..., Any]  # the old progress(fraction, desc) keyword; gr.Progress fits
Cancel = Callable[[], bool]
_STEPS = 1000  # resolution of the old fraction callback when it is driven through legacy_job


@dataclass
class MixResult:
    """What :func:`mix_adapters` wrote.

    ``kind`` is ``"adapter"`` or ``"model"``; ``rank`` the mixed adapter's r;
    ``modules`` how many modules it targets; ``block_scales`` the LiNeS λ per
    block (empty without LiNeS); ``notes`` anything the user should know
    (e.g. PEFT's single-adapter rule).
    """

    out_dir: Path
    kind: str
    method: str
    exact_in_delta_w: bool
    rank: int
    modules: int
    adapters: list[str]
    weights: list[float]
    block_scales: dict[int, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    lines_alpha: float | None = None  # the α used (resolved when the recipe says "auto")


class _CallableEvent:
    """A cancel callable seen as the event a :class:`Job` checks (the old ``cancel=`` keyword)."""

    def __init__(self, fn: Cancel) -> None:
        self._fn, self._set = fn, False

    def is_set(self) -> bool:
        return self._set or bool(self._fn())

    def set(self) -> None:
        self._set = True


def job_from_callbacks(job: Job | None, progress: Progress | None, cancel: Cancel | Any | None) -> Job:
    """``job``, or one built from the old ``progress(fraction, desc)`` / ``cancel`` (callable or Event) keywords.

    For this session only (the app still passes those): the old forms are turned into what
    :func:`checkpoints.jobs.legacy_job` takes, a step callback and an event.
    """
    event = cancel if cancel is None or hasattr(cancel, "is_set") else _CallableEvent(cancel)
    steps = None if progress is None else (lambda done, total, text: progress(done / total, text))
    return legacy_job(job, steps, event, _STEPS)


@contextmanager
def few_threads(device: str | torch.device = "cpu", threads: int = 1) -> Iterator[None]:
    """Run CPU LAPACK (SVD) on ``threads`` threads, then restore the process setting.

    An SVD of adapter-sized matrices gains nothing from threads and loses a lot
    when the cores are shared: measured here, a 576×576 float32 SVD takes 0.17 s
    on one thread and 1–18 s on two while other processes load the CPU.
    """
    old = torch.get_num_threads()
    if torch.device(device).type != "cpu" or old <= threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def skeleton_model(base: LocalCheckpoint, device: str | torch.device = "cpu"):
    """The base's module tree with uninitialised float32 storage (weights are never read).

    PEFT needs only the modules to attach LoRA layers and combine them.
    ``to_empty`` reserves the storage without touching it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(base.support_dir), trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError/OSError/KeyError for unknown configs
        raise WeightsmithError(f"{base.name}: cannot read its config ({str(e).splitlines()[0] if str(e) else e})") from None
    # transformers patches process-wide state while it builds a model: one build at a time (see model_cache).
    with building_models(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to_empty(device=device).eval()


def _peft_mix(adapters: Sequence[LoraAdapter], weights: list[float], base: LocalCheckpoint, method: AdapterMethod,
              params: Mapping[str, Any], device: str | torch.device, notes: list[str], job: Job):
    """PEFT's add_weighted_adapter on a skeleton: (mixed factors, rank, all module paths).

    ``job`` is told each stage (0..1 of this step), so the bar moves while PEFT works.
    """
    from peft import get_peft_model_state_dict

    job.progress(0.0, "building the model skeleton")
    model = skeleton_model(base, device)
    job.check("the mix")
    job.progress(0.2, f"attaching {len(adapters)} adapter(s)")
    peft_model, names = attach_adapters(model, adapters, base.spec)
    job.check("the mix")
    job.progress(0.4, f"mixing with {method.name} (PEFT)")
    mix_names, mix_weights = names, weights
    if len(adapters) == 1:
        if method.name == "svd":
            # PEFT mixes a single adapter "linear" (rank kept); adding it again with
            # weight 0 keeps the sum exact and lets the SVD truncate to the rank.
            mix_names, mix_weights = [names[0], names[0]], [weights[0], 0.0]
        elif method.name not in ("linear", "cat"):  # cat of one adapter is still exact
            notes.append(f"one adapter: PEFT applies 'linear' instead of {method.name!r} (ΔW scaled by the weight)")
    kwargs: dict[str, Any] = {}
    if method.name.endswith("svd"):
        kwargs.update(svd_rank=params.get("rank"), svd_full_matrices=False)
    if "density" in params:
        kwargs["density"] = float(params["density"])
    if "majority_sign_method" in params:
        kwargs["majority_sign_method"] = params["majority_sign_method"]
    with torch.random.fork_rng(devices=[]), few_threads(device):
        torch.manual_seed(int(params.get("seed", 0)))  # DARE draws from the global generator
        try:
            peft_model.add_weighted_adapter(mix_names, mix_weights, MIX_NAME, combination_type=method.name, **kwargs)
        except (ValueError, RuntimeError) as e:
            raise WeightsmithError(f"PEFT could not mix with {method.name}: {str(e).splitlines()[0]}") from None
    # PEFT builds the factors so that B @ A is the mixed ΔW (input scalings are already inside).
    # The mix layer's own scaling is ignored on purpose: with rsLoRA copied from the first
    # adapter it would be √r instead of 1.
    job.progress(0.8, "reading the mixed factors")
    mixed = factors_from_state("mix", get_peft_model_state_dict(peft_model, adapter_name=MIX_NAME))
    rank = int(peft_model.peft_config[MIX_NAME].r)
    all_modules = [n for n, _ in peft_model.base_model.model.named_modules()]
    return mixed, rank, all_modules


def mix_adapters(recipe: AdapterMixRecipe, out_dir: Path, *, job: Job | None = None,
                 progress: Progress | None = None, cancel: Cancel | None = None,
                 device: str | torch.device = "cpu", merge_into_base: bool | None = None, overwrite: bool = False,
                 allow_local: bool = True, trusted_roots: Sequence[Path] = ()) -> MixResult:
    """Mix the recipe's adapters and write the result to ``out_dir``.

    Args:
        recipe: what to mix (see :class:`merging.adapter_recipe.AdapterMixRecipe`).
        out_dir: output folder; written in a temp folder beside it, then renamed.
        job: progress, cancel and log (:class:`checkpoints.jobs.Job`); a cancelled job stops
            with :class:`checkpoints.jobs.Cancelled` and nothing is written.
        progress, cancel: the old keywords (``progress(fraction, desc)``; a callable or an
            Event), kept for the app until it passes ``job=``.
        device: where the PEFT mix runs.
        merge_into_base: overrides ``recipe.merge_into_base``.
        overwrite: replace an existing ``out_dir``.
        allow_local, trusted_roots: the server's policy for the base and the adapters (see
            :func:`checkpoints.sources.resolve`): with ``allow_local=False`` only ``demo``, Hub ids and
            paths inside ``trusted_roots`` are read.

    Returns a :class:`MixResult`. The adapter output loads with
    ``PeftModel.from_pretrained(base, out_dir)``; the model output loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)``.
    """
    job = job_from_callbacks(job, progress, cancel)
    t0 = time.time()
    recipe.validate()
    out_dir = Path(out_dir)
    merge = recipe.merge_into_base if merge_into_base is None else merge_into_base
    if out_dir.exists() and not overwrite:
        raise WeightsmithError(f"{out_dir} already exists (choose another folder)")
    method = ADAPTER_METHODS[recipe.method]
    params = recipe.resolved_parameters()
    notes: list[str] = []

    job.progress(0.0, f"resolving base {public_name(recipe.base_model)}")
    base = resolve(recipe.base_model, allow_local=allow_local, trusted_roots=trusted_roots)
    spec = base.spec
    adapters = []
    for i, entry in enumerate(recipe.adapters):
        job.check("the mix")
        job.progress(0.05 + 0.15 * i / len(recipe.adapters), f"loading adapter {i + 1}/{len(recipe.adapters)}")
        adapters.append(load_adapter(recipe.adapter_ref(entry), allow_local=allow_local, trusted_roots=trusted_roots))
    check_compatible(adapters, base, check_names=recipe.check_base_name)
    weights = [e.weight for e in recipe.adapters]
    ranks = [a.rank for a in adapters]
    if method.space == "factors" and len(adapters) > 1 and len(set(ranks)) > 1:
        raise WeightsmithError(
            f"method {method.name} needs adapters of equal rank, got ranks {ranks}: use cat or svd instead"
        )
    svd_rank = params.get("rank")
    if method.name.endswith("svd") and svd_rank is not None:
        metas = base.reader().metas()
        limit = min(min(metas[spec.weight_name(m, metas)].shape) for a in adapters for m in a.factors)
        if svd_rank > limit:
            raise WeightsmithError(f"rank {svd_rank} is larger than the smallest targeted weight dimension ({limit})")

    job.check("the mix")
    job.progress(0.25, f"mixing {len(adapters)} adapter(s) with {method.name}")
    mixed, rank, all_modules = _peft_mix(adapters, weights, base, method, params, device, notes, job.part(0.25, 0.6))

    # Scale B by λ(block). The output config has lora_alpha = r and no rsLoRA,
    # so a loader's scaling is 1 and its ΔW is exactly B @ A.
    block_scales: dict[int, float] = {}
    lines_alpha: float | None = None
    if recipe.lines is not None:
        lines_alpha = recipe.lines.alpha
        if lines_alpha == "auto":
            lines_alpha = _auto_lines_alpha(adapters, mixed)
            notes.append(f"LiNeS alpha auto = {lines_alpha:.4g} (‖Σ ΔWᵢ‖₁ / (T·‖ΔW_mix‖₁), T = {len(adapters)})")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, (a, b) in mixed.items():
        factor = 1.0
        if lines_alpha is not None:
            block = spec.locate(f"{module}.weight").block
            factor = lines_lambda(block, base.num_layers, lines_alpha, recipe.lines.beta)
            if block is not None:
                block_scales[block] = factor
        factors[module] = (a.contiguous(), (b * factor).contiguous())
    for note in notes:
        job.note(note)
    result = MixResult(out_dir, "model" if merge else "adapter", method.name, method.exact_in_delta_w, rank,
                       len(mixed), [a.name for a in adapters], weights, dict(sorted(block_scales.items())), notes)
    result.lines_alpha = lines_alpha
    card = _mix_card(recipe, base, adapters, method, rank, merge, notes, out_dir.name, lines_alpha)
    job.check("the mix")
    if merge:
        job.progress(0.6, f"merging into {base.name}")
        write_merged_model(base, factors, out_dir, card, job=job.part(0.6, 0.95), overwrite=overwrite)
    else:
        job.progress(0.65, "writing adapter")
        config = unit_scale_config({m: a.shape[0] for m, (a, _) in factors.items()}, base_model=public_base(base), spec=spec,
                                   target_modules=compact_targets(list(factors), all_modules))
        write_adapter(out_dir, config, factors, extra=lambda folder: write_card(folder, card), overwrite=overwrite)
    result.seconds = time.time() - t0
    job.progress(1.0, f"wrote {result.kind} to {out_dir.name} in {result.seconds:.1f} s")
    return result


def _auto_lines_alpha(adapters: Sequence[LoraAdapter], mixed: Mapping[str, tuple]) -> float:
    """LiNeS' multi-task α for an adapter mix, in ΔW space: ‖Σ_t ΔW_t‖₁ / (T·‖ΔW_mix‖₁).

    As in the authors' code the task vectors enter unweighted; the sum runs over all modules.
    """
    total = merged = 0.0
    for module, (a, b) in mixed.items():
        tv = None
        for ad in adapters:
            if module in ad.factors:
                d = ad.delta(module)
                tv = d if tv is None else tv + d
        if tv is not None:
            total += float(tv.abs().sum())
        merged += float((b @ a).abs().sum())  # B @ A is the mixed ΔW (see mix_adapters)
    return auto_alpha(total, merged, len(adapters))


def public_base(base: LocalCheckpoint) -> str:
    """The base's name for cards and configs: its Hub id, else its public name (never a path)."""
    return base.hub_id or base.name


def _mix_card(recipe: AdapterMixRecipe, base: LocalCheckpoint, adapters: Sequence[LoraAdapter],
              method: AdapterMethod, rank: int, merge: bool, notes: list[str], title: str,
              lines_alpha: float | None) -> CardInfo:
    rows = ["| adapter | weight |", "|---|---|"] + [f"| {a.name} | {e.weight:g} |"
                                                    for a, e in zip(adapters, recipe.adapters)]
    exact = ("exact in ΔW space: ΔW = Σ wᵢ·ΔWᵢ" + (" truncated to rank " + str(rank) if method.name == "svd" else ""))
    if not method.exact_in_delta_w:
        exact = "not exact in ΔW space: " + method.description
    lines = ""
    if recipe.lines is not None:
        lines = (f" Each block's ΔW is then scaled by LiNeS, λ(ℓ) = {lines_alpha:.4g} + "
                 f"{recipe.lines.beta:g}·ℓ/(L−1).")
    summary = (f"A mix of {len(adapters)} LoRA adapter(s) for {public_base(base)} with PEFT's "
               f"`{method.name}` ({exact}), rank {rank}.{lines}"
               + (" The mixed ΔW is merged into the base weights." if merge else "")
               + "".join(f"\n\nNote: {n}" for n in notes) + "\n\n" + "\n".join(rows))
    tags = ["lora", "weightsmith"] + (["lines"] if recipe.lines is not None else [])
    return CardInfo(title=title, relation="merge" if merge else "adapter",
                    base_models=[public_base(base)], summary=summary,
                    library_name="transformers" if merge else "peft", tags=tags,
                    recipe_yaml=recipe.to_yaml(public=True))
