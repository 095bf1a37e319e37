"""curves.png: training loss and the evaluation metric against steps, a picture a person can open.

Uses matplotlib's object API with the Agg canvas (no pyplot): no global backend is switched and
no window opens, so it is safe inside any program that imported featherlm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featherlm.io import atomic_path


def plot_curves(records: list[dict[str, Any]], path: Path, metric: str) -> Path | None:
    """Draw train/eval loss and, when it is not the loss, the eval ``metric``; None with no data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    if not train and not evals:
        return None
    panels = 1 if metric == "loss" or not evals else 2
    fig = Figure(figsize=(6 * panels, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, panels, 1)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if panels == 2:
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-", color="tab:green")
        ax2.set(xlabel="step", ylabel=metric, title=f"eval {metric}")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
