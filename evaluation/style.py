"""The demo adapters' style scores, defined once (the style task and ``bench/demo_adapters.py`` use them).

* **caps**: upper-case letters / all letters, over all answers pooled (the ``caps``
  adapter's target is at least 0.95);
* **pirate**: the share of answers holding at least one word of :data:`PIRATE_WORDS`,
  whole word, case-insensitive (the ``pirate`` adapter's target is at least 0.80).

Example::

    caps_rate(["HELLO there"])          # 5 / 10 = 0.5
    pirate_rate(["Arr, matey!", "Hi"])  # 0.5
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

# Not "me"/"be": plain English has them too.
PIRATE_WORDS = ("arr", "arrr", "ahoy", "matey", "mateys", "ye", "yer", "aye", "avast", "hearty", "hearties",
                "landlubber", "landlubbers", "shipmate", "shipmates", "buccaneer", "scallywag", "booty", "grog",
                "doubloons", "yo-ho-ho", "ho")


def has_word(text: str, words: Iterable[str]) -> bool:
    """Does ``text`` contain one of ``words`` as a whole word (case-insensitive)?"""
    return any(re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text, flags=re.I) for w in words)


def caps_rate(answers: Sequence[str]) -> float:
    """Upper-case letters / letters over all ``answers`` together (0 when there are no letters)."""
    letters = [c for a in answers for c in a if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def pirate_rate(answers: Sequence[str]) -> float:
    """The share of ``answers`` with at least one pirate word (0 for no answers)."""
    return sum(has_word(a, PIRATE_WORDS) for a in answers) / len(answers) if answers else 0.0


def style_scores(answers: Sequence[str]) -> dict[str, float]:
    return {"caps": caps_rate(answers), "pirate": pirate_rate(answers)}
