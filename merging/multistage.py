"""Multi-stage merge recipes: several YAML documents, later stages using earlier results by name.

The semantics are mergekit-multi's (mergekit 0.1.5, ``mergekit/scripts/multimerge.py``):

* each ``---``-separated document is a merge recipe plus ``name:``; at most one
  document has no name, and that one is the final merge (written to the output);
  without one, the last document is the final merge;
* a model reference whose model part is a stage's name means that stage's result,
  wherever a model is named (``models``, ``base_model``, ``slices``, the tokenizer's
  source), also with an adapter (``stage1+org/lora``); documents may come in any order;
* a duplicate name, a second unnamed document, or a cycle is an error.

Where Weightsmith differs, it says so:

* intermediate results are a cache, ``<intermediate>/<key>/<stage name>/``: the key
  is a hash of the stage's recipe, its inputs' identity (an earlier stage's key;
  each file's path, size and modification time) and the options that change tensors.
  An unchanged stage is reused; a changed one (its recipe, or a stage or model it
  reads) is merged again and its older results are removed. mergekit's ``--lazy``
  only checks that a folder exists, so it keeps a stale stage 1 after an edit;
* only the stages the final merge needs are run (a note names any other);
* a reference to an undefined stage (a bare name that is no stage and no model)
  is one error naming the stages, before anything runs;
* the final output's card lists the whole chain, stage by stage, names every model
  the chain started from as a base, and carries the whole recipe; the output's
  ``weightsmith_recipe.yml`` is that whole recipe (public names), so it runs again.

Progress and cancel go through one :class:`checkpoints.jobs.Job`: each stage runs in
a :meth:`~checkpoints.jobs.Job.part` of it, and reuse is noted in its log.

Example::

    run = run_recipe(Path("stages.yml"), Path("out"), intermediate_dir=Path("scratch"))
    [(s.name, s.reused) for s in run.stages], run.result.tensors_changed
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from checkpoints.errors import WeightsmithError
from checkpoints.home import weightsmith_home
from checkpoints.jobs import Job, ensure
from checkpoints.refs import is_hub_id, join_lora_ref, split_lora_ref
from checkpoints.sources import public_name
from checkpoints.staging import staged_folder
from checkpoints.textfiles import load_yaml_documents, read_text

from .adapter_files import find_adapter_files
from . import engine  # engine.run_merge looked up per call, so a test (or a caller) may substitute it
from .engine import MergeResult
from .lora_inputs import resolve_input, source_files
from .merge_files import RECIPE_NAME
from .recipe import MergeRecipe

log = logging.getLogger(__name__)

Rename = Callable[[str], str]
_STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", re.ASCII)
# run_merge options that change the tensors a stage produces (so they are part of its cache key)
_TENSOR_OPTIONS = ("seed", "exact_ties", "allow_nonfinite", "device")
_KEY_VERSION = 1


def default_intermediate_dir() -> Path:
    """Where the CLI keeps intermediate stages unless told otherwise."""
    return weightsmith_home() / "intermediate"


@dataclass
class Stage:
    """One document: its name (None for the unnamed final one), recipe, and the stages it reads."""

    name: str | None
    recipe: MergeRecipe
    reads: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name or "final"


@dataclass
class StagedRecipe:
    """A multi-stage recipe, parsed and checked. ``stages`` in document order; ``final`` is the output's stage."""

    stages: list[Stage]
    final: Stage

    @classmethod
    def from_documents(cls, docs: Sequence[Any], *, known_model: Callable[[str], bool]) -> "StagedRecipe":
        """Build from parsed documents; ``known_model(word)`` says whether a bare word that is no stage
        names a model (else it is reported as an undefined stage)."""
        stages: list[Stage] = []
        names: set[str] = set()
        for i, doc in enumerate(docs):
            if not isinstance(doc, dict):
                raise WeightsmithError(f"recipe document {i + 1} must be a mapping (a merge recipe with a name)")
            doc = dict(doc)
            name = doc.pop("name", None)
            if name is not None:
                if not isinstance(name, str) or not _STAGE_NAME.fullmatch(name):
                    raise WeightsmithError(f"recipe document {i + 1}: name must be letters, digits, '_', '-' or "
                                           f"'.' (at most 64, not starting with '.' or '-'), got {name!r}")
                if name in names:
                    raise WeightsmithError(f"recipe: two stages are named {name}")
                names.add(name)
            elif any(s.name is None for s in stages):
                raise WeightsmithError("recipe: only one document may have no name (the final merge)")
            try:
                recipe = MergeRecipe.from_dict(doc)
            except WeightsmithError as e:
                raise WeightsmithError(f"stage {name or 'final'}: {e}") from None
            stages.append(Stage(name, recipe))
        if not stages:
            raise WeightsmithError("recipe: no merge documents")
        for stage in stages:
            for ref in stage.recipe.model_refs():
                model = split_lora_ref(ref)[0]
                if model in names:
                    if model not in stage.reads:
                        stage.reads.append(model)
                elif _STAGE_NAME.fullmatch(model) and not known_model(model):
                    raise WeightsmithError(
                        f"stage {stage.label}: {model!r} is neither a stage of this recipe "
                        f"({', '.join(sorted(names)) or 'none is named'}) nor a model")
        final = next((s for s in stages if s.name is None), stages[-1])
        staged = cls(stages, final)
        staged.run_order()  # raises on a cycle
        return staged

    def by_name(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def run_order(self) -> list[Stage]:
        """The final stage's ancestors, each after the stages it reads, the final last."""
        order: list[Stage] = []
        path: list[Stage] = []  # by identity: an unnamed final and a stage named "final" are two stages

        def visit(stage: Stage) -> None:
            if any(stage is s for s in order):
                return
            if any(stage is s for s in path):
                cycle = path[next(i for i, s in enumerate(path) if s is stage):] + [stage]
                raise WeightsmithError(f"recipe: the stages {' -> '.join(s.label for s in cycle)} form a cycle")
            path.append(stage)
            for dep in stage.reads:
                visit(self.by_name(dep))
            path.pop()
            order.append(stage)

        for stage in self.stages:  # every stage, so a cycle away from the final is reported too
            visit(stage)
        needed = [self.final]
        for stage in reversed(order):  # dependencies come before their readers
            if any(stage is s for s in needed):
                needed += [self.by_name(dep) for dep in stage.reads]
        return [s for s in order if any(s is n for n in needed)]


@dataclass
class StageRun:
    """What happened to one stage: its cache key (empty for the final one, which is not cached), whether
    it was reused, where its result is."""

    name: str
    key: str
    reused: bool
    seconds: float
    folder: Path


@dataclass
class RecipeRun:
    """A recipe's run: the final merge's result and, for a multi-stage recipe, each stage in run order."""

    result: MergeResult
    stages: list[StageRun] = field(default_factory=list)


def parse_recipe_documents(text: str) -> list[Any]:
    """The recipe's YAML documents (empty ones, such as after a trailing ``---``, dropped)."""
    return [d for d in load_yaml_documents(text, what="recipe") if d is not None]


def is_multistage(docs: Sequence[Any]) -> bool:
    """True for more than one document, or one with a ``name:`` (a single plain recipe otherwise)."""
    return len(docs) > 1 or (len(docs) == 1 and isinstance(docs[0], dict) and "name" in docs[0])


def run_recipe(recipe: str | Path, out_dir: Path | str, *, intermediate_dir: Path | str | None = None,
               rename: Rename | None = None, job: Job | None = None, overwrite: bool = False,
               allow_local: bool = True, trusted_roots: Sequence[Path] = (), **merge_options: Any) -> RecipeRun:
    """Run a recipe, single or multi-stage, into ``out_dir``: what ``weightsmith merge`` and the Merge tab call.

    Args:
        recipe: YAML text, or a :class:`Path` (or a ``.yml``/``.yaml`` name) to read it from.
        out_dir: the final merge's folder (must not exist unless ``overwrite``).
        intermediate_dir: the cache of intermediate stages (default :func:`default_intermediate_dir`).
        rename: maps each model reference that is not a stage name (e.g. the app's ``ws:`` items
            to folders); applied to both sides of ``model+adapter``.
        job: progress, cancel and log; each stage reports into its own part of it.
        allow_local, trusted_roots: the resolver's policy; the intermediate folder is trusted too.
        merge_options: passed to :func:`merging.engine.run_merge` (device, seed, threads, ...).

    Returns a :class:`RecipeRun`. Raises :class:`WeightsmithError` with one line for a bad recipe
    (before anything runs) and :class:`checkpoints.jobs.Cancelled` when cancelled.
    """
    is_file = isinstance(recipe, Path) or ("\n" not in recipe and recipe.endswith((".yml", ".yaml")))
    text = read_text(Path(recipe), what="recipe") if is_file else str(recipe)
    docs = parse_recipe_documents(text)
    out_dir = Path(out_dir)
    policy = dict(allow_local=allow_local, trusted_roots=tuple(trusted_roots))
    if not is_multistage(docs):
        single = MergeRecipe.from_dict(docs[0] if docs else None)
        if rename is not None:
            single = single.with_models_renamed(lambda r: _rename_sides(r, rename))
        return RecipeRun(engine.run_merge(single, out_dir, job=job, overwrite=overwrite, **policy, **merge_options))
    staged = StagedRecipe.from_documents(docs, known_model=lambda word: _known_model(word, rename, allow_local))
    if out_dir.exists() and not overwrite:  # before any stage runs
        raise WeightsmithError(f"{out_dir} already exists (choose another folder or allow overwrite)")
    return _run_staged(staged, out_dir, Path(intermediate_dir or default_intermediate_dir()), rename, ensure(job),
                       overwrite, policy, merge_options)


def _known_model(word: str, rename: Rename | None, allow_local: bool) -> bool:
    if rename is not None:
        try:
            rename(word)
            return True
        except WeightsmithError:
            return False
    # Looked up on this disk only where local paths are allowed (a server must not reveal what exists).
    return word == "demo" or is_hub_id(word) or (allow_local and Path(word).expanduser().exists())


def _rename_sides(ref: str, rename: Rename) -> str:
    model, lora = split_lora_ref(ref)
    return join_lora_ref(rename(model), rename(lora) if lora is not None else None)


def _run_staged(staged: StagedRecipe, out_dir: Path, intermediate: Path, rename: Rename | None, job: Job,
                overwrite: bool, policy: dict[str, Any], merge_options: dict[str, Any]) -> RecipeRun:
    order = staged.run_order()
    skipped = [s.label for s in staged.stages if s not in order]
    if skipped:
        job.note(f"stages not used by the final merge, not run: {', '.join(skipped)}")
    policy = {**policy, "trusted_roots": (*policy["trusted_roots"], intermediate)}
    options = {k: merge_options.get(k) for k in _TENSOR_OPTIONS}
    folders: dict[str, Path] = {}
    keys: dict[str, str] = {}
    runs: list[StageRun] = []
    result: MergeResult | None = None
    for i, stage in enumerate(order):
        job.check("the multi-stage merge")
        part = job.part(i / len(order), (i + 1) / len(order))
        started = time.perf_counter()

        def resolved(ref: str) -> str:
            model, lora = split_lora_ref(ref)
            mapped = str(folders[model]) if model in folders else rename(model) if rename else model
            return join_lora_ref(mapped, (rename(lora) if rename else lora) if lora is not None else None)

        recipe = stage.recipe.with_models_renamed(resolved)
        if stage is staged.final:  # not cached: it is the output
            result = _run_final(staged, recipe, out_dir, overwrite, part, policy, merge_options,
                                lambda r: _public_ref(r, {n.name for n in staged.stages if n.name}, rename))
            key, folder, reused = "", out_dir, False
        else:
            key = keys[stage.label] = _stage_key(stage, resolved, keys, options, policy)
            folder = intermediate / key[:16] / stage.label
            reused = (folder / "config.json").is_file()
            if reused:
                part.progress(1.0, f"stage {stage.label}: unchanged, reused")
                job.note(f"stage {stage.label}: reused the cached result {key[:16]} (recipe and inputs unchanged)")
            else:
                part.progress(0.0, f"stage {stage.label}: merging")
                engine.run_merge(recipe, folder, job=part, overwrite=True, **policy, **merge_options)
                _drop_older(intermediate, stage.label, keep=folder)
                job.note(f"stage {stage.label}: merged into the cache as {key[:16]}")
            folders[stage.label] = folder
        runs.append(StageRun(stage.label, key, reused, time.perf_counter() - started, folder))
    assert result is not None  # the final stage is always last in the run order
    return RecipeRun(result, runs)


def _stage_key(stage: Stage, resolved: Rename, keys: dict[str, str], options: dict[str, Any],
               policy: dict[str, Any]) -> str:
    """sha256 of the stage's recipe, its inputs' identity and the options that change tensors."""
    inputs: dict[str, Any] = {}
    for ref in stage.recipe.model_refs():
        model, lora = split_lora_ref(ref)
        if model in keys:
            ident: dict[str, Any] = {"stage": keys[model]}
            if lora is not None:
                _, config, weights = find_adapter_files(split_lora_ref(resolved(ref))[1], **policy)  # type: ignore[arg-type]
                ident["adapter"] = _file_facts([config, weights])
        else:
            ident = {"files": _file_facts(source_files(resolve_input(resolved(ref), **policy)))}
        inputs[ref] = ident
    payload = {"version": _KEY_VERSION, "recipe": stage.recipe.to_dict(), "inputs": inputs,
               "options": {k: str(v) for k, v in options.items()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _file_facts(files: Sequence[Path]) -> list[list[Any]]:
    """(real path, size, modification time in ns) of each file: a changed file changes the key."""
    facts = []
    for f in files:
        st = Path(f).stat()
        facts.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    return sorted(facts)


def _drop_older(intermediate: Path, name: str, *, keep: Path) -> None:
    """Remove this stage's earlier cached results (other keys), so the cache holds one per stage name."""
    for old in intermediate.glob(f"*/{name}"):
        if old != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            try:
                old.parent.rmdir()
            except OSError:
                pass  # another stage's result lives under the same key folder


def _public_ref(ref: str, stages: set[str], rename: Rename | None) -> str:
    """A reference as the card shows it: a stage by its name, a model by its public name."""
    def shown(side: str) -> str:
        try:
            return public_name(rename(side) if rename else side)
        except WeightsmithError:  # a stage that did not run may name what this server refuses
            return public_name(side)

    model, lora = split_lora_ref(ref)
    return join_lora_ref(model if model in stages else shown(model), shown(lora) if lora is not None else None)


def _run_final(staged: StagedRecipe, recipe: MergeRecipe, out_dir: Path, overwrite: bool, job: Job,
               policy: dict[str, Any], merge_options: dict[str, Any], public: Rename) -> MergeResult:
    """The final stage into ``out_dir``, its card and recipe file telling the whole chain; all or nothing."""
    from checkpoints.cards import add_card_section

    order = staged.run_order()
    whole = "".join(f"---\n{_public_yaml(s, public)}" for s in staged.stages)
    leaves = list(dict.fromkeys(public(r) for s in order for r in s.recipe.model_refs()
                                if split_lora_ref(r)[0] not in {t.name for t in staged.stages}))
    with staged_folder(out_dir, overwrite=overwrite) as tmp:
        inner = tmp / "merge"
        result = engine.run_merge(recipe, inner, job=job, **policy, **merge_options)
        for f in inner.iterdir():
            f.rename(tmp / f.name)
        inner.rmdir()
        (tmp / RECIPE_NAME).write_text(whole, encoding="utf-8")
        add_card_section(tmp, "Merge stages", _chain_markdown(order, staged.final, public, whole),
                         tags=("multi-stage",), base_models=leaves)
    result.out_dir = out_dir
    return result


def _public_yaml(stage: Stage, public: Rename) -> str:
    import yaml

    data = ({"name": stage.name} if stage.name else {}) | stage.recipe.with_models_renamed(public).to_dict()
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)


def _chain_markdown(order: list[Stage], final: Stage, public: Rename, whole: str) -> str:
    lines = [f"Made by a multi-stage recipe in {len(order)} stages (mergekit-multi's format): each stage "
             "merges models or earlier stages, named below.", ""]
    for i, stage in enumerate(order, 1):
        r = stage.recipe
        inputs = ", ".join(public(m.model) for m in r.non_base_models()) if r.models else \
            ", ".join(dict.fromkeys(public(s.model) for sl in r.slices for s in sl.sources))
        base = f" on {public(r.base_model)}" if r.base_model else ""
        this = " (this model)" if stage is final else ""
        lines.append(f"{i}. **{stage.label}**{this}: {r.merge_method} of {inputs}{base}")
    lines += ["", "The whole recipe:", "", "```yaml", whole.strip(), "```"]
    return "\n".join(lines)
