"""The Evaluate tab's figure: each task's scores as grouped bars, one colour per model."""

from __future__ import annotations

from typing import Any

from .plots import figure


def eval_bars_plot(headers: list[str], rows: list[list[Any]]):
    """Bars of ``rows`` (task, metric, a value per model); perplexity (lower is better, unbounded) on its own axis."""
    models = headers[2:]
    fig, ax = figure(7.0, 3.0)
    scores = [r for r in rows if r[1] != "perplexity"]
    ppl = [r for r in rows if r[1] == "perplexity"]
    panels = [(scores, "score (higher is better)"), (ppl, "perplexity (lower is better)")]
    panels = [p for p in panels if p[0]]
    if not panels:
        ax.set_title("no scores", fontsize=9)
        return fig
    fig.delaxes(ax)
    axes = fig.subplots(1, len(panels), squeeze=False,
                        width_ratios=[max(1, len(p[0])) for p in panels])[0]
    width = 0.8 / max(1, len(models))
    for axis, (group, label) in zip(axes, panels):
        for i, model in enumerate(models):
            values = [r[2 + i] if r[2 + i] is not None else 0.0 for r in group]
            axis.bar([x + (i - (len(models) - 1) / 2) * width for x in range(len(group))], values, width,
                     label=str(model))
        axis.set_xticks(range(len(group)), [f"{r[0]}\n{r[1]}" for r in group], fontsize=7)
        axis.set_ylabel(label, fontsize=8)
        axis.grid(axis="y", alpha=0.3)
        if label.startswith("score"):
            axis.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    return fig
