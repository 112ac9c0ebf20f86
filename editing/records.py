"""Edit records: one fact with the prompts it is scored on, read from CounterFact-style files.

Records come in the original CounterFact format (``requested_rewrite``,
``paraphrase_prompts``, ``neighborhood_prompts``) or the flat one
(``prompt``, ``subject``, ``target_new``, ``ground_truth``, ``rephrase_prompt``,
``locality_prompt``, ``locality_ground_truth``). Scoring (:mod:`editing.evaluate`)
and the checks by generation (:mod:`editing.generation_checks`) both read them,
so they live apart from either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checkpoints.errors import WeightsmithError

from .request import EditRequest


@dataclass
class EvalRecord:
    """One fact with its evaluation prompts (all with the subject filled in)."""

    prompt: str  # template with {} or containing the subject
    subject: str
    target_new: str
    target_true: str
    paraphrases: list[str] = field(default_factory=list)
    neighborhood: list[str] = field(default_factory=list)
    neighborhood_true: str | None = None  # answer of the neighbourhood prompts (default target_true)

    def request(self, layer: int | None = None) -> EditRequest:
        return EditRequest(self.prompt, self.subject, self.target_new, layer, self.target_true)

    @property
    def text(self) -> str:
        return self.request().text


def _as_list(x: Any) -> list[str]:
    if x is None:
        return []
    if isinstance(x, str):
        return [x] if x.strip() else []
    return [str(v) for v in x if str(v).strip()]


def _str(x: Any) -> str:
    return x.get("str", "") if isinstance(x, dict) else str(x or "")


def parse_record(rec: dict[str, Any]) -> EvalRecord:
    """One record in either format → :class:`EvalRecord` (clear error when fields are missing)."""
    if "requested_rewrite" in rec:
        rw = rec["requested_rewrite"]
        try:
            out = EvalRecord(rw["prompt"], rw["subject"], _str(rw["target_new"]).strip(), _str(rw["target_true"]).strip(),
                             _as_list(rec.get("paraphrase_prompts")), _as_list(rec.get("neighborhood_prompts")))
        except KeyError as e:
            raise WeightsmithError(f"CounterFact record {rec.get('case_id', '?')}: missing field {e}") from None
    else:
        missing = [k for k in ("prompt", "subject", "target_new") if k not in rec]
        if missing:
            raise WeightsmithError(f"edit record {rec.get('case_id', '?')}: missing field(s) {', '.join(missing)}")
        true = rec.get("ground_truth", rec.get("target_true", ""))
        out = EvalRecord(rec["prompt"], rec["subject"], _str(rec["target_new"]).strip(), _str(true).strip(),
                         _as_list(rec.get("rephrase_prompt", rec.get("paraphrase_prompts"))),
                         _as_list(rec.get("locality_prompt", rec.get("neighborhood_prompts"))),
                         _str(rec.get("locality_ground_truth")).strip() or None)
    if "{}" in out.prompt:
        pass
    elif out.subject not in out.prompt:
        raise WeightsmithError(f"edit record: the subject {out.subject!r} is not in its prompt {out.prompt!r}")
    return out


def load_records(path: str | Path, *, limit: int | None = None) -> list[EvalRecord]:
    """Read a JSON list (or JSON lines) of records in either format."""
    from checkpoints.textfiles import read_text

    p = Path(path)
    text = read_text(p, what="edit file")  # UTF-8 only: other bytes are one line naming the file
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise WeightsmithError(f"{p.name}: not JSON or JSON lines ({e})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise WeightsmithError(f"{p.name}: expected a list of edit records")
    records = [parse_record(r) for r in data[: limit or None]]
    return records
