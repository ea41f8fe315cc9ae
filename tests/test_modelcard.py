"""Calibration (evaluation.calibration, figures.reliability_*) on known cases, and the model card
(neumo.modelcard): every required section, subgroup numbers checked by hand on a crafted
predictions list, and graceful output with pieces missing."""

import math

import cv2
import numpy as np
import pytest

from neumo import evaluation, figures, modelcard

SECTIONS = ("Intended use and not-intended use", "Training data", "Preprocessing", "Metrics on every split", "Threshold",
            "Subgroups", "Calibration", "Out-of-distribution check", "Known failure modes", "Grad-CAM")


# --- calibration -------------------------------------------------------------------------------

def test_perfectly_calibrated_bins_give_zero_ece():
    probs = [0.25] * 4 + [0.75] * 4
    targets = [1, 0, 0, 0] + [1, 1, 1, 0]
    cal = evaluation.calibration(targets, probs)
    assert cal["ece"] == pytest.approx(0.0, abs=1e-12) and cal["max_gap"] == pytest.approx(0.0, abs=1e-12)
    counts = [b["count"] for b in cal["bins"]]
    assert counts == [0, 0, 4, 0, 0, 0, 0, 4, 0, 0] and cal["n"] == 8
    assert math.isnan(cal["bins"][0]["accuracy"]) and cal["bins"][2]["accuracy"] == 0.25


def test_calibrated_draws_have_small_ece():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    assert evaluation.calibration(rng.random(20000) < p, p)["ece"] < 0.02


@pytest.mark.parametrize("probs, targets, ece", [
    ([0.9] * 10, [1] * 5 + [0] * 5, 0.4),             # overconfident: says 0.9, half have pneumonia
    ([0.3] * 4, [1] * 4, 0.7),                        # underconfident
    ([0.05, 0.05, 0.95, 0.95], [1, 1, 0, 0], 0.95),   # inverted
])
def test_miscalibrated_cases(probs, targets, ece):
    assert evaluation.calibration(targets, probs)["ece"] == pytest.approx(ece)


def test_bin_edges_and_empty_input():
    cal = evaluation.calibration([0, 1, 1, 0], [0.0, 0.1, 1.0, 0.0999], bins=10)
    assert [b["count"] for b in cal["bins"]] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]  # [low, high), the last closed
    empty = evaluation.calibration([], [])
    assert empty["n"] == 0 and math.isnan(empty["ece"]) and sum(b["count"] for b in empty["bins"]) == 0


@pytest.mark.parametrize("targets, probs, bins, message", [
    ([0, 1], [0.2, 1.2], 10, "0..1"), ([0, 1], [0.2, float("nan")], 10, "0..1"),
    ([0, 1], [0.2, 0.3], 0, "bins"), ([0, 1], [0.2], 10, "differ in length"), ([0, 2], [0.1, 0.2], 10, "0 or 1"),
])
def test_calibration_ill_inputs_raise(targets, probs, bins, message):
    with pytest.raises(ValueError, match=message):
        evaluation.calibration(targets, probs, bins)


def test_reliability_figure_names_each_split_with_its_ece(tmp_path):
    cals = {"test": evaluation.calibration([1] * 5 + [0] * 5, [0.9] * 10),
            "valid": evaluation.calibration([1, 0, 0, 0], [0.25] * 4)}
    fig = figures.reliability_figure(cals)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["perfect calibration", "test: ECE 0.400 (n=10)", "valid: ECE 0.000 (n=4)"]
    assert fig.axes[0].get_title() == "Reliability diagram"
    figures.reliability_png(cals, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figures.reliability_figure({}).axes[0].get_title().startswith("Reliability: no split")


# --- the model card ----------------------------------------------------------------------------

def _pred(split, folder, name, target, p, threshold=0.5):
    return {"id": f"{folder}/{'PNEUMONIA' if target else 'NORMAL'}/{name}", "split": split, "target": str(target),
            "probability": str(p), "predicted": str(int(p >= threshold))}


@pytest.fixture()
def crafted():
    """valid: 4 bacterial (3 called), 2 viral (1 called), 4 NORMAL (1 false call); val: 1 + 1 + 2.
    Image sizes: three bands of short sides (400, 800, 1600), 6 / 4 / 6 images."""
    preds = [_pred("valid", "train", f"person{i}_bacteria_{i}.jpeg", 1, p) for i, p in enumerate((0.9, 0.8, 0.7, 0.2))]
    preds += [_pred("valid", "train", f"person{10 + i}_virus_{i}.jpeg", 1, p) for i, p in enumerate((0.6, 0.3))]
    preds += [_pred("valid", "train", f"IM-00{20 + i}-0001.jpeg", 0, p) for i, p in enumerate((0.1, 0.2, 0.4, 0.7))]
    preds += [_pred("val", "val", "person30_bacteria_1.jpeg", 1, 0.9), _pred("val", "val", "person31_virus_1.jpeg", 1, 0.1),
              _pred("val", "val", "NORMAL2-IM-0040-0001.jpeg", 0, 0.2), _pred("val", "val", "NORMAL2-IM-0041-0001.jpeg", 0, 0.3)]
    sides = [400] * 6 + [800] * 4 + [1600] * 6
    manifest = [{"id": p["id"], "width": s + 100, "height": s, "fold": p["split"], "label": p["id"].split("/")[1],
                 "patient_id": p["id"].split("/")[2][:8]} for p, s in zip(preds, sides)]
    manifest.append({"id": "train/NORMAL/IM-0099-0001.jpeg", "width": 500, "height": 400, "fold": "train",
                     "label": "NORMAL", "patient_id": "IM-0099"})
    evaluation_ = {"train": {"status": "ok"}, "eval": [
        {"split": "valid", "n": 10, "auc": 0.8, "auc_low": 0.5, "auc_high": 1.0, "accuracy": 0.7, "accuracy_low": 0.4,
         "accuracy_high": 0.9, "sensitivity": 0.667, "specificity": 0.75, "threshold": 0.5, "tn": 3, "fp": 1, "fn": 2, "tp": 4},
        {"split": "val", "n": 4, "auc": 0.75, "accuracy": 0.75, "sensitivity": 0.5, "specificity": 1.0, "threshold": 0.5,
         "tn": 2, "fp": 0, "fn": 1, "tp": 1}]}
    info = {"config": {"pixels": 64, "mask": False, "model": 1, "frozen_layers": 0, "learning_rate": 0.001, "loss": "bce",
                       "augmentation": "light", "class_weight": True},
            "threshold": 0.5, "threshold_policy": "youden on the valid fold", "data_version": "dv123",
            "git_revision": "abc1234", "preprocessing": {"pixels": 64, "mask": False, "clahe_clip": None},
            "created_at": "2026-12-01T00:00:00Z"}
    return {"info": info, "evaluation": evaluation_, "predictions": preds, "manifest": manifest}


def test_wilson_interval_known_values():
    assert modelcard.wilson(3, 4) == pytest.approx((0.3006, 0.9544), abs=1e-4)
    assert modelcard.wilson(0, 10)[0] == 0.0 and modelcard.wilson(10, 10)[1] == 1.0
    assert all(math.isnan(v) for v in modelcard.wilson(0, 0))


def test_card_has_every_section_and_the_bundle_facts(crafted):
    md = modelcard.markdown(**crafted, gradcam="gradcam.png")
    for title in SECTIONS:
        assert f"\n## {title}\n" in md
    assert md.startswith("# Model card")
    for fact in ("dv123", "abc1234", "2026-12-01T00:00:00Z", "youden on the valid fold", "Threshold 0.500",
                 "resize to 64x64", "clip limit OpenCV's default 40", "screening aid", "Not intended use", "Adults",
                 "README: Science", "![Grad-CAM sheet](gradcam.png)", "| valid | 10 | 0.800 (0.500-1.000) | 0.700 (0.400-0.900) |"):
        assert fact in md, fact


def test_subtype_sensitivity_is_computed_per_split(crafted):
    sub = {(s["split"], s["subtype"]): s for s in modelcard.subtypes(crafted["predictions"], 0.5)}
    assert (sub["valid", "bacterial"]["n"], sub["valid", "bacterial"]["detected"]) == (4, 3)
    assert (sub["valid", "viral"]["n"], sub["valid", "viral"]["detected"]) == (2, 1)
    assert (sub["val", "bacterial"]["detected"], sub["val", "viral"]["detected"]) == (1, 0)
    assert (sub["valid", "bacterial"]["low"], sub["valid", "bacterial"]["high"]) == pytest.approx(modelcard.wilson(3, 4))
    md = modelcard.markdown(**crafted)
    assert "| valid | bacterial | 4 | 3 | 0.750 (0.301-0.954) |" in md
    assert "| valid | viral | 2 | 1 | 0.500 (0.095-0.905) |" in md


def test_size_bands_from_the_manifest(crafted):
    bands = modelcard.size_bands(crafted["predictions"], crafted["manifest"], 0.5)
    rows = {(b["split"], b["band"]): b for b in bands["rows"]}
    # valid: the first 6 images short side 400 (small), the next 4 at 800 (medium); val at 1600 (large)
    assert (rows["valid", "small"]["n"], rows["valid", "medium"]["n"], rows["val", "large"]["n"]) == (6, 4, 4)
    assert rows["valid", "small"]["range"] == "short side 400 px"
    small = rows["valid", "small"]  # 4 bacterial (3 called) + 2 viral (1 called): 6 pneumonia, 4 called
    assert (small["pneumonia"], small["normal"], small["sensitivity"]) == (6, 0, pytest.approx(4 / 6))
    assert math.isnan(small["specificity"]) and math.isnan(small["auc"])  # one class only: no error
    medium = rows["valid", "medium"]  # 4 NORMAL at 0.1, 0.2, 0.4, 0.7: one false call
    assert medium["specificity"] == pytest.approx(0.75)


def test_manifest_counts_and_patient_split(crafted):
    md = modelcard.markdown(**crafted)
    assert "| train | 1 | 0 | 0 | 1 | 1 |" in md
    assert "| valid | 4 | 6 | 0 | 10 | 10 |" in md
    assert "0 patient(s) appear in both train and valid" in md


def test_html_fragment_inlines_the_reliability_diagram_and_the_gradcam(crafted, tmp_path):
    ok, png = cv2.imencode(".png", np.full((8, 8), 200, np.uint8))
    sheet = tmp_path / "gradcam.png"
    sheet.write_bytes(png.tobytes())
    page = modelcard.html(**crafted, gradcam=str(sheet))
    assert page.startswith('<section class="model-card">') and page.rstrip().endswith("</section>")
    for title in SECTIONS:
        assert f">{title}</h3>" in page
    assert page.count("data:image/png;base64,") == 2  # reliability diagram + Grad-CAM
    linked = modelcard.html(**crafted, gradcam=str(tmp_path / "missing.png"))
    assert linked.count("data:image/png;base64,") == 1 and str(tmp_path / "missing.png") in linked


def test_card_with_an_ood_reference_says_its_threshold(crafted):
    ref = {"method": "mahalanobis-gap", "taps": [0, 1, 2], "features": 448, "n_fit": 1042, "fitted_on": "valid fold",
           "threshold": 23.456, "false_alarm_target": 0.05, "false_alarm_rate": 0.05}
    md = modelcard.markdown(**crafted, ood=ref)
    assert "above 23.46" in md and "1042 images of valid fold" in md and "95th percentile" in md
    assert "no out-of-distribution reference" not in md


def test_card_degrades_without_manifest_val_split_or_second_class(crafted):
    only_normal = [p for p in crafted["predictions"] if p["split"] == "valid" and p["target"] == "0"]
    md = modelcard.markdown(info={}, evaluation={"eval": []}, predictions=only_normal)
    for title in SECTIONS:
        assert f"\n## {title}\n" in md
    assert "No ingest manifest was given" in md and "valid: 4 NORMAL + 0 PNEUMONIA" in md
    assert "No size bands: no ingest manifest given" in md
    assert "No evaluated pneumonia image" in md
    assert "No split was evaluated" in md
    assert "no out-of-distribution reference" in md and "No Grad-CAM sheet" in md
    assert "| val |" not in md and "unknown" in md
    # one-class split with a manifest whose images are all one size
    manifest = [{**m, "width": 224, "height": 224} for m in crafted["manifest"]]
    md = modelcard.markdown(info=crafted["info"], evaluation=crafted["evaluation"], predictions=only_normal, manifest=manifest)
    assert "every evaluated image is 224x224 px in the manifest: no size bands" in md


def test_card_with_no_predictions_at_all_and_bad_rows():
    md = modelcard.markdown(info={"threshold": "not a number"}, evaluation={}, predictions=[
        {"id": "x", "split": "valid", "target": "", "probability": "0.3"}, {"id": "y", "split": "valid", "target": 1}])
    assert "No labelled prediction: calibration cannot be measured" in md and "Threshold n/a" in md
    assert modelcard.html(info={}, evaluation={}, predictions=[]).count("data:image/png") == 0
