"""Out-of-distribution check: is an image like the chest X-rays the classifier was checked on?

A pediatric pneumonia classifier gives a probability for any image it is shown: an adult film, a
photograph, a blank frame. This module turns the classifier's own backbone into a warning. The
method (``"mahalanobis-gap"``, after Lee et al. 2018, "A simple unified framework for detecting
out-of-distribution samples"):

1. each image is z-scored as in training (:func:`neumo.imaging.zscore`) and passed through the
   classifier's nested ``"backbone"``; each chosen encoder tap is global-average-pooled, and the
   pooled vectors are concatenated (``taps``; default: all three);
2. the features are standardised per dimension with the fitting images' mean and standard
   deviation (a floor on the deviation keeps a channel that never fires on the fitting images
   from turning tiny activations elsewhere into huge distances);
3. the score is the Mahalanobis distance to the fitting images under a Ledoit-Wolf shrinkage
   covariance, which stays well conditioned with fewer images than feature dimensions;
4. the threshold is the (1 - false_alarm) quantile of the fitting images' out-of-fold scores
   (5-fold, each image scored by statistics fitted without it; by patient when `groups` is
   given): an image is flagged when its score is above it. In-sample scores would not do: an
   image's distance to a set that contains it is smaller than a new image's, and with nearly as
   many features as images a threshold on them flags most new in-distribution images.

Fit it on the **valid fold** (held-out patients of the training distribution). The train fold's
features are what the backbone was fitted to, so their distances are smaller than a new
in-distribution image's and a threshold set on them raises more false alarms on new images.
The false-alarm rate stored in the reference is the one on the fitting images' out-of-fold
scores (``false_alarm`` by construction); ``benchmarks/ood_check.py`` measures it on held-out
patients, and the flagged shares of adult chest X-rays and non-chest images.

The reference :func:`fit` returns is a JSON-serialisable dict, stored with the model bundle.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

METHOD = "mahalanobis-gap"
#: Smallest per-dimension standard deviation, as a share of the median one (dead channels).
STD_FLOOR = 0.1
#: Added to the shrunk covariance's diagonal, as a share of its mean variance (never singular).
RIDGE = 1e-6
#: Folds of the cross-fitted threshold (each image scored by statistics fitted without it).
CV_FOLDS = 5
#: Significant digits kept for the stored floats (the reference lives in a JSON file).
DIGITS = 7


def _round(values: np.ndarray) -> list:
    """A float array as nested lists of floats with DIGITS significant digits (compact JSON)."""
    return np.vectorize(lambda v: float(f"{v:.{DIGITS}g}"), otypes=[float])(np.asarray(values, np.float64)).tolist()


def _backbone(classifier):
    try:
        return classifier.get_layer("backbone")
    except ValueError as err:
        raise ValueError(f"the OOD check needs a classifier with a nested 'backbone' model (build_classifier): {err}") from err


def _check_images(classifier, images: np.ndarray) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"expected images (N, p, p) as stored by preprocess, got shape {arr.shape}")
    pixels = tuple(_backbone(classifier).input.shape[1:3])
    if arr.shape[1:] != pixels:
        raise ValueError(f"images are {arr.shape[1]}x{arr.shape[2]} but the classifier takes {pixels[0]}x{pixels[1]}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"expected a numeric image array (uint8), got dtype {arr.dtype}")
    return arr


def features(classifier, images: np.ndarray, taps: tuple[int, ...] = (0, 1, 2), batch_size: int = 64) -> np.ndarray:
    """uint8 images (N, p, p) -> float64 (N, F): the chosen backbone taps, global-average-pooled and
    concatenated (taps 0-based, shallowest first, as :func:`neumo.models.build_backbone` orders them)."""
    from neumo import imaging

    arr = _check_images(classifier, images)
    backbone = _backbone(classifier)
    n_taps = len(backbone.outputs)
    if not taps or any(not 0 <= t < n_taps for t in taps):
        raise ValueError(f"taps must be a non-empty subset of 0..{n_taps - 1}, got {taps!r}")
    if len(arr) == 0:
        width = sum(int(backbone.outputs[t].shape[-1]) for t in taps)
        return np.zeros((0, width), np.float64)
    out = []
    for start in range(0, len(arr), batch_size):
        maps = backbone(imaging.zscore(arr[start:start + batch_size]), training=False)
        maps = maps if isinstance(maps, (list, tuple)) else [maps]
        out.append(np.concatenate([np.asarray(maps[t]).mean(axis=(1, 2)) for t in taps], axis=1))
    return np.concatenate(out).astype(np.float64)


def _distances(feats: np.ndarray, reference: dict) -> np.ndarray:
    z = (feats - np.asarray(reference["mean"])) / np.asarray(reference["scale"])
    d2 = np.einsum("ij,jk,ik->i", z, np.asarray(reference["precision"]), z)
    return np.sqrt(np.maximum(d2, 0.0))


def _statistics(feats: np.ndarray) -> dict:
    """Mean, per-dimension scale and the shrunk precision matrix of standardised features (rounded
    as stored, so scores computed from them equal the ones a loaded reference gives)."""
    from sklearn.covariance import LedoitWolf

    mean = feats.mean(axis=0)
    std = feats.std(axis=0)
    floor = STD_FLOOR * float(np.median(std)) if np.any(std > 0) else 1.0
    scale = np.maximum(std, max(floor, 1e-12))
    lw = LedoitWolf(assume_centered=True).fit((feats - mean) / scale)
    cov = lw.covariance_
    cov = cov + RIDGE * max(float(np.trace(cov)) / len(cov), 1e-12) * np.eye(len(cov))
    precision = np.linalg.inv(cov)
    return {"shrinkage": float(lw.shrinkage_), "mean": _round(mean), "scale": _round(scale),
            "precision": _round((precision + precision.T) / 2)}


def _folds(n: int, groups, k: int) -> np.ndarray:
    """A fold index (0..k-1) per image, whole groups (patients) kept together, seeded."""
    keys = np.arange(n) if groups is None else np.asarray([str(g) for g in groups])
    if len(keys) != n:
        raise ValueError(f"groups must name one group per image: {len(keys)} groups for {n} images")
    unique, inverse = np.unique(keys, return_inverse=True)
    order = np.random.default_rng(0).permutation(len(unique))
    return (order % k)[inverse]


def fit(classifier, images_uint8: np.ndarray, false_alarm: float = 0.05, *, taps: tuple[int, ...] = (0, 1, 2),
        groups=None, folds: int = CV_FOLDS, fitted_on: str = "") -> dict:
    """The OOD reference of a classifier, from in-distribution images (the valid fold).

    The statistics are fitted on all images; the threshold is the (1 - false_alarm) quantile of
    the images' **out-of-fold** scores (`folds`-fold, each image scored by statistics fitted
    without it, and without the rest of its group when `groups`, e.g. patient ids, is given): an
    image's distance to a set that includes it is smaller than a new image's, and with nearly as
    many features as images a threshold on such in-sample scores flags most new in-distribution
    images. With fewer than 2 * folds groups the scores are in-sample (said in "threshold_from").
    Returns a JSON-serialisable dict: method, taps, pixels, the statistics, the threshold, the
    false-alarm rate on the fitting images' scores and a few score quantiles.
    Raises ValueError with fewer than 2 images or false_alarm outside (0, 0.5].
    """
    if not 0.0 < false_alarm <= 0.5:
        raise ValueError(f"false_alarm must be in (0, 0.5], got {false_alarm}")
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    feats = features(classifier, images_uint8, tuple(taps))
    if len(feats) < 2:
        raise ValueError(f"the OOD reference needs at least 2 in-distribution images, got {len(feats)}")
    reference = {"method": METHOD, "taps": [int(t) for t in taps], "pixels": int(np.asarray(images_uint8).shape[1]),
                 "features": int(feats.shape[1]), "n_fit": int(len(feats)), "fitted_on": fitted_on,
                 **_statistics(feats)}
    fold = _folds(len(feats), groups, folds)
    if len(np.unique(fold)) == folds and min(np.bincount(fold, minlength=folds)) >= 1 and len(feats) >= 2 * folds:
        scores = np.empty(len(feats))
        for k in range(folds):
            scores[fold == k] = _distances(feats[fold == k], _statistics(feats[fold != k]))
        source = f"{folds}-fold out-of-fold scores" + (" (folds by group)" if groups is not None else "")
    else:
        scores = _distances(feats, reference)
        source = "in-sample scores (too few images to hold any out: the threshold is optimistic)"
        logger.warning("OOD reference on %d image(s): %s", len(feats), source)
    threshold = float(np.quantile(scores, 1.0 - false_alarm))
    reference.update({
        "false_alarm_target": float(false_alarm), "threshold": threshold, "threshold_from": source,
        "false_alarm_rate": float(np.mean(scores > threshold)),
        "score_quantiles": {q: float(np.quantile(scores, float(q))) for q in ("0.5", "0.9", "0.95", "0.99")},
    })
    logger.info("OOD reference: %d images%s, %d features, shrinkage %.3f, threshold %.2f from %s",
                len(feats), f" ({fitted_on})" if fitted_on else "", feats.shape[1], reference["shrinkage"], threshold,
                source)
    return reference


def _check_reference(reference: dict) -> None:
    missing = [k for k in ("method", "taps", "mean", "scale", "precision", "threshold") if k not in reference]
    if missing:
        raise ValueError(f"not an OOD reference (missing {', '.join(missing)}): made by neumo.ood.fit")
    if reference["method"] != METHOD:
        raise ValueError(f"unknown OOD method {reference['method']!r} (this version knows {METHOD!r})")


def score(classifier, images_uint8: np.ndarray, reference: dict) -> np.ndarray:
    """float64 (N,): each image's distance to the reference's images; higher = more unusual."""
    _check_reference(reference)
    feats = features(classifier, images_uint8, tuple(reference["taps"]))
    if feats.shape[1] != len(reference["mean"]):
        raise ValueError(f"the classifier gives {feats.shape[1]} features but the OOD reference has "
                         f"{len(reference['mean'])}: a reference fitted for another model")
    return _distances(feats, reference) if len(feats) else np.zeros((0,), np.float64)


def flags(scores: np.ndarray, reference: dict) -> np.ndarray:
    """bool (N,): True where the score is above the reference's threshold (out of distribution)."""
    if "threshold" not in reference:
        raise ValueError("not an OOD reference (no threshold): made by neumo.ood.fit")
    s = np.asarray(scores, np.float64).ravel()
    return ~(s <= float(reference["threshold"]))  # NaN scores are flagged too
