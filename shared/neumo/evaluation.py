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


def choose_threshold(targets, probs, policy: str, shifted_targets=None, shifted_probs=None) -> float:
    """The decision threshold by `policy` (one of THRESHOLD_POLICIES), chosen on these images;
    "pooled_shifts" pools them with their acquisition-shifted copies (`shifted_*`, needed)."""
    if policy == "youden":
        return youden_threshold(targets, probs)
    if policy == "0.5":
        return 0.5
    if policy == "sensitivity_0.95":
        return sensitivity_threshold(targets, probs)
    if policy == "pooled_shifts":
        if shifted_probs is None or len(shifted_probs) == 0:
            raise ValueError("threshold_policy pooled_shifts needs the valid fold's shifted copies (the variant's "
                             "'shifted' fold): prepare the variant again with this neumo")
        return youden_threshold(np.concatenate([np.asarray(targets).ravel(), np.asarray(shifted_targets).ravel()]),
                                np.concatenate([np.asarray(probs).ravel(), np.asarray(shifted_probs).ravel()]))
    raise ValueError(f"threshold_policy must be one of {THRESHOLD_POLICIES}, got {policy!r}")


def balanced_accuracy(targets, probs, threshold: float) -> float:
    """(sensitivity + specificity) / 2 at `threshold`; the one defined when a class is absent."""
    t, p = _check(targets, probs)
    pred = p >= threshold
    rates = [float(np.mean(pred[t == 1])) if (t == 1).any() else None,
             float(np.mean(~pred[t == 0])) if (t == 0).any() else None]
    rates = [r for r in rates if r is not None]
    return float(np.mean(rates)) if rates else float("nan")


#: The name of the valid fold as acquired among the shift scores.
AS_ACQUIRED = "as acquired"


def shift_score(targets, probs, threshold: float, shifted: dict) -> dict:
    """The selection score that sees a new site: the WORST balanced accuracy at the stored
    threshold over the valid fold as acquired and under each acquisition shift (`shifted`: shift
    name -> (targets, probabilities) of the shifted copies). A model whose healthy images drift
    above its threshold when the scanner changes scores low, however high its valid AUC (which a
    shift barely moves: README Science). Returns {"shift_score", "worst_shift", "balanced_accuracy":
    {name: value}}."""
    scores = {AS_ACQUIRED: balanced_accuracy(targets, probs, threshold)}
    for name, (t, p) in shifted.items():
        scores[name] = balanced_accuracy(t, p, threshold)
    finite = {k: v for k, v in scores.items() if np.isfinite(v)}
    worst = min(finite, key=finite.get) if finite else AS_ACQUIRED
    return {"shift_score": float(finite.get(worst, float("nan"))), "worst_shift": worst, "balanced_accuracy": scores}


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """Probabilities rescaled by temperature scaling: sigmoid(logit(p) / T) (T = 1: unchanged)."""
    return 1.0 / (1.0 + np.exp(-_logit(probs) / float(temperature)))


def fit_temperature(targets, probs) -> float:
    """The temperature T > 0 minimising the cross-entropy of sigmoid(logit(p) / T) on these images
    (Guo et al. 2017): a grid over log T, then golden-section refinement. It changes no ranking
    and no decision at 0.5; it makes the stated probabilities mean what they say. 1.0 with one class."""
    t, p = _check(targets, probs)
    if t.size == 0 or t.min() == t.max():
        return 1.0
    z = _logit(p)

    def nll(log_t: float) -> float:
        q = np.clip(1.0 / (1.0 + np.exp(-z / np.exp(log_t))), 1e-12, 1 - 1e-12)
        return float(-np.mean(t * np.log(q) + (1 - t) * np.log1p(-q)))

    grid = np.linspace(-3.0, 3.0, 61)
    best = float(grid[int(np.argmin([nll(g) for g in grid]))])
    lo, hi = best - 0.1, best + 0.1
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


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


# --- the evaluation CSV's rows -------------------------------------------------------------------

#: The splits an evaluation reports: the seed's (test, val, test+val) and our patient-level valid fold.
EVAL_SPLITS = ("test", "val", "test+val", "valid")
EVAL_METRICS = ("accuracy", "auc", "sensitivity", "specificity", "precision", "f1")
#: The threshold metrics also given at 0.5, as the seed's `model.evaluate` scored (p > 0.5 positive).
HALF_METRICS = ("accuracy", "sensitivity", "specificity")


def splits_present(counts: dict[str, int]) -> list[str]:
    """The EVAL_SPLITS to evaluate given each fold's image count: a split with images; a pooled
    split ("test+val") only when every part has images (else it would silently repeat the other)."""
    return [s for s in EVAL_SPLITS if all(counts.get(part, 0) > 0 for part in s.split("+"))]


def split_rows(targets: dict, probs: dict, threshold: float, *, resamples: int, base: dict, policy: str,
               own_loss=None, loss_function: str = "bce", temperature: float = 1.0) -> tuple[list[dict], dict]:
    """The evaluation CSV's rows of one model (a trial or an ensemble) on each split present
    (`targets`/`probs`: fold -> arrays for test, val, valid), and their ROC points. `base`: the
    columns that say which model (run_id, round, trial, model_uri, finished_at); `resamples`: the
    bootstrap's, for the 95% intervals; `own_loss(t, p)`:
    the model's own loss (plain cross-entropy when None); `temperature`: the calibration fitted on
    the valid fold, whose expected calibration error is reported beside the raw one."""
    rows, roc = [], {}
    for split in splits_present({f: len(t) for f, t in targets.items()}):
        parts = split.split("+")
        t = np.concatenate([np.asarray(targets[p]) for p in parts]).astype(int)
        p = np.concatenate([np.asarray(probs[p]) for p in parts])
        m = metrics(t, p, threshold)
        ci = bootstrap(t, p, threshold, n=resamples)
        at_half = metrics(t, p, KERAS_THRESHOLD)  # model.evaluate's view: p > 0.5
        rows.append({
            **{k: base.get(k, "") for k in ("run_id", "round", "trial", "model_uri")}, "split": split, "n": m["n"],
            "loss": own_loss(t, p) if own_loss else m["loss"], "loss_function": loss_function, "bce": m["loss"],
            **{k: m[k] for k in (*EVAL_METRICS, "tn", "fp", "fn", "tp", "threshold")},
            "threshold_policy": policy,
            **{f"{k}_{side}": ci[k][j] for k in EVAL_METRICS for j, side in enumerate(("low", "high"))},
            **{f"{k}_at_0.5": at_half[k] for k in HALF_METRICS},
            "ece": calibration(t, p)["ece"], "temperature": float(temperature),
            "ece_calibrated": calibration(t, apply_temperature(p, temperature))["ece"],
            "finished_at": base.get("finished_at", ""),
        })
        fpr, tpr, th = roc_curve(t, p)
        roc[split] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": th.tolist()}
    return rows, roc
