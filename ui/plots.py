"""The app's figures: LiNeS per-block scale and task-vector norms (matplotlib, never pyplot's global state)."""

from __future__ import annotations


def figure(width: float = 5.5, height: float = 2.6):
    """A matplotlib Figure not registered with pyplot (no global figure list to leak in a server)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot(1, 1, 1)


def lines_plot(lines_on: bool, alpha_auto: bool, alpha: float, beta: float, num_blocks: int, num_models: int = 1):
    """The per-block LiNeS scale λ(ℓ) = α + β·ℓ/(L−1) as a plot (auto α previewed as 1/T)."""
    from merging.lines import lines_curve

    fig, ax = figure(5.5, 2.4)
    L = max(1, int(num_blocks or 1))
    if not lines_on:
        ax.plot(range(L), [1.0] * L, color="#999", lw=2)
        ax.set_title("LiNeS off: every block keeps its full merged task vector", fontsize=9)
    else:
        a = (1.0 / max(1, num_models)) if alpha_auto else float(alpha or 0)
        curve = lines_curve(a, float(beta or 0), L)
        ax.plot(range(L), curve, marker="o", ms=3, lw=2, color="#f97316")
        ax.axhline(a, color="#999", ls=":", lw=1)
        ax.set_title(("α = auto (≈1/T preview, computed in the run)" if alpha_auto else f"α = {a:g}")
                     + f", β = {float(beta or 0):g}; embeddings/head get α", fontsize=9)
    ax.set_xlabel("block ℓ")
    ax.set_ylabel("scale λ(ℓ)")
    ax.grid(alpha=0.3)
    return fig


def norms_plot(norms: dict[str, list[float]] | list[list[float]] | None, labels: list[str] | None = None):
    """Task-vector L2 norm per block, one line per input model."""
    fig, ax = figure(6.5, 2.8)
    if not norms:
        ax.set_title("no task vectors (this method has no base)", fontsize=9)
        return fig
    items = norms.items() if isinstance(norms, dict) else zip(labels or [f"model {i}" for i in range(len(norms))], norms)
    for label, values in items:
        ax.plot(range(len(values)), values, marker="o", ms=3, lw=1.5, label=str(label))
    ax.set_xlabel("block")
    ax.set_ylabel("‖τ‖₂ per block")
    ax.set_title("Task-vector norms per block", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig
