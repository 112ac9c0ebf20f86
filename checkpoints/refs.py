"""The one rule for what a Hub repo id is.

Every place that must tell ``owner/name`` from a local path asks
:func:`is_hub_id`. The rule follows the Hub's own (``validate_repo_id``):
ASCII letters, digits, ``_ . -``, at most 96 characters a part, no ``--`` or
``..``, no trailing ``.git`` or ``.``. It is decided from the string alone,
never by looking at the disk, so a server can refuse local lookups for it.

A merge recipe's model may also carry a LoRA adapter, mergekit's way:
``model+adapter`` (:func:`split_lora_ref`, :func:`join_lora_ref`, :func:`lora_sides`).
"""

from __future__ import annotations

import re

from .errors import WeightsmithError

# fullmatch + ASCII: "org/x\n" and "é/x" are not ids (re's "$" would accept a final newline).
_NAME = r"[A-Za-z0-9_][\w.-]{0,95}"
_HUB_ID = re.compile(rf"[A-Za-z0-9][\w.-]{{0,95}}/{_NAME}", re.ASCII)
_BARE_NAME = re.compile(_NAME, re.ASCII)


def is_hub_id(ref: object, *, owner_optional: bool = False) -> bool:
    """True for a syntactically valid Hub repo id ``owner/name``.

    ``owner_optional`` also accepts a bare ``name``: a push target, which the Hub
    puts under the token owner's namespace. A model reference always names its owner.
    """
    if not isinstance(ref, str):
        return False
    pattern = _BARE_NAME if owner_optional and "/" not in ref else _HUB_ID
    return (pattern.fullmatch(ref) is not None and "--" not in ref
            and ".." not in ref and not ref.endswith((".git", ".")))


LORA_SEPARATOR = "+"


def split_lora_ref(ref: str) -> tuple[str, str | None]:
    """``"org/base+org/lora"`` -> ``("org/base", "org/lora")``; a plain reference -> ``(ref, None)``.

    mergekit's grammar (``ModelReference``): one ``+`` joins a model and the PEFT LoRA adapter to
    apply to it; a second ``+`` or an empty side is one :class:`WeightsmithError` line.
    """
    parts = [p.strip() for p in str(ref).split(LORA_SEPARATOR)]
    if len(parts) == 1:
        return parts[0], None
    if len(parts) > 2 or not all(parts):
        raise WeightsmithError(f"{ref}: a model with a LoRA adapter is written model+adapter (one '+', "
                               "a name on each side)")
    return parts[0], parts[1]


def join_lora_ref(model: str, lora: str | None) -> str:
    """The inverse of :func:`split_lora_ref`."""
    return model if lora is None else f"{model}{LORA_SEPARATOR}{lora}"


def lora_sides(ref: str) -> list[str]:
    """The model and adapter of ``model+adapter``; any other reference alone (never raises)."""
    try:
        model, lora = split_lora_ref(ref)
    except WeightsmithError:
        return [str(ref)]
    return [str(ref)] if lora is None else [model, lora]
