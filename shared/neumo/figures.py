"""Pictures for people: ROC curves, confusion matrices and Grad-CAM sheets as PNG files."""

from __future__ import annotations

import numpy as np


def _save(fig, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).print_png(path)


def roc_png(curves: dict[str, dict], aucs: dict[str, float], path: str) -> None:
    """One ROC curve per split ({split: {"fpr": [...], "tpr": [...]}}) with its AUC in the legend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    for split, c in curves.items():
        ax.plot([0.0, *c["fpr"]], [0.0, *c["tpr"]], label=f"{split} (AUC {aucs[split]:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def confusion_png(rows: list[dict], path: str) -> None:
    """A confusion matrix per evaluated split (rows: truth, columns: prediction)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * max(1, len(rows)), 3.2))
    for i, r in enumerate(rows, 1):
        ax = fig.add_subplot(1, len(rows), i)
        m = np.array([[r["tn"], r["fp"]], [r["fn"], r["tp"]]])
        ax.imshow(m, cmap="Blues")
        for (y, x), v in np.ndenumerate(m):
            ax.text(x, y, str(v), ha="center", va="center", color="black" if v < m.max() / 2 else "white")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["NORMAL", "PNEUM."], yticklabels=["NORMAL", "PNEUM."],
               title=f"{r['split']} (threshold {r['threshold']:.2f})")
    fig.tight_layout()
    _save(fig, path)


def gradcam_png(images: np.ndarray, cams: np.ndarray, titles: list[str], path: str) -> None:
    """Images (N, p, p) with their Grad-CAM heatmap overlaid, one titled tile each."""
    from matplotlib.figure import Figure

    n = len(images)
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows))
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(images[i], cmap="gray")
        ax.imshow(cams[i], cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.set_title(titles[i], fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def curve_png(curve: dict[str, list[float]], path: str, title: str) -> None:
    """Training curves (Keras history: loss, val_loss, ...) against the epoch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for name, values in sorted(curve.items()):
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    ax.legend()
    _save(fig, path)
