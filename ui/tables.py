"""Library results as the page shows them: key/value Markdown lists and the edit history table."""

from __future__ import annotations

from typing import Any


def md_table(rows: list[tuple[str, Any]]) -> str:
    """Key/value facts as a compact Markdown list."""
    return "\n".join(f"- **{k}**: {v}" for k, v in rows)


def history_rows(history: list[dict]) -> list[list[Any]]:
    """An EditSession's history, one row per fact (a batch's facts share its id)."""
    rows = []
    for h in history:
        facts = h.get("facts") or [h]
        for f in facts:
            rows.append([h.get("id"), h.get("method", ""), ",".join(map(str, h.get("layers", []))),
                         str(f.get("prompt", "")).replace("{}", f.get("subject", "")),
                         f.get("target_new", ""), f"{h.get('seconds', '')}",
                         # the edit's checks (editing/checks.py): the warning, else the figures checked
                         (h.get("checks") or {}).get("warning") or _checked(h.get("checks"))])
    return rows


def _checked(checks: dict | None) -> str:
    """"ok" with the figures an unwarned edit passed: its size, and the drift of all edits so far."""
    if not checks:
        return ""
    drift = f", drift KL {checks['drift_kl']:.2g}" if "drift_kl" in checks else ""
    return f"ok (‖ΔW‖/‖W‖ {checks['relative_norm']:.3g}{drift})"
