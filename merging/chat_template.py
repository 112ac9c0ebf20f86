"""``chat_template:`` in a merge recipe, with mergekit 0.1.5's rules.

* ``auto``: the template most of the merged models carry (each model's
  tokenizer as transformers loads it, stripped of surrounding whitespace; a
  tie goes to the model listed first; nothing is set when none has one);
* a bundled name: ``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral``
  (the names mergekit ships). The templates below are Weightsmith's own text,
  written to render exactly what mergekit's templates of the same name render,
  whitespace included (tests/test_merge_tokenizer.py compares the two);
* anything else containing ``{`` and at least 20 characters: a Jinja template, used as is.

Example::

    check_chat_template("chatml")                 # None: fine
    chat_template_text("chatml", [])              # the ChatML template text
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Sequence

from checkpoints.errors import WeightsmithError
from checkpoints.sources import LocalCheckpoint

log = logging.getLogger(__name__)

BUNDLED: dict[str, str] = {
    "alpaca": (
        "{%- set system = messages | selectattr('role', 'equalto', 'system') | list -%}"
        "{{ (system | last).content | trim if system else '' }}{{ '\\n\\n' }}"
        "{%- set heads = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n',"
        " 'user_context': '### Input:\\n'} -%}"
        "{%- for m in messages -%}{%- if m['role'] in heads -%}"
        "{{ heads[m['role']] ~ m['content'] | trim }}{%- if not loop.last -%}{{ '\\n\\n' }}{%- endif -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{ '### Response:\\n' }}"
        "{%- endif -%}"
    ),
    "chatml": (
        "{%- for m in messages -%}{{ '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    # mergekit's exaone template renders its own indentation; kept so outputs match.
    "exaone": (
        "{%- for m in messages -%}"
        "{%- if loop.first and m['role'] != 'system' -%}{{ '        [|system|][|endofturn|]\\n\\n' }}{%- endif -%}"
        "{{ '    [|' ~ m['role'] ~ '|]' ~ m['content'] ~ '\\n        '"
        " ~ ('\\n' if m['role'] == 'user' else '[|endofturn|]\\n') ~ '\\n' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '    [|assistant|]\\n' }}{%- endif -%}"
    ),
    "llama3": (
        "{%- for m in messages -%}{{ (bos_token if loop.first else '') ~ '<|start_header_id|>' ~ m['role']"
        " ~ '<|end_header_id|>\\n\\n' ~ m['content'] | trim ~ '<|eot_id|>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    ),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
        "{%- set turns = messages[1:] -%}{%- else -%}{%- set turns = messages -%}{%- endif -%}"
        "{{ bos_token }}{%- for m in turns -%}"
        "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}{%- endif -%}"
        "{%- if m['role'] == 'user' -%}"
        "{{ ' [INST] ' ~ (system ~ '\\n\\n' if loop.first and system is defined else '') ~ m['content'] ~ ' [/INST]' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ ' ' ~ m['content'] ~ eos_token }}"
        "{%- else -%}{{ raise_exception('only user and assistant roles follow the optional system message') }}"
        "{%- endif -%}{%- endfor -%}"
    ),
}


def _looks_like_name(value: str) -> bool:
    return len(value) < 256 and "\n" not in value and "{" not in value


def check_chat_template(value: Any) -> None:
    """One clear error for a ``chat_template`` mergekit would refuse (None and ``auto`` are fine)."""
    if value is None or value == "auto":
        return
    if not isinstance(value, str):
        raise WeightsmithError(f"recipe: chat_template must be auto, a template name or a Jinja template, got {value!r}")
    if _looks_like_name(value) and value in BUNDLED:
        return
    if len(value) < 20 or "{" not in value:
        raise WeightsmithError(f"recipe: chat_template {value[:60]!r} is not auto, one of "
                               f"{', '.join(sorted(BUNDLED))}, or a Jinja template")


def chat_template_text(value: str | None, models: Sequence[LocalCheckpoint]) -> str | None:
    """The Jinja text ``value`` means; ``models`` (merge inputs, in recipe order) are read for ``auto``.

    None when no template is asked for, or ``auto`` finds none among the models.
    """
    check_chat_template(value)
    if value is None:
        return None
    if value == "auto":
        return _most_common(models)
    if _looks_like_name(value):
        return BUNDLED[value]
    return value


def _most_common(models: Sequence[LocalCheckpoint]) -> str | None:
    found = []
    for ckpt in models:
        try:
            template = ckpt.load_tokenizer().chat_template
        except WeightsmithError as e:
            log.warning("chat_template auto: %s", e)
            continue
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    if not found:
        log.info("chat_template auto: none of the merged models has a chat template")
        return None
    # Counter keeps first-seen order among equal counts, so a tie goes to the model listed first.
    return Counter(found).most_common(1)[0][0]
