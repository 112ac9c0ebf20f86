"""The task-vector analysis as one matplotlib figure (the CLI's ``--plot`` and the Merge tab show the same).

Four panels over the rows of :class:`merging.analysis.TaskVectorAnalysis` (embeddings, blocks,
final norm, head): each model's ‖τ‖₂, the whole model's pairwise cosine heatmap, the TIES
sign-conflict rate, and the |τ| mass the density keeps. A plain ``Figure`` (Agg), never
pyplot's global figure list, so a server does not leak figures.
"""

from __future__ import annotations

from .analysis import RowStats, TaskVectorAnalysis


def _short(r: RowStats) -> str:
    return str(r.block) if r.block is not None else {"embedding": "emb", "final_norm": "norm"}.get(r.kind, r.kind)


def _x_axis(ax, rows: list[RowStats]) -> None:
    step = max(1, len(rows) // 16)  # about 16 labels, whatever the depth

    def shown(i: int) -> bool:
        if rows[i].block is None:
            return True
        beside = [rows[j] for j in (i - 1, i + 1) if 0 <= j < len(rows)]
        # When thinned, a block label next to "emb"/"norm" would overlap it.
        return rows[i].block % step == 0 and (step == 1 or all(r.block is not None for r in beside))

    ticks = [i for i in range(len(rows)) if shown(i)]
    ax.set_xticks(ticks, [_short(rows[i]) for i in ticks], fontsize=7)
    ax.set_xlabel("row (emb = embeddings, numbers = blocks)", fontsize=8)
    ax.grid(alpha=0.3)


def _per_model(ax, result: TaskVectorAnalysis, values: list[list[float | None]], ylabel: str, title: str) -> None:
    x = range(len(result.rows))
    for k, name in enumerate(result.models):
        ax.plot(x, [float("nan") if v[k] is None else v[k] for v in values], marker="o", ms=3, lw=1.3, label=name)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _x_axis(ax, result.rows)


def analysis_figure(result: TaskVectorAnalysis):
    """A 2×2 figure: norms, cosine heatmap, conflict rate and kept fraction per row."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 6.4), dpi=100, layout="constrained")
    (norms, cos), (conflict, kept) = fig.subplots(2, 2)
    rows = result.rows
    _per_model(norms, result, [r.norms for r in rows], "‖τ‖₂", f"Task-vector norms against {result.base}")
    matrix = [[float("nan") if c is None else c for c in row] for row in result.total.cosine]
    image = cos.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    labels = [f"m{i + 1}" for i in range(len(result.models))]
    cos.set_xticks(range(len(labels)), labels, fontsize=8)
    cos.set_yticks(range(len(labels)), [f"{s} {n}" for s, n in zip(labels, result.models)], fontsize=8)
    for i, row in enumerate(matrix):
        for j, c in enumerate(row):
            cos.text(j, i, f"{c:+.2f}", ha="center", va="center", fontsize=8,
                     color="white" if abs(c) > 0.6 else "black")  # NaN compares False: black
    cos.set_title("Pairwise cosine of task vectors (whole model)", fontsize=9)
    fig.colorbar(image, ax=cos, shrink=0.8)
    x = range(len(rows))
    conflict.bar(x, [100 * (r.conflict_rate or 0.0) for r in rows], color="#dc2626")
    conflict.set_ylabel("% of kept parameters", fontsize=8)
    used = {v for pair in result.density_range for v in pair}
    density = (f"density {result.density:g}" if result.density is not None
               else f"density {used.pop():g}" if len(used) == 1 else "the recipe's densities")
    conflict.set_title(f"TIES sign conflicts after the trim at {density}", fontsize=9)
    _x_axis(conflict, rows)
    _per_model(kept, result, [[None if v is None else 100 * v for v in r.kept_fraction] for r in rows],
               "% of ‖τ‖₁", f"|τ| mass kept at {density}")
    return fig
