"""A model that holds up at a new site: the shift suite stored with each variant, the shift-aware
selection score, the pooled-with-shifts threshold, temperature scaling, the "varied" acquisition."""

import csv
import json

import numpy as np
import pytest

from neumo import data as nd
from neumo import evaluation, parameters, shifts, stages, synthetic, training
from neumo.trial import TrialConfig


# --- numbers ------------------------------------------------------------------------------------

def test_shift_score_is_the_worst_balanced_accuracy_at_the_threshold():
    t = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    drifted = p + np.array([0.15, 0.15, 0.15, 0.15, 0, 0, 0, 0])  # healthy images drift up; one crosses 0.5
    out = evaluation.shift_score(t, p, 0.5, {"zoom": (t, drifted), "gamma": (t, p)})
    assert out["balanced_accuracy"][evaluation.AS_ACQUIRED] == 1.0
    assert out["worst_shift"] == "zoom" and out["shift_score"] == pytest.approx((1.0 + 0.75) / 2)
    # the AUC cannot see it: the ranking under the shift is still perfect
    assert evaluation.auc(t, drifted) == 1.0


def test_pooled_shifts_threshold_is_youden_on_the_pooled_images():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 2, 200)
    p = np.clip(t * 0.5 + rng.normal(0.25, 0.15, 200), 0, 1)
    st = np.concatenate([t, t])
    sp = np.clip(np.concatenate([p + 0.1, p + 0.2]), 0, 1)
    pooled = evaluation.choose_threshold(t, p, "pooled_shifts", st, sp)
    assert pooled == evaluation.youden_threshold(np.concatenate([t, st]), np.concatenate([p, sp]))
    assert pooled > evaluation.choose_threshold(t, p, "youden")  # healthy images drift up: the threshold follows
    with pytest.raises(ValueError, match="shifted copies"):
        evaluation.choose_threshold(t, p, "pooled_shifts")


def test_temperature_scaling_recovers_the_temperature_and_lowers_the_calibration_error():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2.0, 20000)
    t = (rng.random(20000) < 1 / (1 + np.exp(-logits))).astype(int)
    overconfident = 1 / (1 + np.exp(-3.0 * logits))  # a model three times too sure of itself
    temperature = evaluation.fit_temperature(t, overconfident)
    assert temperature == pytest.approx(3.0, rel=0.05)
    calibrated = evaluation.apply_temperature(overconfident, temperature)
    assert evaluation.calibration(t, calibrated)["ece"] < evaluation.calibration(t, overconfident)["ece"] / 3
    assert evaluation.auc(t, calibrated) == pytest.approx(evaluation.auc(t, overconfident), abs=1e-6)  # same ranking
    assert evaluation.fit_temperature([1, 1], [0.2, 0.9]) == 1.0  # one class: left alone


def test_split_rows_have_the_evaluation_csv_columns():
    from neumo import results

    rng = np.random.default_rng(2)
    t = {f: rng.integers(0, 2, 30) for f in ("test", "val", "valid")}
    p = {f: rng.random(30) for f in t}
    rows, roc = evaluation.split_rows(t, p, 0.4, resamples=20, base={"run_id": "r", "trial": "ensemble"},
                                      policy="youden", temperature=2.0)
    assert [r["split"] for r in rows] == ["test", "val", "test+val", "valid"] and set(roc) == {r["split"] for r in rows}
    assert all(set(r) == set(results.EVAL_COLUMNS) for r in rows)
    assert rows[0]["ece_calibrated"] != rows[0]["ece"] and rows[0]["trial"] == "ensemble"


# --- images -------------------------------------------------------------------------------------

def test_varied_acquisitions_are_reproducible_and_change_the_framing():
    image = np.tile(np.linspace(40, 220, 120, dtype=np.uint8), (100, 1))
    first = [shifts.acquisition(image, shifts.acquisition_rng("x", k), "varied") for k in range(1, 13)]
    again = [shifts.acquisition(image, shifts.acquisition_rng("x", k), "varied") for k in range(1, 13)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    aspects = {round(a.shape[1] / a.shape[0], 2) for a in first}
    assert len(aspects) > 6  # the aspect ratio varies
    assert any(a.shape[0] > 100 or a.shape[1] > 120 for a in first)  # wider views too, not only tighter
    with pytest.raises(ValueError, match="acquisition"):
        shifts.acquisition(image, shifts.acquisition_rng("x", 1), "sideways")


def test_a_wider_view_pads_with_the_border_grey():
    image = np.full((50, 40), 30, np.uint8)
    image[10:40, 10:30] = 200
    wide = shifts.view(image, 1.2, 1.2)
    assert wide.shape == (60, 48) and wide[0, 0] == 30 and wide[30, 24] == 200
    narrow = shifts.SHIFTS["aspect 0.8"](image)
    assert narrow.shape == (50, 32)


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection")
    synthetic.write_kaggle(str(root / "data"), {"train": (12, 12), "test": (3, 3)}, size=64, seed=4)
    synthetic.write_nih(str(root / "nih"), 6, size=64, seed=5)
    stages.ingest(dataset_uri=str(root / "data"), pretrain_uri=str(root / "nih"), out_dir=str(root / "m"))
    info = stages.preprocess(manifest_dir=str(root / "m"), variant={"pixels": 64, "mask": False},
                             out_dir=str(root / "p"), workers=1, acquisition_copies=1, acquisition="varied")
    stages.pretrain(variant_dir=str(root / "p"), out_dir=str(root / "b"), depth=2, filters=4, pretrain_epochs=1)
    return root, info


def test_the_variant_stores_the_valid_fold_under_every_shift(variant):
    root, info = variant
    valid, shifted = nd.load_fold(str(root / "p"), "valid"), nd.load_fold(str(root / "p"), "shifted")
    assert info["acquisition"] == "varied" and info["shifts"] == list(shifts.SHIFTS)
    assert len(shifted) == len(valid) * len(shifts.SHIFTS) == info["shifted_images"]
    by = training.by_shift(shifted)
    assert list(by) == list(shifts.SHIFTS)
    for name, fold in by.items():
        assert [shifts.shift_of(i) for i in fold.ids] == [name] * len(valid)
        assert [str(i).split(shifts.SHIFT_MARK)[0] for i in fold.ids] == list(valid.ids)
        assert np.array_equal(fold.targets, valid.targets)
    assert not np.array_equal(by["zoom 0.85"].images, valid.images)


def test_a_manifest_cannot_name_a_derived_fold(variant, tmp_path):
    from neumo.preprocess import PreprocessConfig, prepare_variant

    root, _ = variant
    rows = stages.load_manifest(str(root / "m"))[:2]
    with pytest.raises(ValueError, match="shifted"):
        prepare_variant([{**r, "fold": "shifted"} for r in rows], PreprocessConfig(pixels=64, workers=1), str(tmp_path))


def test_shift_selection_picks_the_epoch_and_records_the_score(variant, tmp_path):
    root, _ = variant
    cfg = TrialConfig(64, False, 2, 0, 3e-3, "bce", "none", True)
    settings = training.TrainSettings(epochs=2, seed=0, selection="shift", threshold_policy="pooled_shifts")
    result = training.train_trial(cfg, settings, str(root / "p"), str(root / "b" / "autoencoder.keras"), str(tmp_path))
    with open(tmp_path / "history.csv") as fh:
        history = list(csv.DictReader(fh))
    scores = [float(r["val_shift_score"]) for r in history]
    assert result.best_epoch == int(np.argmax(scores)) + 1
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["selection"] == "shift" and meta["score"] == meta["shift_score"] == result.shift_score
    assert meta["worst_shift"] in (evaluation.AS_ACQUIRED, *shifts.SHIFTS) and meta["temperature"] > 0
    assert set(meta["shift_balanced_accuracy"]) == {evaluation.AS_ACQUIRED, *shifts.SHIFTS}


def test_a_variant_without_shifted_copies_is_refused_with_what_to_do(variant, tmp_path):
    import shutil

    root, _ = variant
    old = tmp_path / "old"
    shutil.copytree(root / "p", old)
    info = json.loads((old / "variant.json").read_text())
    info["shards"]["shifted"] = []
    (old / "variant.json").write_text(json.dumps(info))
    cfg = TrialConfig(64, False, 2, 0, 3e-3, "bce", "none", False)
    with pytest.raises(ValueError, match="prepare it again, or set selection=auc"):
        training.train_trial(cfg, training.TrainSettings(epochs=1, selection="shift"), str(old),
                             str(root / "b" / "autoencoder.keras"), str(tmp_path / "t"))
    result = training.train_trial(cfg, training.TrainSettings(epochs=1, selection="auc"), str(old),
                                  str(root / "b" / "autoencoder.keras"), str(tmp_path / "t"))
    assert result.score == result.val_auc and result.worst_shift == ""


def test_the_seed_preset_selects_on_the_valid_auc():
    assert parameters.preset("seed")["selection"] == "auc" and parameters.default("selection") == "shift"


def test_each_epoch_reads_a_fixed_draw_of_the_shifted_copies(variant):
    root, _ = variant
    valid = nd.load_fold(str(root / "p"), "valid")
    shifted = training.by_shift(nd.load_fold(str(root / "p"), "shifted"))
    scorer = training.SelectionScore(valid, shifted, "youden", 8, per_shift=3)
    kept = [[str(i).split(shifts.SHIFT_MARK)[0] for i in f.ids] for f in scorer.shifted.values()]
    assert all(len(k) == 3 and k == kept[0] for k in kept) and set(kept[0]) <= set(valid.ids.tolist())
    assert len(scorer.valid) == len(valid)  # the valid fold as acquired is read whole


def test_the_levers_study_summarises_and_ranks_saved_runs(tmp_path):
    """benchmarks.levers recomputes its tables from the saved probabilities (no training)."""
    from benchmarks import levers

    rng = np.random.default_rng(3)
    targets = rng.integers(0, 2, 60)
    ids = np.array([f"x{i}" for i in range(60)])
    shifted_ids = np.array([shifts.shifted_id(i, n) for n in shifts.SHIFTS for i in ids])
    runs = tmp_path / "runs"
    runs.mkdir()
    for arm, drift in (("baseline", 0.3), ("varied+shift", 0.05)):
        for seed in (0, 1):
            p = np.clip(targets * 0.6 + rng.random(60) * 0.4, 0, 1)
            healthy_drift = np.tile(np.where(targets == 0, drift, 0.0), len(shifts.SHIFTS))
            np.savez(runs / f"{arm}-{seed}.npz", valid_probs=p, valid_targets=targets, valid_ids=ids,
                     shifted_probs=np.clip(np.tile(p, len(shifts.SHIFTS)) + healthy_drift, 0, 1),
                     shifted_targets=np.tile(targets, len(shifts.SHIFTS)), shifted_ids=shifted_ids,
                     val_probs=p[:4], val_targets=targets[:4], val_ids=ids[:4], threshold=0.5, seconds=60.0,
                     epochs=2, best_epoch=2)
    results = levers.summarise(tmp_path, ["baseline", "varied+shift"], [0, 1], bootstrap=20)
    base, varied = results["baseline"]["youden"], results["varied+shift"]["youden"]
    assert all(v["shift_score"] > b["shift_score"] for b, v in zip(base, varied))  # healthy images drift less
    assert "ensemble" in results["baseline"] and set(results["baseline"]) >= set(levers.POLICIES)
    table = levers.report(results, "pooled_shifts")
    assert "| baseline, seeds averaged | 2 |" in table
    assert levers.ranking(tmp_path, results)["pairs"] == 6
