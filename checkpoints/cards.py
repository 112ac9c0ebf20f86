"""One model-card builder for every output kind (merge, adapter, edit).

Built with ``huggingface_hub.ModelCard``/``ModelCardData`` so the Hub reads the
front matter: ``base_model`` (an id, or a list for merges),
``base_model_relation``, ``library_name``, ``pipeline_tag``, ``tags`` and
``license``.

Local paths never reach a card:

* every model reference passes through :func:`checkpoints.sources.public_name`
  (a path becomes its last component);
* the front matter's ``base_model`` keeps only valid Hub ids (``owner/name``):
  the Hub rejects anything else there, and a local folder's name would point
  at nothing. Local models are named in the body instead, marked as local;
  when no base is a Hub id, ``base_model`` and ``base_model_relation`` are left
  out;
* free text (summary, recipe, edit log, extra sections) is scrubbed: absolute
  or ``./`` paths become their last component, and ``model:``/``base_model:``
  values in a recipe that name an existing folder become its name.

The loading snippet uses the repo id when it is known; otherwise it says
:data:`LOCAL_LOAD_HINT`, which :func:`set_card_repo` (called by
:func:`checkpoints.hub.push_folder`) replaces with the repo id at push time.

Example::

    card = build_card(CardInfo(title="my-merge", relation="merge", base_models=["a/b", "c/d"],
                               summary="A TIES merge of ...", recipe_yaml=yaml_text))
    card.save(folder / "README.md")
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import ModelCard, ModelCardData

from .errors import WeightsmithError
from .refs import is_hub_id, lora_sides
from .sources import public_name

Relation = Literal["merge", "adapter", "finetune"]

# Where the snippet points before the repo id is known; replaced on push.
LOCAL_LOAD_HINT = "path/to/this/folder"

# Absolute POSIX/Windows paths, ``~/`` and ``./``/``../`` paths; not URLs (``https://x/y``), not ``a/b`` ids.
_PATH_TOKEN = re.compile(
    r"(?<![\w:/.~-])(?:~/|\.\.?/|/(?=[\w.~-])|[A-Za-z]:[\\/])[^\s'\"`<>|()\[\]{},;*]*"
)
_RECIPE_MODEL_LINE = re.compile(r"^(\s*-?\s*(?:model|base_model)\s*:\s*)(['\"]?)([^'\"#\n]+?)\2(\s*(?:#.*)?)$", re.M)


@dataclass
class CardInfo:
    """Everything a card says. ``base_models`` may hold paths; they are made public names."""

    title: str
    relation: Relation
    base_models: list[str]
    summary: str  # what was done, in plain words (Markdown)
    library_name: Literal["transformers", "peft"] = "transformers"
    tags: list[str] = field(default_factory=list)
    recipe_yaml: str | None = None  # merge / mix recipe
    edit_log: list[dict[str, Any]] | None = None  # ROME edits
    scores: dict[str, Any] | None = None  # measured numbers, shown as a table
    license: str | None = None
    extra_sections: dict[str, str] = field(default_factory=dict)  # heading -> Markdown


def scrub_local_paths(text: str) -> str:
    """Replace path-like tokens by their last component (URLs and ``owner/name`` ids are kept)."""

    def _one(m: re.Match) -> str:
        token = m.group(0)
        trail = ""
        while token and token[-1] in ".:":  # sentence punctuation after a path
            trail, token = token[-1] + trail, token[:-1]
        name = re.split(r"[\\/]", token.rstrip("/\\"))[-1] if token.rstrip("/\\") else ""
        return (name or "<local>") + trail

    return _PATH_TOKEN.sub(_one, text)


def _scrub_recipe(text: str) -> str:
    # ``model: models/ft1`` looks like a Hub id; public_name knows it is a folder when it exists here.
    text = _RECIPE_MODEL_LINE.sub(lambda m: f"{m.group(1)}{m.group(2)}{public_name(m.group(3).strip())}"
                                            f"{m.group(2)}{m.group(4)}", text)
    return scrub_local_paths(text)


def _default_tags(info: CardInfo) -> list[str]:
    tags = ["weightsmith"]
    if info.relation == "merge":
        tags.append("merge")
    if info.library_name == "peft":
        tags.append("lora")
    if info.edit_log:
        # Only what the log says: a ROME tag on a MEMIT edit would mislead. Callers may add tags themselves.
        tags.extend(sorted({str(e["method"]).lower() for e in info.edit_log if e.get("method")}))
    return tags


def _load_snippet(info: CardInfo, repo_hint: str, base: str) -> str:
    if info.library_name == "peft":
        return (
            "```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{repo_hint}")\n```'
        )
    return (
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_hint}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_hint}")\n```'
    )


def _cell(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return scrub_local_paths(text).replace("|", "\\|").replace("\n", " ")


def _scores_table(scores: dict[str, Any]) -> str:
    rows = ["| metric | value |", "|---|---|"]
    for key, value in scores.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        rows.append(f"| {_cell(key)} | {_cell(value)} |")
    return "\n".join(rows)


def build_card(info: CardInfo, *, repo_id: str | None = None) -> ModelCard:
    """Build the card; ``repo_id`` (if known) is used in the loading snippet.

    Returns a :class:`huggingface_hub.ModelCard` whose front matter holds only
    valid Hub ids in ``base_model`` (see the module docstring).
    """
    # A model+adapter input (a merge recipe's LoRA input) names both as bases, as mergekit's card does.
    bases = list(dict.fromkeys(side for b in info.base_models for side in lora_sides(public_name(b))))
    hub_bases = [b for b in bases if is_hub_id(b)]
    tags = [*_default_tags(info), *info.tags]
    meta: dict[str, Any] = {
        "library_name": info.library_name,
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys(t for t in tags if t)),
        "license": info.license,
    }
    if hub_bases:
        meta["base_model"] = hub_bases if (info.relation == "merge" or len(hub_bases) > 1) else hub_bases[0]
        meta["base_model_relation"] = info.relation
    data = ModelCardData(**meta)

    title = public_name(info.title) if re.search(r"[\\/]", info.title) and not is_hub_id(info.title) else info.title
    parts = [f"# {scrub_local_paths(title)}", "", scrub_local_paths(info.summary.strip()), ""]
    if bases:
        parts += ["## Base model" + ("s" if len(bases) > 1 else ""), ""]
        parts += [f"- [{b}](https://huggingface.co/{b})" if b in hub_bases else f"- `{b}` (a local model, not on the Hub)"
                  for b in bases] + [""]
    if info.recipe_yaml:
        parts += ["## Recipe", "", "```yaml", _scrub_recipe(info.recipe_yaml.strip()), "```", ""]
    if info.edit_log:
        checked = any("check" in e for e in info.edit_log)  # editing sessions add the method and their checks
        parts += ["## Edit log", "", "| # | prompt | subject | new target | layer |" + (" method | check |" if checked else ""),
                  "|---|---|---|---|---|" + ("---|---|" if checked else "")]
        for i, e in enumerate(info.edit_log, 1):
            target = e.get("target_new", e.get("target", ""))
            parts.append(f"| {i} | {_cell(e.get('prompt', ''))} | {_cell(e.get('subject', ''))} | {_cell(target)} "
                         f"| {_cell(e.get('layer', ''))} |"
                         + (f" {_cell(e.get('method', ''))} | {_cell(e.get('check', ''))} |" if checked else ""))
        parts.append("")
    if info.scores:
        parts += ["## Scores", "", _scores_table(info.scores), ""]
    for heading, body in info.extra_sections.items():
        parts += [f"## {scrub_local_paths(heading)}", "", scrub_local_paths(body.strip()), ""]
    base_hint = hub_bases[0] if hub_bases else (f"path/to/{bases[0]}" if bases else "BASE_MODEL")
    parts += ["## How to load", "", _load_snippet(info, repo_id or LOCAL_LOAD_HINT, base_hint), ""]
    parts += ["Made with Weightsmith.", ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts)
    return ModelCard(content)


def write_card(folder: Path, info: CardInfo, *, repo_id: str | None = None) -> Path:
    """Save the card as ``folder/README.md``; returns its path."""
    path = Path(folder) / "README.md"
    build_card(info, repo_id=repo_id).save(path)
    return path


def add_card_section(folder: Path, heading: str, body: str, *, tags: tuple[str, ...] = (),
                     base_models: list[str] | tuple[str, ...] = ()) -> Path:
    """Put section ``## heading`` (replacing one of that heading) before "How to load", and add ``tags``.

    For outputs added to a finished folder (a GGUF file, the chain of a multi-stage merge). ``body``
    is written as given, so that relative file names such as ``./model.gguf`` survive: it must not
    name local paths (the push refuses a card that does). ``base_models`` that are Hub ids (either
    side of ``model+adapter``) join the front matter's ``base_model`` list.
    """
    path = Path(folder) / "README.md"
    card = ModelCard(path.read_text(encoding="utf-8"))
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    hub = [b for ref in base_models for b in lora_sides(public_name(ref)) if is_hub_id(b)]
    if hub:
        have = card.data.base_model
        card.data.base_model = list(dict.fromkeys([*([have] if isinstance(have, str) else have or []), *hub]))
        card.data.base_model_relation = card.data.base_model_relation or "merge"
    block = f"## {heading}\n\n{body.strip()}\n\n"
    text = re.sub(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", "", card.text, flags=re.M | re.S)
    at = text.find("## How to load")
    card.text = text[:at] + block + text[at:] if at >= 0 else text.rstrip() + "\n\n" + block
    card.save(path)
    return path


def load_card(folder: Path) -> ModelCard:
    """The card in ``folder/README.md``; one-line error when it is missing or has no valid front matter.

    Checks what the Hub would refuse: ``base_model`` entries that are not Hub ids,
    and an unknown ``base_model_relation``.
    """
    folder = Path(folder)
    path = folder / "README.md"
    if not path.is_file():
        raise WeightsmithError(
            f"{folder.name}: no model card (README.md): build one with checkpoints.cards.write_card before pushing"
        )
    try:
        card = ModelCard(path.read_text(encoding="utf-8"))
    except Exception as e:  # huggingface_hub raises ValueError/YAMLError on broken front matter
        raise WeightsmithError(f"{folder.name}/README.md: unreadable card front matter ({str(e).splitlines()[0]})") from None
    meta = card.data.to_dict()
    if not meta:
        raise WeightsmithError(f"{folder.name}/README.md: the card has no front matter (--- yaml ---)")
    base = meta.get("base_model")
    for b in [base] if isinstance(base, str) else (base or []):
        if not (isinstance(b, str) and is_hub_id(b)):
            raise WeightsmithError(
                f"{folder.name}/README.md: base_model {b!r} is not a Hub id (owner/name); name local models in the body"
            )
    relation = meta.get("base_model_relation")
    if relation is not None and relation not in ("adapter", "merge", "quantized", "finetune"):
        raise WeightsmithError(f"{folder.name}/README.md: base_model_relation {relation!r} is not one of "
                               "adapter, merge, quantized, finetune")
    return card


def set_card_repo(folder: Path, repo_id: str) -> bool:
    """Point the card's loading snippet at ``repo_id`` (replacing :data:`LOCAL_LOAD_HINT`); True if changed."""
    path = Path(folder) / "README.md"
    text = path.read_text(encoding="utf-8")
    new = text.replace(f'"{LOCAL_LOAD_HINT}"', f'"{repo_id}"')
    if new == text:
        return False
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)
    return True
