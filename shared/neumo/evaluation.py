"""Classification metrics, the decision-threshold rules and bootstrap intervals (numpy only)."""

from __future__ import annotations

import numpy as np

from neumo import parameters

#: How a trial's threshold may be chosen on the valid fold (declared with the pipeline parameter).
THRESHOLD_POLICIES = parameters.BY_NAME["threshold_policy"].choices
#: The screening sensitivity the "sensitivity_0.95" policy keeps.
SCREENING_SENSITIVITY = 0.95
#: `model.evaluate`'s accuracy calls p > 0.5 positive; our rule is p >= threshold: the same calls.
KERAS_THRESHOLD = float(np.nextafter(0.5, 1.0))


def _check(targets: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(targets).astype(np.int64).ravel()
    p = np.asarray(probs, np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"targets and probabilities differ in length: {t.shape} vs {p.shape}")
    if t.size and not np.isin(t, (0, 1)).all():
        raise ValueError("targets must be 0 or 1")
    return t, p


def auc(targets, probs) -> float:
    """ROC AUC by the rank (Mann-Whitney) statistic, ties counted half; NaN with one class only."""
    t, p = _check(targets, probs)
    pos, neg = int(t.sum()), int(t.size - t.sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(p.size, np.float64)
    sorted_p = p[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[t == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def roc_curve(targets, probs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest threshold first (no `inf`)."""
    t, p = _check(targets, probs)
    thresholds = np.unique(p)[::-1]
    pos, neg = max(int(t.sum()), 1), max(int(t.size - t.sum()), 1)
    tpr = np.array([np.sum((p >= th) & (t == 1)) / pos for th in thresholds])
    fpr = np.array([np.sum((p >= th) & (t == 0)) / neg for th in thresholds])
    return fpr, tpr, thresholds


def youden_threshold(targets, probs) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1 (0.5 if undefined).

    Chosen on the validation fold only; among equal J the higher threshold wins (fewer false
    positives: specificity is where pneumonia models fail).
    """
    t, p = _check(targets, probs)
    if t.size == 0 or t.min() == t.max():
        return 0.5
    fpr, tpr, thresholds = roc_curve(t, p)
    j = tpr - fpr
    return float(thresholds[int(np.argmax(j))])


def sensitivity_threshold(targets, probs, sensitivity: float = SCREENING_SENSITIVITY) -> float:
    """The highest threshold whose sensitivity is at least `sensitivity` (0.5 if undefined): the
    fewest false alarms a screening aid can have while missing at most 1 - sensitivity."""
    t, p = _check(targets, probs)
    if t.size == 0 or t.min() == t.max():
        return 0.5
    _, tpr, thresholds = roc_curve(t, p)
    return float(thresholds[int(np.flatnonzero(tpr >= sensitivity - 1e-12)[0])])


def choose_threshold(targets, probs, policy: str) -> float:
    """The decision threshold by `policy` (one of THRESHOLD_POLICIES), chosen on these images."""
    if policy == "youden":
        return youden_threshold(targets, probs)
    if policy == "0.5":
        return 0.5
    if policy == "sensitivity_0.95":
        return sensitivity_threshold(targets, probs)
    raise ValueError(f"threshold_policy must be one of {THRESHOLD_POLICIES}, got {policy!r}")


def confusion(targets, probs, threshold: float) -> dict[str, int]:
    t, p = _check(targets, probs)
    pred = p >= threshold
    return {
        "tn": int(np.sum(~pred & (t == 0))), "fp": int(np.sum(pred & (t == 0))),
        "fn": int(np.sum(~pred & (t == 1))), "tp": int(np.sum(pred & (t == 1))),
    }


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def metrics(targets, probs, threshold: float = 0.5) -> dict:
    """loss (binary cross-entropy), accuracy, AUC, sensitivity, specificity, precision, F1, confusion."""
    t, p = _check(targets, probs)
    c = confusion(t, p, threshold)
    eps = 1e-7
    pc = np.clip(p, eps, 1 - eps)
    loss = float(-np.mean(t * np.log(pc) + (1 - t) * np.log(1 - pc))) if t.size else float("nan")
    precision = _ratio(c["tp"], c["tp"] + c["fp"])
    sensitivity = _ratio(c["tp"], c["tp"] + c["fn"])
    f1 = _ratio(2 * precision * sensitivity, precision + sensitivity) if not np.isnan(precision + sensitivity) else float("nan")
    return {
        "n": int(t.size), "loss": loss, "accuracy": _ratio(c["tp"] + c["tn"], t.size),
        "auc": auc(t, p), "sensitivity": sensitivity, "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
        "precision": precision, "f1": f1, "threshold": float(threshold), **c,
    }


def bootstrap(targets, probs, threshold: float, n: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals (resampling images) for every metric of `metrics`."""
    t, p = _check(targets, probs)
    rng = np.random.default_rng(seed)
    names = ("accuracy", "auc", "sensitivity", "specificity", "precision", "f1", "loss")
    draws = {k: [] for k in names}
    for _ in range(n if t.size else 0):
        idx = rng.integers(0, t.size, t.size)
        m = metrics(t[idx], p[idx], threshold)
        for k in names:
            draws[k].append(m[k])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for k, v in draws.items():
        v = np.asarray(v, np.float64)
        v = v[~np.isnan(v)]
        out[k] = (float(np.percentile(v, lo)), float(np.percentile(v, hi))) if v.size else (float("nan"), float("nan"))
    return out


def mcnemar(targets, pred_a, pred_b) -> dict:
    """McNemar's exact test on paired decisions: b = only A right, c = only B right; two-sided p."""
    from scipy.stats import binomtest

    t = np.asarray(targets).astype(int).ravel()
    a = np.asarray(pred_a).astype(int).ravel() == t
    b = np.asarray(pred_b).astype(int).ravel() == t
    if not (t.shape == a.shape == b.shape):
        raise ValueError("targets and both prediction sets must have the same length")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_a_right": only_a, "only_b_right": only_b, "p_value": float(p),
            "accuracy_a": float(a.mean()) if a.size else float("nan"),
            "accuracy_b": float(b.mean()) if b.size else float("nan")}


def paired_bootstrap_auc(targets, probs_a, probs_b, n: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """AUC(A) - AUC(B) with a paired percentile bootstrap interval (the same resampled images for
    both) and a two-sided bootstrap p-value for "no difference"."""
    t, pa = _check(targets, probs_a)
    _, pb = _check(targets, probs_b)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        idx = rng.integers(0, t.size, t.size)
        d = auc(t[idx], pa[idx]) - auc(t[idx], pb[idx])
        if not np.isnan(d):
            diffs.append(d)
    diffs = np.asarray(diffs)
    lo, hi = np.percentile(diffs, [(1 - level) / 2 * 100, (1 + level) / 2 * 100]) if diffs.size else (np.nan, np.nan)
    p = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0))) if diffs.size else float("nan")
    return {"auc_a": auc(t, pa), "auc_b": auc(t, pb), "difference": auc(t, pa) - auc(t, pb),
            "low": float(lo), "high": float(hi), "p_value": float(p)}


def calibration(targets, probs, bins: int = 10) -> dict:
    """Reliability of the probabilities: `bins` equal-width bins of the pneumonia probability (the
    last one closed at 1), each with its image count, mean probability ("confidence") and share
    of pneumonia ("accuracy", the observed frequency; NaN in an empty bin), and the expected
    calibration error ECE = sum over bins of count/n * |accuracy - confidence| (NaN with no image)."""
    t, p = _check(targets, probs)
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    if p.size and (np.isnan(p).any() or p.min() < 0 or p.max() > 1):
        raise ValueError("probabilities must be in 0..1 (no NaN)")
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        conf = float(p[inside].mean()) if count else float("nan")
        acc = float(t[inside].mean()) if count else float("nan")
        if count:
            ece += count / t.size * abs(acc - conf)
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count, "confidence": conf,
                     "accuracy": acc})
    gaps = [abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"]]
    return {"n": int(t.size), "bins": rows, "ece": float(ece) if t.size else float("nan"),
            "max_gap": float(max(gaps)) if gaps else float("nan")}
