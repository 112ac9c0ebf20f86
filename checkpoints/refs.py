"""The one rule for what a Hub repo id is.

Every place that must tell ``owner/name`` from a local path asks
:func:`is_hub_id`. The rule follows the Hub's own (``validate_repo_id``):
ASCII letters, digits, ``_ . -``, at most 96 characters a part, no ``--`` or
``..``, no trailing ``.git`` or ``.``. It is decided from the string alone,
never by looking at the disk, so a server can refuse local lookups for it.
"""

from __future__ import annotations

import re

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
