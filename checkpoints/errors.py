"""The one exception type users see.

Every user-facing failure (bad file, bad recipe, bad request) is raised as a
:class:`WeightsmithError` whose message is one line naming the thing that is
wrong. The CLI prints that line and exits with status 2; the app shows it in
the page. Anything else escaping is a bug.
"""

from __future__ import annotations


class WeightsmithError(Exception):
    """A user-facing error: ``str(err)`` is one line that names what is wrong."""

    def __init__(self, message: str):
        # Collapse newlines so the CLI and the app always show exactly one line.
        super().__init__(" ".join(str(message).split()))
