"""Every picture drawn with adversarial values: valid PNGs, and what a reader sees (labels, legends,
contrast, integer epochs, nothing clipped) checked on the matplotlib Figure or the sheet's pixels."""

import cv2
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb

from neumo import figures, masking
from tests.test_training import variant  # noqa: F401  (the tiny prepared variant, for the classifier's curve)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_ok(path) -> np.ndarray:
    """The file is a PNG that decodes to a picture of sensible size; returns it."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None and 200 <= image.shape[0] <= 4000 and 200 <= image.shape[1] <= 4000
    assert image.std() > 5  # not a blank canvas
    return image


def _drawn(fig) -> tuple[np.ndarray, object]:
    """Render the figure; returns its RGB pixels (row 0 at the top) and the renderer."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3] / 255.0, canvas.get_renderer()


def _shown_tick_labels(ax) -> list:
    """The tick labels drawn (those inside the view limits)."""
    (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
    return ([t for t in ax.get_xticklabels() if x0 <= t.get_position()[0] <= x1]
            + [t for t in ax.get_yticklabels() if y0 <= t.get_position()[1] <= y1])


def _nothing_clipped(fig, renderer) -> None:
    """Titles, axis labels, tick labels and legends all lie inside the figure."""
    box = fig.bbox
    artists = [t for t in (fig._suptitle,) if t is not None]
    for ax in fig.axes:
        artists += [ax.title, ax.xaxis.label, ax.yaxis.label]
        if ax.axison:
            artists += _shown_tick_labels(ax)
        if ax.get_legend():
            artists.append(ax.get_legend())
    for a in artists:
        if not a.get_visible() or (hasattr(a, "get_text") and not a.get_text()):
            continue
        bb = a.get_window_extent(renderer)
        if bb.width == 0:
            continue
        assert box.x0 - 1 <= bb.x0 and bb.x1 <= box.x1 + 1 and box.y0 - 1 <= bb.y0 and bb.y1 <= box.y1 + 1, a


# --- confusion matrix -------------------------------------------------------------------------------

def _row(split, tn, fp, fn, tp, threshold=0.5):
    return {"split": split, "tn": tn, "fp": fp, "fn": fn, "tp": tp, "threshold": threshold}


ADVERSARIAL_CONFUSIONS = [
    _row("equal", 5, 5, 5, 5),
    _row("no-normal", 0, 0, 3, 9, 0.41),  # tn + fp = 0
    _row("no-pneumonia", 7, 2, 0, 0),  # fn + tp = 0
    _row("zero", 0, 0, 0, 0),
    _row("imbalanced", 234, 0, 1, 3875, 0.93),
]


def _cell_face(pixels, ax, x: int, y: int):
    """The rendered colour of matrix cell (x, y), sampled near its corner, away from the text."""
    px, py = ax.transData.transform((x - 0.4, y - 0.4))
    return pixels[pixels.shape[0] - int(round(py)), int(round(px))]


@pytest.mark.parametrize("row", ADVERSARIAL_CONFUSIONS, ids=lambda r: r["split"])
def test_every_confusion_count_is_readable_and_labelled(row, tmp_path):
    fig = figures.confusion_figure([row, _row("other", 50, 3, 4, 60)])
    pixels, renderer = _drawn(fig)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["NORMAL", "PNEUMONIA"]
    assert [t.get_text().split("\n")[0] for t in ax.get_yticklabels()] == ["NORMAL", "PNEUMONIA"]
    n = row["tn"] + row["fp"] + row["fn"] + row["tp"]
    assert ax.get_title() == f"{row['split']}: n={n}, threshold {row['threshold']:.2f}"
    assert ax.images[0].norm.vmin == 0 and ax.images[0].norm.vmax == 1  # 0 .. the row total
    assert len(ax.texts) == 4
    for text in ax.texts:
        x, y = (int(round(v)) for v in text.get_position())
        ratio = figures.contrast(_cell_face(pixels, ax, x, y), to_rgb(text.get_color()))
        assert ratio >= 4.5, (text.get_text(), ratio)
    _nothing_clipped(fig, renderer)
    figures.confusion_png([row], str(tmp_path / "confusion.png"))
    _png_ok(tmp_path / "confusion.png")


def test_confusion_cells_show_count_and_row_percentage():
    fig = figures.confusion_figure([_row("equal", 5, 5, 5, 5), _row("no-normal", 0, 0, 3, 9)])
    assert [t.get_text() for t in fig.axes[0].texts] == ["5\n50.0%"] * 4
    assert [t.get_text() for t in fig.axes[1].texts] == ["0\nno images", "0\nno images", "3\n25.0%", "9\n75.0%"]
    equal = fig.axes[0].images[0]
    assert np.allclose(equal.get_array(), 0.5)  # coloured as half the row, not as the matrix's minimum
    assert np.ma.getmaskarray(fig.axes[1].images[0].get_array())[0].all()  # no NORMAL images: greyed, not 0%


def test_confusion_with_no_split_says_so(tmp_path):
    fig = figures.confusion_figure([])
    assert [t.get_text() for t in fig.texts] == ["no evaluated split"]
    figures.confusion_png([], str(tmp_path / "none.png"))
    assert (tmp_path / "none.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("face", [(1, 1, 1), (0, 0, 0), (0.5, 0.5, 0.5), (0.03, 0.19, 0.42), (0.42, 0.68, 0.84)])
def test_text_colour_always_meets_the_contrast_minimum(face):
    assert figures.contrast(face, to_rgb(figures.text_colour(face))) >= 4.5


# --- ROC ----------------------------------------------------------------------------------------------

def test_identical_roc_curves_both_stay_visible_and_named(tmp_path):
    same = {"fpr": [0.0, 0.1, 0.4, 1.0], "tpr": [0.5, 0.8, 0.95, 1.0]}
    curves = {"val": same, "test+val": {k: list(v) for k, v in same.items()}, "valid": {"fpr": [0.0], "tpr": [0.0]}}
    fig = figures.roc_figure(curves, {"val": 0.91, "test+val": 0.91, "valid": float("nan")})
    _, renderer = _drawn(fig)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["val: AUC 0.910", "test+val: AUC 0.910 (same as val)", "valid: AUC undefined (one class)",
                      "chance (AUC 0.5)"]
    val, both = ax.lines[:2]
    assert (val.get_linestyle(), val.get_marker()) != (both.get_linestyle(), both.get_marker())
    assert val.get_linewidth() > both.get_linewidth() and val.get_zorder() < both.get_zorder()  # wide under narrow
    assert ax.get_xlabel() == "1 − specificity (false-positive rate)"
    assert ax.get_ylabel() == "sensitivity (true-positive rate)"
    assert ax.get_aspect() == 1.0 and ax.get_xlim() == ax.get_ylim()
    _nothing_clipped(fig, renderer)
    figures.roc_png(curves, {"val": 0.91, "test+val": 0.91, "valid": float("nan")}, str(tmp_path / "roc.png"))
    _png_ok(tmp_path / "roc.png")


def test_roc_curves_that_differ_are_not_called_the_same():
    fig = figures.roc_figure({"a": {"fpr": [0.0, 1.0], "tpr": [0.5, 1.0]}, "b": {"fpr": [0.0, 1.0], "tpr": [0.6, 1.0]}},
                             {"a": 0.75, "b": 0.8})
    assert not any("same as" in t.get_text() for t in fig.axes[0].get_legend().get_texts())


# --- Grad-CAM -----------------------------------------------------------------------------------------

def _colourbars(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


@pytest.mark.parametrize("n", [1, 8])
def test_gradcam_sheet_says_split_threshold_and_calls(n, tmp_path):
    rng = np.random.default_rng(n)
    images = (rng.random((n, 48, 48)) * 255).astype(np.uint8)
    cams = rng.random((n, 48, 48))
    targets = np.array([1, 0, 1, 0, 1, 0, 1, 0])[:n]
    probs = np.array([0.42, 0.7, 0.1, 0.2, 0.99, 0.0, 0.5, 0.41])[:n]
    fig = figures.gradcam_figure(images, cams, targets, probs, 0.42, "test")
    _, renderer = _drawn(fig)
    title = fig._suptitle.get_text()
    assert "test split" in title and "0.42" in title and "pneumonia probability" in title
    tiles = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(tiles) == n
    assert tiles[0].get_title() == "true PNEUMONIA, p=0.42\ncall PNEUMONIA: right"  # p at the threshold: PNEUMONIA
    if n > 1:
        assert tiles[1].get_title() == "true NORMAL, p=0.70\ncall PNEUMONIA: WRONG"
    (bar,) = _colourbars(fig)
    assert bar.get_ylabel() == "Grad-CAM: where the model looked, 0-1" and bar.get_ylim() == (0.0, 1.0)
    _nothing_clipped(fig, renderer)
    figures.gradcam_png(images, cams, targets, probs, 0.42, "test", str(tmp_path / "gradcam.png"))
    _png_ok(tmp_path / "gradcam.png")


# --- training curves --------------------------------------------------------------------------------

def _integer_ticks(ax) -> list[float]:
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    return ticks


@pytest.mark.parametrize("curve", [
    {"loss": [0.7], "val_loss": [0.69]},
    {"loss": [0.9, 0.5, float("nan"), 0.3, 0.28], "val_loss": [1.0, 0.6, 0.5, 0.55, 0.6]},
    {"loss": [0.9, 0.8], "val_loss": [float("nan"), float("nan")]},
    {"loss": list(np.linspace(1, 0.1, 37))},
], ids=["one-epoch", "nan-in-loss", "all-nan-val", "long-no-val"])
def test_loss_curve_has_integer_epochs_and_unclipped_labels(curve, tmp_path):
    fig = figures.curve_figure(curve, "reconstruction loss, 64 px", ylabel="reconstruction loss (MSE)")
    _, renderer = _drawn(fig)
    (ax,) = fig.axes
    ticks = _integer_ticks(ax)
    assert min(ticks) >= 1 and max(ticks) <= len(curve["loss"])
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "reconstruction loss (MSE)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    best = figures.best_epoch(curve.get("val_loss", []))
    assert (f"best epoch ({best})" in legend) == (best is not None)
    if any(np.isnan(curve["loss"])):
        assert "loss (not finite at epoch 3)" in legend
    _nothing_clipped(fig, renderer)
    figures.curve_png(curve, str(tmp_path / "curve.png"), "title", ylabel="reconstruction loss (MSE)")
    _png_ok(tmp_path / "curve.png")


def test_classifier_curve_has_a_metric_panel_and_the_best_epoch_by_val_auc():
    curve = {"loss": [0.7, 0.5, 0.4], "val_loss": [0.6, 0.5, 0.45], "auc": [0.6, 0.8, 0.9], "val_auc": [0.7, 0.9, 0.8],
             "accuracy": [0.5, 0.6, 0.7], "val_accuracy": [0.5, 0.6, 0.7]}
    fig = figures.curve_figure(curve, "classifier", ylabel="loss (bce)", metric="auc", best_by="val_auc", mode="max")
    _, renderer = _drawn(fig)
    losses, metric = fig.axes
    assert [ln.get_label() for ln in losses.lines] == ["loss", "val_loss", "best epoch (2)"]
    assert [ln.get_label() for ln in metric.lines] == ["auc", "val_auc", "best epoch (2)"]
    assert losses.get_ylabel() == "loss (bce)" and metric.get_ylabel() == "auc"
    _integer_ticks(metric)
    _nothing_clipped(fig, renderer)


@pytest.mark.parametrize(("values", "mode", "best"), [
    ([0.5, 0.3, 0.4], "min", 2), ([0.5, 0.3, 0.4], "max", 1), ([float("nan"), 0.2, float("inf")], "min", 2),
    ([float("nan"), float("-inf"), 0.2], "max", 3), ([float("nan")], "min", None), ([], "max", None),
])
def test_best_epoch_ignores_values_that_are_not_finite(values, mode, best):
    assert figures.best_epoch(values, mode) == best


@pytest.mark.slow
def test_a_trial_writes_its_training_curve(variant, tmp_path):  # noqa: F811
    from neumo import training
    from neumo.trial import TrialConfig

    root, _ = variant
    cfg = TrialConfig.from_dict({"pixels": 64, "mask": False, "model": 2, "frozen_layers": 2, "learning_rate": 3e-3,
                                 "loss": "bce", "augmentation": "none", "class_weight": False})
    training.train_trial(cfg, training.TrainSettings(epochs=2, seed=1), str(root / "p"),
                         str(root / "b" / "autoencoder.keras"), str(tmp_path))
    assert (tmp_path / "history.csv").exists()
    _png_ok(tmp_path / "curve.png")


# --- the mask contact sheet -------------------------------------------------------------------------

NAMES = ["PNEUMONIA / train\nperson1234_bacteria_5678_a_very_long_file_name_indeed_0001.jpeg",
         "NORMAL / valid\nÑoño_肺部影像_radiografía.png", "short", "unlabelled / unlabelled\n" + "x" * 90]


def test_contact_sheet_titles_fit_their_tiles_and_the_legend_is_shown(tmp_path):
    rng = np.random.default_rng(0)
    images = [(rng.random((120, 100)) * 255).astype(np.uint8) for _ in NAMES]
    masks = [np.zeros((120, 100), bool) for _ in NAMES]
    for m in masks:
        m[20:100, 10:45] = m[20:100, 55:90] = True
    cell = 160
    sheet = masking.contact_sheet(images, masks, NAMES, cell=cell)
    caption = sheet[:24]
    assert sheet.dtype == np.uint8 and sheet.shape[1] == 6 * cell
    assert ((caption[..., 1] > 150) & (caption[..., 2] < 80)).sum() > 50  # the green legend text
    band = sheet[24 + cell:]  # the title band under the first row of images
    assert band.max() > 200  # titles were drawn
    for k in range(len(NAMES)):
        assert band[:, k * cell + cell - 2].max() == 0  # no title runs into its neighbour
    assert cv2.imwrite(str(tmp_path / "sheet.png"), sheet)
    _png_ok(tmp_path / "sheet.png")


@pytest.mark.parametrize("name", ["person1234_bacteria_5678_a_very_long_file_name_indeed_0001.jpeg",
                                  "Ñoño_肺部影像_radiografía_patient_000123_view_PA.png"])
def test_sheet_text_keeps_both_ends_of_a_long_name(name):
    short = masking.sheet_text(name, 150)
    assert short.isascii() and "..." in short
    assert cv2.getTextSize(short, masking.SHEET_FONT, masking.SHEET_SCALE, 1)[0][0] <= 150
    head, tail = short.split("...")
    ascii_name = masking.sheet_text(name, 10_000)
    assert len(head) >= 5 and len(tail) >= 5 and ascii_name.startswith(head) and ascii_name.endswith(tail)
    assert masking.sheet_text("IM-0001.jpeg", 150) == "IM-0001.jpeg"


def _manifest(counts: dict[tuple[str, str], int]) -> list[dict]:
    """Manifest rows in the order ingest writes them (one fold and class after another)."""
    return [{"id": f"{fold}/{label}/{i:04d}.jpeg", "fold": fold, "label": label}
            for (fold, label), n in counts.items() for i in range(n)]


def test_sheet_sample_covers_every_fold_and_class():
    rows = _manifest({(f, c): 40 for f in ("train", "valid", "test", "val") for c in ("NORMAL", "PNEUMONIA")})
    picked = masking.sheet_rows(rows, 24)
    assert len(picked) == 24 and len({r["id"] for r in picked}) == 24
    groups = {(r["fold"], r["label"]) for r in picked}
    assert len(groups) == 8 and all(sum((r["fold"], r["label"]) == g for r in picked) == 3 for g in groups)
    assert picked == masking.sheet_rows(rows, 24)  # deterministic
    assert [r["fold"] for r in picked][::3] == ["train", "train", "valid", "valid", "val", "val", "test", "test"]


def test_sheet_sample_fills_up_from_larger_groups_and_handles_small_manifests():
    rows = _manifest({("train", "NORMAL"): 1, ("train", "PNEUMONIA"): 30, ("test", "NORMAL"): 2, ("unl", ""): 5})
    picked = masking.sheet_rows(rows, 12)
    assert len(picked) == 12 and len({r["id"] for r in picked}) == 12
    assert sum(r["label"] == "NORMAL" for r in picked) == 3 and sum(r["label"] == "" for r in picked) == 4
    assert masking.sheet_rows(rows[:3], 24) == rows[:3]
    assert masking.sheet_rows([], 24) == []
