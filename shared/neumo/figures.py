"""Pictures for people: ROC curves, confusion matrices, Grad-CAM sheets and training curves as PNG files.

Each `*_png` is a thin wrapper over a `*_figure` that returns the matplotlib Figure, so tests can
check what a reader will see (labels, legends, contrast) rather than only that a file exists.
"""

from __future__ import annotations

import math

import numpy as np

from neumo.ingest import CLASSES

DPI = 120
# Distinct line style, marker and width per ROC split, so a curve drawn over an identical one
# still shows (the wider solid line stays visible around the narrower dashed one on top).
ROC_STYLES = (("-", "o", 4.0), ("--", "s", 2.5), (":", "^", 1.5), ("-.", "D", 1.0))


def _save(fig, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).print_png(path)


def png_bytes(fig) -> bytes:
    """A Figure as PNG bytes (to inline in an HTML page)."""
    import io

    buf = io.BytesIO()
    _save(fig, buf)
    return buf.getvalue()


def _new_figure(width: float, height: float):
    """A pyplot-free Figure (safe in threads) whose layout never clips titles or labels."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def luminance(rgb) -> float:
    """WCAG relative luminance of an sRGB colour (components 0..1)."""
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a, b) -> float:
    """WCAG contrast ratio (1..21) between two colours; 4.5 is the minimum for small text."""
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_colour(face) -> str:
    """Black or white, whichever reads better on `face` (always >= 4.5:1)."""
    return "black" if contrast(face, (0, 0, 0)) >= contrast(face, (1, 1, 1)) else "white"


# --- ROC ---------------------------------------------------------------------------------------

def _same_curve(a: dict, b: dict) -> bool:
    return len(a["fpr"]) == len(b["fpr"]) and np.allclose(a["fpr"], b["fpr"]) and np.allclose(a["tpr"], b["tpr"])


def _roc_label(split: str, auc: float, twin: str) -> str:
    """Legend text: the split, its AUC (or why there is none) and which earlier curve it repeats."""
    label = f"{split}: AUC {auc:.3f}" if math.isfinite(auc) else f"{split}: AUC undefined (one class)"
    return f"{label} (same as {twin})" if twin else label


def roc_figure(curves: dict[str, dict], aucs: dict[str, float]):
    """One ROC curve per split ({split: {"fpr": [...], "tpr": [...]}}), each in its own style."""
    fig = _new_figure(5.2, 5.2)
    ax = fig.add_subplot()
    drawn: dict[str, dict] = {}
    for i, (split, c) in enumerate(curves.items()):
        style, marker, width = ROC_STYLES[i % len(ROC_STYLES)]
        twin = next((s for s, d in drawn.items() if _same_curve(d, c)), "")
        x, y = [0.0, *c["fpr"], 1.0], [0.0, *c["tpr"], 1.0]
        ax.plot(x, y, linestyle=style, linewidth=width, marker=marker, markersize=3 + 2 * width,
                markerfacecolor="none", markevery=max(1, len(x) // 12), color=f"C{i}",
                label=_roc_label(split, float(aucs.get(split, float("nan"))), twin), zorder=3 + i)
        drawn[split] = c
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance (AUC 0.5)", zorder=2)
    ax.set(xlabel="1 − specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)",
           title="ROC curve per split" if curves else "ROC: no split with images",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def roc_png(curves: dict[str, dict], aucs: dict[str, float], path: str) -> None:
    """roc_figure as a PNG file."""
    _save(roc_figure(curves, aucs), path)


# --- confusion matrix ----------------------------------------------------------------------------

def _cell_text(count: int, row_total: int) -> str:
    """The count and its share of the true class (none of that class: said so, cell greyed)."""
    return f"{count}\n{100 * count / row_total:.1f}%" if row_total else f"{count}\nno images"


def _confusion_axes(ax, row: dict, cmap, norm) -> None:
    """One split's matrix, coloured by each cell's share of its true-class row (0..100%)."""
    m = np.array([[row["tn"], row["fp"]], [row["fn"], row["tp"]]], dtype=int)
    totals = m.sum(axis=1)
    share = np.divide(m, totals[:, None], out=np.full(m.shape, np.nan), where=totals[:, None] > 0)
    im = ax.imshow(share, cmap=cmap, norm=norm)
    for (y, x), v in np.ndenumerate(m):
        ax.text(x, y, _cell_text(int(v), int(totals[y])), ha="center", va="center", fontsize=10,
                color=text_colour(im.cmap(im.norm(share[y, x]))))
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=list(CLASSES), xlabel="predicted", ylabel="true",
           yticklabels=[f"{c}\n(n={t})" for c, t in zip(CLASSES, totals)],
           title=f"{row['split']}: n={int(m.sum())}, threshold {float(row['threshold']):.2f}")
    ax.tick_params(axis="y", labelrotation=90)
    for label in ax.get_yticklabels():
        label.set_verticalalignment("center")


def confusion_figure(rows: list[dict]):
    """A confusion matrix per evaluated split (rows: truth, columns: prediction; each cell the count
    and the row percentage, coloured 0..100% of the true class)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    fig = _new_figure(3.4 * max(1, len(rows)) + 1.0, 3.8)
    if not rows:
        fig.text(0.5, 0.5, "no evaluated split", ha="center", va="center")
        return fig
    norm, cmap, axes = Normalize(0.0, 1.0), colormaps["Blues"].with_extremes(bad="lightgrey"), []
    for i, r in enumerate(rows, 1):
        axes.append(fig.add_subplot(1, len(rows), i))
        _confusion_axes(axes[-1], r, cmap, norm)
    bar = fig.colorbar(axes[-1].images[0], ax=axes, shrink=0.8, format=lambda v, _: f"{100 * v:.0f}%")
    bar.set_label("share of the true class (row %)")
    return fig


def confusion_png(rows: list[dict], path: str) -> None:
    """confusion_figure as a PNG file."""
    _save(confusion_figure(rows), path)


# --- Grad-CAM ------------------------------------------------------------------------------------

def _gradcam_title(target: int, p: float, threshold: float) -> tuple[str, str]:
    """A tile's title (true class, p, the call, right/WRONG) and its colour."""
    call = int(p >= threshold)
    right = call == int(target)
    text = f"true {CLASSES[int(target)]}, p={p:.2f}\ncall {CLASSES[call]}: {'right' if right else 'WRONG'}"
    return text, ("darkgreen" if right else "firebrick")


def gradcam_figure(images: np.ndarray, cams: np.ndarray, targets, probs, threshold: float, split: str):
    """Images (N, p, p) with their Grad-CAM heat map (N, p, p, 0..1) overlaid: one titled tile each."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n = len(images)
    cols = max(1, min(n, 6))
    rows = max(1, (n + cols - 1) // cols)
    fig = _new_figure(max(2.3 * cols + 1.2, 6.0), max(2.6 * rows + 0.9, 4.2))
    fig.suptitle(f"Grad-CAM on the {split} split ({n} image{'s' * (n != 1)}); p = the model's pneumonia "
                 f"probability,\ncall PNEUMONIA when p ≥ {threshold:.2f}", fontsize=9)
    axes = []
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(images[i], cmap="gray")
        ax.imshow(cams[i], cmap="jet", alpha=0.35, vmin=0, vmax=1)
        text, colour = _gradcam_title(targets[i], float(probs[i]), threshold)
        ax.set_title(text, fontsize=7, color=colour)
        ax.axis("off")
        axes.append(ax)
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), "jet"), ax=axes or None, shrink=0.8, aspect=25)
    bar.set_label("Grad-CAM: where the model looked, 0-1", fontsize=8)
    return fig


def gradcam_png(images: np.ndarray, cams: np.ndarray, targets, probs, threshold: float, split: str,
                path: str) -> None:
    """gradcam_figure as a PNG file."""
    _save(gradcam_figure(images, cams, targets, probs, threshold, split), path)


# --- training curves -----------------------------------------------------------------------------

def best_epoch(values, mode: str = "min") -> int | None:
    """The 1-based epoch of the best finite value (None when there is none)."""
    v = np.asarray(values, dtype=float)
    if not np.isfinite(v).any():
        return None
    v = np.where(np.isfinite(v), v, np.inf if mode == "min" else -np.inf)
    return int(np.argmin(v) if mode == "min" else np.argmax(v)) + 1


def _curve_axes(ax, curve: dict[str, list[float]], names: list[str], ylabel: str, best: int | None) -> None:
    """Some of the history's series against integer epochs, with the best epoch marked."""
    from matplotlib.ticker import MaxNLocator

    epochs = max((len(curve[k]) for k in names), default=1)
    for name in names:
        values = np.asarray(curve[name], dtype=float)
        gaps = [str(e) for e in np.flatnonzero(~np.isfinite(values)) + 1]
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=4,
                linestyle="--" if name.startswith("val_") else "-",
                label=f"{name} (not finite at epoch {', '.join(gaps)})" if gaps else name)
    if best:
        ax.axvline(best, color="grey", linestyle=":", linewidth=1.2, label=f"best epoch ({best})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set(xlim=(0.5, epochs + 0.5), xlabel="epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if names:
        ax.legend(fontsize=8)


def curve_figure(curve: dict[str, list[float]], title: str, ylabel: str = "loss", metric: str = "",
                 best_by: str = "val_loss", mode: str = "min"):
    """Training curves: the losses on one panel, `metric` (e.g. "auc") and its val_ twin on a second,
    the best epoch by `best_by` marked when that validation series is present."""
    losses = sorted(k for k in curve if k.endswith("loss"))
    others = [k for k in (metric, f"val_{metric}") if metric and k in curve]
    best = best_epoch(curve[best_by], mode) if best_by in curve else None
    fig = _new_figure(5.5, 3.6 + 2.4 * bool(others))
    fig.suptitle(title, fontsize=10)
    _curve_axes(fig.add_subplot(1 + bool(others), 1, 1), curve, losses, ylabel, best)
    if others:
        _curve_axes(fig.add_subplot(2, 1, 2, sharex=fig.axes[0]), curve, others, metric, best)
    return fig


def curve_png(curve: dict[str, list[float]], path: str, title: str, ylabel: str = "loss", metric: str = "",
              best_by: str = "val_loss", mode: str = "min") -> None:
    """curve_figure as a PNG file."""
    _save(curve_figure(curve, title, ylabel, metric, best_by, mode), path)


# --- calibration -------------------------------------------------------------------------------

def _ece_label(split: str, cal: dict) -> str:
    ece = float(cal.get("ece", float("nan")))
    return f"{split}: ECE {ece:.3f} (n={cal.get('n', 0)})" if math.isfinite(ece) else f"{split}: no images"


def reliability_figure(calibrations: dict[str, dict]):
    """Reliability diagram: per split ({split: evaluation.calibration(...)}), the share of pneumonia
    against the mean predicted probability in each bin (the diagonal is perfect calibration), and
    below it how many images each bin holds (a point on few images says little)."""
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(5.2, 6.4)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1))
    ax, counts = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    width = 1.0 / max(1, len(calibrations))
    for i, (split, cal) in enumerate(calibrations.items()):
        bins = [b for b in cal.get("bins", []) if b["count"]]
        style, marker, line = ROC_STYLES[i % len(ROC_STYLES)]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], linestyle=style, marker=marker,
                linewidth=min(line, 2.5), markersize=6, markerfacecolor="none", color=f"C{i}", label=_ece_label(split, cal))
        every = cal.get("bins", [])
        lows = np.array([b["low"] for b in every])
        spans = np.array([b["high"] - b["low"] for b in every])
        counts.bar(lows + spans * width * i, [b["count"] for b in every], width=spans * width, align="edge",
                   color=f"C{i}", label=split)
    ax.set(xlabel="mean predicted pneumonia probability (bin)", ylabel="share with pneumonia (bin)",
           title="Reliability diagram" if calibrations else "Reliability: no split with images",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    counts.set(xlabel="predicted pneumonia probability", ylabel="images", xlim=(-0.01, 1.01))
    counts.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    counts.grid(alpha=0.3, axis="y")
    return fig


def reliability_png(calibrations: dict[str, dict], path: str) -> None:
    """reliability_figure as a PNG file."""
    _save(reliability_figure(calibrations), path)
