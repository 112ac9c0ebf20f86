"""The files a merge writes beside its weights: config, tokenizer, the recipe and a model card.

Example::

    config = output_config(recipe, ref, num_blocks)
    write_support(writer, recipe, ckpts, ref, config)
    write_card(writer, recipe, method, ckpts, alpha)
"""

from __future__ import annotations

import json
from typing import Any

import torch

from checkpoints.errors import WeightsmithError
from checkpoints.sources import LocalCheckpoint, public_name
from checkpoints.tensors import SUPPORT_FILES, ShardedWriter

from .methods import MergeMethod
from .recipe import MergeRecipe
from .tokenizer_build import MergedVocabulary
from .tokenizer_merge import TOKENIZER_FILES, write_tokenizer

RECIPE_NAME = "weightsmith_recipe.yml"

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def output_config(recipe: MergeRecipe, ref: LocalCheckpoint, num_blocks: int) -> dict[str, Any]:
    """The reference model's config with the output's layer count and dtype."""
    config = json.loads(json.dumps(ref.config))
    key = next((k for k in (ref.spec.num_layers_key, "num_hidden_layers", "n_layer") if k in config), None)
    if key is not None and config[key] != num_blocks:
        config[key] = num_blocks
    # Configs such as qwen2's list one attention type per layer; transformers refuses a config whose list
    # does not match the layer count, so a merge that changes the count (passthrough slices) resizes it.
    types = config.get("layer_types")
    if isinstance(types, list) and types and len(types) != num_blocks:
        if len(set(map(str, types))) > 1:
            raise WeightsmithError(f"the reference config's layer_types differ per layer ({sorted(set(map(str, types)))}); "
                                   f"a merge to {num_blocks} layers would need each output layer's type from its "
                                   "source layer, which is not supported yet")
        config["layer_types"] = [types[0]] * num_blocks
    out = recipe.torch_dtype("out_dtype") or recipe.torch_dtype("dtype")
    if out is not None:
        for k in ("torch_dtype", "dtype"):
            if k in config or k == "dtype":
                config[k] = _DTYPE_NAMES[out]
    return config


def write_support(writer: ShardedWriter, recipe: MergeRecipe, ckpts: dict[str, LocalCheckpoint],
                  ref: LocalCheckpoint, config: dict[str, Any], vocab: MergedVocabulary | None = None) -> None:
    """Support files of the reference, the tokenizer (:func:`merging.tokenizer_merge.write_tokenizer`:
    the merged vocabulary's, else the reference's, with the recipe's chat template), config and the public recipe."""
    writer.copy_support_files(ref.support_dir, names=[n for n in SUPPORT_FILES if n not in TOKENIZER_FILES])
    write_tokenizer(writer, recipe, ckpts, ref, vocab)
    writer.write_text("config.json", json.dumps(config, indent=2) + "\n")
    public = recipe.with_models_renamed(lambda r: _public(r, ckpts))
    writer.write_text(RECIPE_NAME, public.to_yaml())


def _public(ref: str, ckpts: dict[str, LocalCheckpoint]) -> str:
    c = ckpts.get(ref)
    if c is not None and c.hub_id:
        return c.hub_id
    return public_name(ref) if c is None else c.name


def write_card(writer: ShardedWriter, recipe: MergeRecipe, method: MergeMethod,
               ckpts: dict[str, LocalCheckpoint], alpha: float | None) -> None:
    """The model card (README.md): method, models by public name, LiNeS when used, the recipe."""
    from checkpoints.cards import CardInfo, build_card

    public = recipe.with_models_renamed(lambda r: _public(r, ckpts))
    names = public.model_refs()
    link = f"[{method.label}]({method.paper_url})" if method.paper_url else method.label
    summary = f"This model is a merge of {len(names)} checkpoints made with Weightsmith, using the {link} merge method."
    tags = ["merge", "weightsmith"]
    sections = {"Merge method": f"{link}: {method.description}." if method.description else link}
    if public.base_model:
        sections["Merge method"] += f"\n\nBase model: {public.base_model}."
    if recipe.lines is not None:
        tags.append("lines")
        a = f"{alpha:.4g}" if alpha is not None else str(recipe.lines.alpha)
        auto = " (auto: ‖Σ τ_t‖₁ / (T·‖τ_merged‖₁))" if recipe.lines.alpha == "auto" else ""
        sections["LiNeS layer scaling"] = (
            "The merged task vector was scaled per block with "
            "[LiNeS](https://arxiv.org/abs/2410.17146): λ(ℓ) = α + β·ℓ/(L−1), "
            f"α = {a}{auto}, β = {recipe.lines.beta:g}; embeddings, final norm and head use α."
        )
    models = public.non_base_models() if public.models else []
    if models:
        sections["Models merged"] = "\n".join(f"- {m.model}" for m in models)
    info = CardInfo(title=writer.out_dir.name, relation="merge", base_models=names, summary=summary, tags=tags,
                    recipe_yaml=public.to_yaml(), extra_sections=sections)
    writer.add_file("README.md", str(build_card(info)).encode("utf-8"))
