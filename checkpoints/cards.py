"""One model-card builder for every output kind (merge, adapter, edit).

Built with ``huggingface_hub.ModelCard``/``ModelCardData`` so the Hub reads the
front matter: ``base_model`` (an id, or a list for merges),
``base_model_relation``, ``library_name``, ``tags`` and ``license``. Local
paths never reach a card: every model reference passes through
:func:`checkpoints.sources.public_name`.

Example::

    card = build_card(CardInfo(title="my-merge", relation="merge", base_models=["a/b", "c/d"],
                               summary="A TIES merge of ...", recipe_yaml=yaml_text))
    card.save(folder / "README.md")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import ModelCard, ModelCardData

from .sources import public_name

Relation = Literal["merge", "adapter", "finetune"]


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


def _scores_table(scores: dict[str, Any]) -> str:
    rows = ["| metric | value |", "|---|---|"]
    for key, value in scores.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict):
            value = json.dumps(value)
        rows.append(f"| {key} | {value} |")
    return "\n".join(rows)


def build_card(info: CardInfo, *, repo_id: str | None = None) -> ModelCard:
    """Build the card; ``repo_id`` (if known) is used in the loading snippet."""
    bases = [public_name(b) for b in info.base_models]
    tags = ["weightsmith", *[t for t in info.tags if t != "weightsmith"]]
    data = ModelCardData(
        base_model=bases if (info.relation == "merge" or len(bases) > 1) else (bases[0] if bases else None),
        library_name=info.library_name,
        tags=list(dict.fromkeys(tags)),
        license=info.license,
        base_model_relation=info.relation,
    )
    parts = [f"# {info.title}", "", info.summary.strip(), ""]
    if bases:
        parts += ["## Base model" + ("s" if len(bases) > 1 else ""), ""]
        parts += [f"- [{b}](https://huggingface.co/{b})" if "/" in b else f"- {b}" for b in bases] + [""]
    if info.recipe_yaml:
        parts += ["## Recipe", "", "```yaml", info.recipe_yaml.strip(), "```", ""]
    if info.edit_log:
        parts += ["## Edit log", "", "| # | prompt | subject | new target | layer |", "|---|---|---|---|---|"]
        for i, e in enumerate(info.edit_log, 1):
            prompt = str(e.get("prompt", "")).replace("|", "\\|")
            parts.append(f"| {i} | {prompt} | {e.get('subject', '')} | {e.get('target_new', e.get('target', ''))} | {e.get('layer', '')} |")
        parts.append("")
    if info.scores:
        parts += ["## Scores", "", _scores_table(info.scores), ""]
    for heading, body in info.extra_sections.items():
        parts += [f"## {heading}", "", body.strip(), ""]
    parts += ["## How to load", "", _load_snippet(info, repo_id or info.title, bases[0] if bases else "BASE"), ""]
    parts += ["Made with Weightsmith.", ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts)
    return ModelCard(content)


def write_card(folder: Path, info: CardInfo, *, repo_id: str | None = None) -> Path:
    """Save the card as ``folder/README.md``; returns its path."""
    path = Path(folder) / "README.md"
    build_card(info, repo_id=repo_id).save(path)
    return path
