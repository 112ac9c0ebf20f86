"""Edit requests from a file: CSV, JSON or JSON lines (the app's batch upload and ``weightsmith edit --batch``).

A CSV file has a header row with the flat record format's columns
(:data:`CSV_COLUMNS`; ``rephrase_prompt`` and ``locality_prompt`` may be added, one prompt each).
JSON files hold records in either format :mod:`editing.evaluate` reads (original CounterFact or flat).

Example::

    records = load_edit_records(Path("edits.csv"))
    session.apply_batch([r.request() for r in records])
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from checkpoints.errors import WeightsmithError
from checkpoints.textfiles import read_text

from .evaluate import EvalRecord, load_records, parse_record
from .request import EditRequest

CSV_COLUMNS = ("prompt", "subject", "target_new", "ground_truth")


def load_edit_records(path: str | Path, *, limit: int | None = None) -> list[EvalRecord]:
    """The records of a ``.csv`` file (by its suffix) or a JSON / JSON lines file; one error line on bad input."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        return load_records(path, limit=limit)
    text = io.StringIO(read_text(path, what="edit requests"), newline="")
    rows = [r for r in csv.DictReader(text) if any((v or "").strip() for v in r.values() if isinstance(v, str))]
    if not rows:
        raise WeightsmithError(f"{path.name}: no edit rows (header: {','.join(CSV_COLUMNS)})")
    # A row with more cells than the header puts the rest under the key None: not a column, dropped.
    return [parse_record({k.strip(): (v or "").strip() for k, v in r.items() if k and isinstance(v, str)})
            for r in rows[: limit or None]]


def load_edit_requests(path: str | Path, *, limit: int | None = None) -> list[EditRequest]:
    """The edit requests of :func:`load_edit_records` (what ``EditSession.apply_batch`` takes)."""
    return [r.request() for r in load_edit_records(path, limit=limit)]
