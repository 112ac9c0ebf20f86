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
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9_][\w.-]{0,95}", re.ASCII)


def is_hub_id(ref: object) -> bool:
    """True for a syntactically valid Hub repo id ``owner/name``."""
    return (isinstance(ref, str) and _HUB_ID.fullmatch(ref) is not None and "--" not in ref
            and ".." not in ref and not ref.endswith((".git", ".")))
