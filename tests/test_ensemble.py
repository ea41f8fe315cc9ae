"""Ensembles of model bundles (neumo.ensemble): combine averages the members' evaluate predictions and
chooses the threshold again on the average, `neumo predict` with the ensemble bundle averages the
members' predictions on new files, publishing copies it whole, and bad members are refused in one
line. Members are untrained tiny classifiers (as tests/test_bundle.py's) with made-up evaluate
predictions: the arithmetic, not the models, is under test."""

import json
import logging
import shutil

import numpy as np
import pytest

from neumo import bundle, cli, ensemble, evaluation, predict, results, storage, synthetic

VALID = [f"train/{label}/p{k}.jpeg" for k in range(8) for label in ("NORMAL", "PNEUMONIA")]
TEST = [f"test/{label}/t{k}.jpeg" for k in range(5) for label in ("NORMAL", "PNEUMONIA")]
SHIFT_NAMES = ("blur", "noise")


def _target(image_id: str) -> int:
    return int("/PNEUMONIA/" in image_id)


def _predictions(seed: int, valid=VALID, threshold: float = 0.4) -> list[dict]:
    """Made-up evaluate predictions.csv rows (test, valid and its shifted copies) that rank the
    classes fairly well."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, ids in (("test", TEST), ("valid", valid),
                       ("shifted", [f"{i}~shift:{n}" for n in SHIFT_NAMES for i in valid])):
        for i in ids:
            p = float(np.clip(0.3 + 0.35 * _target(i) + rng.normal(0, 0.2), 0.01, 0.99))
            rows.append({"id": i, "split": split, "target": _target(i), "probability": p, "predicted": int(p >= threshold)})
    return rows


def _member(folder, *, seed: int, pixels: int, tta: int, clahe_clip) -> dict:
    """A real single bundle around an untrained classifier (bundle.write, as evaluate calls it)."""
    import keras

    from neumo import models

    keras.utils.set_random_seed(seed)
    classifier = models.build_classifier(models.build_backbone(models.build_unet(pixels, 2, 4, "linear")), 2)
    model_dir = folder / "model"
    model_dir.mkdir(parents=True)
    classifier.save(str(model_dir / "model.keras"))
    (model_dir / "model.json").write_text(json.dumps({"config": {"pixels": pixels, "mask": False, "model": 2},
                                                      "threshold": 0.5, "threshold_policy": "youden",
                                                      "temperature": 1.25}))
    valid_images = np.random.default_rng(seed).integers(0, 255, (6, pixels, pixels), dtype=np.uint8)
    return bundle.write(str(folder / "bundle"), model_dir=str(model_dir), classifier=classifier,
                        variant={"pixels": pixels, "mask": False, "clahe_clip": clahe_clip, "data_version": "d0"},
                        train_row={"run_id": "r0", "round": 0, "trial": seed, "score": 0.5 + seed / 100},
                        eval_rows=[], predictions=_predictions(seed), valid_images=valid_images, tta_copies=tta,
                        threshold=0.4)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two members that prepare images differently (32 px plain, 48 px with CLAHE clip 2 and one
    TTA copy), a bundle evaluated on other valid images, and a version-1 bundle (no predictions.csv)."""
    root = tmp_path_factory.mktemp("members")
    a = _member(root / "a", seed=1, pixels=32, tta=0, clahe_clip=None)
    _member(root / "b", seed=2, pixels=48, tta=1, clahe_clip=2.0)
    other = root / "other"
    bundle._write_files(str(other), {bundle.PREDICTIONS: bundle.predictions_csv(_predictions(3, VALID[:-2]))},
                        {k: v for k, v in a.items() if k != "files"})
    old = root / "v1"
    shutil.copytree(root / "a" / "bundle", old)
    (old / bundle.PREDICTIONS).unlink()
    info = {k: v for k, v in a.items() if k not in ("kind", "calibration", "predictions")}
    info["files"] = {k: v for k, v in a["files"].items() if k != bundle.PREDICTIONS}
    (old / bundle.INFO).write_text(json.dumps({**info, "version": 1}))
    return {"a": str(root / "a" / "bundle"), "b": str(root / "b" / "bundle"), "other": str(other), "v1": str(old)}


def test_a_single_bundle_carries_its_predictions_and_calibration(members):
    info = bundle.read_info(members["a"])
    assert (info["version"], info["kind"], info["decision"]["threshold"]) == (2, "single", 0.4)
    assert info["calibration"] == {"temperature": 1.25, "fitted_on": "valid fold"}
    rows = bundle.read_predictions(members["a"])
    assert {r["split"] for r in rows} == {"test", "valid", "shifted"} and len(rows) == len(_predictions(1))
    card = storage.read_text(storage.join(members["a"], bundle.CARD_MD))
    assert "| shifted |" not in card  # the shifted copies are no dataset split


def test_combine_averages_the_members_and_chooses_the_threshold_on_the_average(members, tmp_path):
    out = str(tmp_path / "ens")
    made = ensemble.combine([members["a"], members["b"]], out, policy="pooled_shifts", selection="shift", resamples=5,
                            base={"run_id": "r9"})
    mine = {s: {r["id"]: r for r in bundle.read_predictions(out) if r["split"] == s} for s in ("valid", "shifted")}
    theirs = [{(r["split"], r["id"]): r["probability"] for r in bundle.read_predictions(m)}
              for m in (members["a"], members["b"])]
    for split, rows in mine.items():
        assert len(rows) == len(VALID) * (1 if split == "valid" else len(SHIFT_NAMES))
        for i, r in rows.items():
            assert r["probability"] == pytest.approx(np.mean([t[(split, i)] for t in theirs]), abs=1e-12)
    valid_t = [mine["valid"][i]["target"] for i in VALID]
    valid_p = [mine["valid"][i]["probability"] for i in VALID]
    shifted = list(mine["shifted"].values())
    expected = evaluation.choose_threshold(valid_t, valid_p, "pooled_shifts", [r["target"] for r in shifted],
                                           [r["probability"] for r in shifted])
    assert made["threshold"] == pytest.approx(expected)
    assert all(r["predicted"] == int(r["probability"] >= expected) for rows in mine.values() for r in rows.values())
    assert [r["split"] for r in made["eval_rows"]] == ["test", "valid"]
    assert all(set(r) == set(results.EVAL_COLUMNS) for r in made["eval_rows"])
    assert {(r["trial"], r["model_uri"], r["run_id"]) for r in made["eval_rows"]} == {("ensemble", out, "r9")}
    info = bundle.read_info(out)
    assert (info["kind"], info["members"], info["version"]) == ("ensemble", ["members/00", "members/01"], 2)
    assert info["decision"]["policy"] == "pooled_shifts" and info["decision"]["threshold"] == made["threshold"]
    assert info["calibration"]["temperature"] == pytest.approx(evaluation.fit_temperature(valid_t, valid_p))
    assert info["trial"]["score"] == made["score"] == made["shift_score"]
    assert bundle._score(info) == made["score"]
    assert set(info["files"]) == {bundle.PREDICTIONS, bundle.RELIABILITY, bundle.CARD_MD, bundle.CARD_HTML}
    card = (tmp_path / "ens" / bundle.CARD_MD).read_text()
    assert "## Members" in card and "| shifted |" not in card


def test_predict_with_an_ensemble_averages_what_each_member_predicts(members, tmp_path):
    out = str(tmp_path / "ens")
    made = ensemble.combine([members["a"], members["b"]], out, policy="youden", selection="auc", resamples=5)
    synthetic.write_nih(str(tmp_path / "incoming"), 3, size=64, seed=2)
    (tmp_path / "incoming" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    scored = {}
    for name, uri in (("ens", out), ("a", members["a"]), ("b", members["b"])):
        summary = predict.run(uri, [str(tmp_path / "incoming")], str(tmp_path / f"out-{name}"))
        assert (summary["predicted"], summary["rejected"]) == (3, 1)
        scored[name] = predict.read_csv(str(tmp_path / f"out-{name}" / predict.CSV))
    assert [r["file"] for r in scored["ens"]] == [r["file"] for r in scored["a"]] == [r["file"] for r in scored["b"]]
    assert any(abs(a["probability"] - b["probability"]) > 1e-3 for a, b in zip(scored["a"], scored["b"]) if a["probability"])
    for e, a, b in zip(scored["ens"], scored["a"], scored["b"]):
        if e["status"] != "predicted":
            assert e["probability"] is None and e["reason"] == a["reason"]
            continue
        assert abs(e["probability"] - (a["probability"] + b["probability"]) / 2) < 1e-5
        called = "PNEUMONIA" if e["probability"] >= made["threshold"] else "NORMAL"
        assert e["decision"] == (predict.NO_CALL if e["warning"] else called)
        assert (e["ood_score"], e["warning"]) == (a["ood_score"], a["warning"])  # the first member's check
        assert (tmp_path / "out-ens" / e["gradcam"]).stat().st_size > 500
    assert "an ensemble of 2 models" in (tmp_path / "out-ens" / predict.PAGE).read_text()


def test_publishing_copies_an_ensemble_whole_and_it_loads(members, tmp_path):
    out = str(tmp_path / "ens")
    ensemble.combine([members["a"], members["b"]], out, policy="youden", selection="shift", resamples=5)
    published = bundle.publish(out, str(tmp_path / "results"), "r9")
    loaded = bundle.load(published["best"])
    assert isinstance(loaded, bundle.Ensemble) and [m.pixels for m in loaded.members] == [32, 48]
    assert [m.tta_copies for m in loaded.members] == [0, 1]
    assert loaded.threshold == bundle.read_info(out)["decision"]["threshold"]
    member = tmp_path / "results" / "models" / "best" / "members" / "01"
    shutil.copy(tmp_path / "results" / "models" / "best" / "members" / "00" / bundle.INFO, member / bundle.INFO)
    with pytest.raises(ValueError, match="members/01/bundle.json: another sha256 than the ensemble's"):
        bundle.load(published["best"])


@pytest.mark.parametrize("which,match", [
    (["a"], "an ensemble needs at least 2 member bundles, got 1: {a}"),
    (["a", "v1"], "{v1}: the bundle has no predictions.csv"),
    (["a", "other"], "{other}: its valid fold holds other images than {a}'s"),
    (["a", "missing"], "{missing} is not a neumo model bundle: no bundle.json"),
    (["a", "ens"], "{ens}: a member bundle cannot be (inside) the ensemble's output"),
])
def test_bad_members_are_refused_in_one_line_naming_them(members, tmp_path, which, match):
    uris = {**members, "missing": str(tmp_path / "missing"), "ens": str(tmp_path / "ens")}
    with pytest.raises(ValueError) as raised:
        ensemble.combine([uris[w] for w in which], str(tmp_path / "ens"), policy="youden", selection="shift",
                         resamples=5)
    assert match.format(**uris) in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "ens").exists()  # nothing written


def test_a_version_1_bundle_still_loads(members):
    loaded = bundle.load(members["v1"])
    assert loaded.info["version"] == 1 and bundle.kind(loaded.info) == "single" and loaded.threshold == 0.4


def test_the_ensemble_command(members, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="neumo")
    out = str(tmp_path / "ens")
    assert cli.main(["ensemble", "--out", out, "--policy", "youden", "--selection", "auc", "--bootstrap", "5",
                     members["a"], members["b"]]) == 0
    info = bundle.read_info(out)
    assert info["kind"] == "ensemble" and info["trial"]["selection"] == "auc"
    assert any("ensemble of 2: valid AUC" in r.getMessage() and out in r.getMessage() for r in caplog.records)
    caplog.clear()
    assert cli.main(["ensemble", "--out", str(tmp_path / "bad"), members["a"], members["v1"]]) == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert f"{members['v1']}: the bundle has no predictions.csv" in line and "\n" not in line
