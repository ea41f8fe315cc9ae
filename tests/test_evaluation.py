"""Metrics, the threshold rule and bootstrap intervals against hand-computed cases."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from neumo import evaluation


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 2, 300)
    p = np.round(rng.random(300) * 0.5 + t * 0.3, 2)  # many ties
    assert evaluation.auc(t, p) == pytest.approx(roc_auc_score(t, p), abs=1e-12)


def test_auc_undefined_with_one_class():
    assert np.isnan(evaluation.auc([1, 1, 1], [0.2, 0.3, 0.9]))


def test_metrics_on_a_known_confusion():
    t = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.7, 0.3, 0.8, 0.9, 0.4, 0.6, 0.95, 0.55])
    m = evaluation.metrics(t, p, 0.5)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (3, 1, 1, 5)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(5 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(5 / 6)


def test_youden_picks_the_expected_point_on_a_known_roc():
    # Scores: normals at 0.1..0.4, pneumonia at 0.35..0.9: J is maximal at threshold 0.5
    t = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.5, 0.6, 0.8, 0.9])
    assert evaluation.youden_threshold(t, p) == pytest.approx(0.5)
    fpr, tpr, th = evaluation.roc_curve(t, p)
    assert np.isfinite(th).all() and fpr[-1] == 1.0 and tpr[-1] == 1.0


def test_threshold_policies():
    t = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, *np.linspace(0.05, 0.95, 20)])
    assert evaluation.choose_threshold(t, p, "youden") == evaluation.youden_threshold(t, p)
    assert evaluation.choose_threshold(t, p, "0.5") == 0.5
    th = evaluation.choose_threshold(t, p, "sensitivity_0.95")
    sens = lambda x: np.mean(p[t == 1] >= x)  # noqa: E731
    assert sens(th) >= 0.95 and all(sens(x) < 0.95 for x in np.unique(p) if x > th)  # the highest that keeps 0.95
    assert th == pytest.approx(np.linspace(0.05, 0.95, 20)[1])  # 19 of 20 positives: the lowest one given up
    assert evaluation.choose_threshold([1, 1], [0.2, 0.9], "sensitivity_0.95") == 0.5
    assert set(evaluation.THRESHOLD_POLICIES) == {"youden", "0.5", "sensitivity_0.95", "pooled_shifts"}
    with pytest.raises(ValueError, match="threshold_policy must be one of"):
        evaluation.choose_threshold(t, p, "f1")
    assert evaluation.metrics([0, 1], [0.5, 0.5], evaluation.KERAS_THRESHOLD)["accuracy"] == 0.5  # p > 0.5, as Keras


def test_youden_without_both_classes_is_one_half():
    assert evaluation.youden_threshold([1, 1], [0.2, 0.9]) == 0.5


def test_bootstrap_intervals_contain_the_point_estimate():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 2, 200)
    p = np.clip(rng.normal(0.35 + 0.3 * t, 0.2), 0, 1)
    m = evaluation.metrics(t, p, 0.5)
    ci = evaluation.bootstrap(t, p, 0.5, n=300, seed=0)
    for key in ("accuracy", "auc", "sensitivity", "specificity", "precision", "f1"):
        lo, hi = ci[key]
        assert lo <= m[key] <= hi, key
        assert hi - lo < 0.3


@pytest.mark.parametrize("targets,probs", [([0, 1], [0.5]), ([0, 2], [0.1, 0.2])])
def test_bad_inputs_raise(targets, probs):
    with pytest.raises(ValueError):
        evaluation.metrics(targets, probs)


def test_mcnemar_counts_discordant_pairs():
    t = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0])
    a = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1])  # 8 right
    b = np.array([0, 0, 0, 1, 0, 0, 0, 0, 1, 0])  # 7 right
    r = evaluation.mcnemar(t, a, b)
    assert (r["only_a_right"], r["only_b_right"]) == (3, 2)
    assert r["p_value"] == pytest.approx(1.0)
    strong = evaluation.mcnemar(np.ones(30), np.ones(30), np.zeros(30))
    assert strong["p_value"] < 1e-6


def test_paired_bootstrap_auc_detects_a_better_model():
    rng = np.random.default_rng(2)
    t = rng.integers(0, 2, 300)
    good = np.clip(rng.normal(0.3 + 0.4 * t, 0.15), 0, 1)
    weak = np.clip(rng.normal(0.45 + 0.1 * t, 0.2), 0, 1)
    r = evaluation.paired_bootstrap_auc(t, good, weak, n=400)
    assert r["low"] <= r["difference"] <= r["high"] and r["low"] > 0 and r["p_value"] < 0.01
    same = evaluation.paired_bootstrap_auc(t, good, good, n=100)
    assert same["difference"] == 0 and same["p_value"] == 1.0
