"""The merge's tokenizer side, in two calls the engine makes.

1. :func:`merge_vocabularies`, right after the models are resolved: builds the
   output vocabulary the recipe's ``tokenizer:`` / ``tokenizer_source:`` asks for
   (:mod:`merging.tokenizer_build`) and gives each model whose rows move an
   aligned view (:mod:`merging.tokenizer_embed`); the engine then plans and
   merges as usual. No tokenizer settings: nothing changes.
2. :func:`write_tokenizer`, with the other support files: the output's tokenizer
   files (the built tokenizer, else the donor's files as they are) and the
   recipe's ``chat_template`` (:mod:`merging.chat_template`) in
   ``tokenizer_config.json``. Everything goes through the merge's writer, so it
   is published with the weights or not at all.

Example::

    ckpts, vocab = merge_vocabularies(recipe, resolve_models(recipe))
    ...
    write_tokenizer(writer, recipe, ckpts, ref, vocab)
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from checkpoints.containment import member_path
from checkpoints.sources import LocalCheckpoint
from checkpoints.tensors import SUPPORT_FILES, ShardedWriter, parse_json_object
from checkpoints.textfiles import read_text

from .chat_template import chat_template_text
from .tokenizer_build import MergedVocabulary, build_vocabulary
from .tokenizer_config import input_refs
from .tokenizer_embed import align_checkpoints

log = logging.getLogger(__name__)

TOKENIZER_FILES = tuple(n for n in SUPPORT_FILES if n not in ("config.json", "generation_config.json"))
# A template file would override the one written into tokenizer_config.json when the tokenizer loads.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def merge_vocabularies(recipe, ckpts: dict[str, LocalCheckpoint]
                       ) -> tuple[dict[str, LocalCheckpoint], MergedVocabulary | None]:
    """The checkpoints to plan the merge with, and the merged vocabulary (None: the reference's is kept)."""
    vocab = build_vocabulary(recipe, ckpts)
    if vocab is None:
        return ckpts, None
    # A tokenizer-only donor is neither checked nor planned as a merged model (mergekit reads only its tokenizer).
    inputs = input_refs(recipe)
    return {r: c for r, c in align_checkpoints(recipe, ckpts, vocab).items() if r in inputs}, vocab


def write_tokenizer(writer: ShardedWriter, recipe, ckpts: dict[str, LocalCheckpoint], ref: LocalCheckpoint,
                    vocab: MergedVocabulary | None) -> None:
    """The output's tokenizer files and chat template (see the module's docstring)."""
    template = chat_template_text(recipe.chat_template, [ckpts[r] for r in input_refs(recipe)])
    if vocab is not None and vocab.rebuilt:
        with tempfile.TemporaryDirectory(prefix="ws-tokenizer-") as tmp:
            vocab.save_files(Path(tmp))
            _copy_tokenizer(writer, Path(tmp), template)
    else:
        _copy_tokenizer(writer, (vocab.donor if vocab is not None else ref).support_dir, template)


def _copy_tokenizer(writer: ShardedWriter, folder: Path, template: str | None) -> None:
    if template is None:
        writer.copy_support_files(folder, names=TOKENIZER_FILES)
        return
    writer.copy_support_files(folder, names=[n for n in TOKENIZER_FILES if n not in TEMPLATE_FILES])
    if not (folder / "tokenizer_config.json").is_file():
        log.warning("chat_template not saved: %s has no tokenizer_config.json", folder.name)
        return
    path = member_path(folder, "tokenizer_config.json", owner=folder.name)
    config = parse_json_object(read_text(path, what="tokenizer_config.json"), "tokenizer_config.json")
    config["chat_template"] = template
    writer.write_text("tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
