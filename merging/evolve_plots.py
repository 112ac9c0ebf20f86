"""The evolutionary search as a figure: each trial's score against its number, and the best so far.

One figure for the app's Evolve tab (redrawn after each trial) and ``bench/evolve_search.py``.
A plain ``Figure`` (Agg), never pyplot's global figure list, so a server does not leak figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    from .evolve_results import TrialRecord


def best_so_far(trials: Sequence["TrialRecord"]) -> list[tuple[int, float]]:
    """(trial number, best complete score up to it) for each complete trial, in trial order."""
    out, best = [], float("-inf")
    for t in sorted(trials, key=lambda t: t.number):
        if t.state == "complete" and t.score is not None:
            best = max(best, t.score)
            out.append((t.number, best))
    return out


def search_figure(trials: Sequence["TrialRecord"], *, references: Mapping[str, float] | None = None,
                  width: float = 6.5, height: float = 3.0):
    """Scores (dots; failed trials as crosses at the bottom), the best so far (a step line), and optional
    horizontal ``references`` (e.g. hand-picked recipes' scores)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    done = [t for t in trials if t.state == "complete" and t.score is not None]
    if not done:
        ax.set_title("no trial finished yet", fontsize=9)
        return fig
    ax.scatter([t.number for t in done], [t.score for t in done], s=14, color="#2563eb", label="trial", zorder=3)
    curve = best_so_far(trials)
    ax.step([n for n, _ in curve], [b for _, b in curve], where="post", color="#f97316", lw=2, label="best so far")
    failed = [t.number for t in trials if t.state == "fail"]
    if failed:
        low = min(t.score for t in done)  # type: ignore[type-var]
        ax.scatter(failed, [low] * len(failed), marker="x", color="#dc2626", label="failed", zorder=3)
    for i, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, lw=1, ls=":", color=f"C{(i + 2) % 10}", label=name)
    ax.set_xlabel("trial", fontsize=8)
    ax.set_ylabel("score (higher is better)", fontsize=8)
    ax.set_title(f"best {curve[-1][1]:.4f} after {len(done)} trials", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, never over the dots
    return fig
