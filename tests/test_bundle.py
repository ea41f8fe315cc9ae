"""Model bundles: what makes a folder a bundle (and the one-line refusals), copying one over another,
aggregate publishing the best to RESULTS_URI/models/best/ and each run's to models/RUN_ID/,
test-time augmentation when a bundle asks for it, and the predict pipeline run locally. (Training
one and predicting with it as evaluate did: tests/test_predict.py.)"""

import json
import subprocess
import sys

import numpy as np
import pytest

from neumo import bundle, predict, stages, storage, synthetic
from tests.conftest import REPO_ROOT


def _fake(folder, score, run_id="r1", extra=None) -> dict:
    """A bundle folder with stand-in files (no model inside: enough for reading, copying, publishing)."""
    info = {"format": bundle.FORMAT, "version": bundle.VERSION, "classifier": bundle.CLASSIFIER,
            "preprocessing": {"pixels": 64, "clahe_clip": None, "mask": False}, "mask_model": None,
            "decision": {"threshold": 0.4, "policy": "youden"}, "trial": {"run_id": run_id, "score": score}}
    files = {bundle.CLASSIFIER: f"model of {run_id}".encode(), bundle.CARD_HTML: f"<p>card of {run_id}</p>".encode(),
             **(extra or {})}
    bundle._write_files(str(folder), files, info)
    return info


@pytest.mark.parametrize("content,match", [
    (None, "is not a neumo model bundle: no bundle.json"),
    ("{not json", "bundle.json is not JSON"),
    ('{"format": "something-else", "version": 1}', "does not say format"),
    ('{"format": "neumo-model-bundle", "version": 99}', "bundle format version 99; this neumo reads up to 2"),
    ('{"format": "neumo-model-bundle", "version": 1}', "bundle.json lacks classifier"),
])
def test_a_folder_that_is_not_a_usable_bundle_is_refused_in_one_line(tmp_path, content, match):
    if content is not None:
        (tmp_path / bundle.INFO).write_text(content)
    with pytest.raises(ValueError, match=match) as raised:
        bundle.read_info(str(tmp_path))
    assert "\n" not in str(raised.value)


def test_copy_replaces_a_bundle_whole(tmp_path):
    _fake(tmp_path / "old", 0.8, "r0", extra={"lung_mask.keras": b"old mask"})
    _fake(tmp_path / "new", 0.9, "r1")
    bundle.copy(str(tmp_path / "old"), str(tmp_path / "dest"))
    info = bundle.copy(str(tmp_path / "new"), str(tmp_path / "dest"))
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == sorted([bundle.INFO, *info["files"]])
    assert bundle.read_info(str(tmp_path / "dest"))["trial"]["run_id"] == "r1"  # the stale mask model is gone


def _record(run_id, trial, score, figures_uri):
    row = {"run_id": run_id, "round": 0, "trial": trial, "status": "ok", "score": score, "model_uri": f"m{trial}",
           "pixels": 64, "mask": False, "model": 1, "frozen_layers": 0, "learning_rate": 0.001, "loss": "bce",
           "augmentation": "none", "class_weight": False}
    return json.dumps({"train": row, "eval": [], "figures_uri": figures_uri})


def test_aggregate_publishes_the_best_bundle_so_far(tmp_path, gcs_bucket):
    """This run's best trial's bundle goes to models/RUN_ID/; it replaces models/best/ only when
    its score is higher; the report carries the published best's model card."""
    for results in (str(tmp_path / "results"), f"gs://{gcs_bucket}/results"):
        evals = {}
        for run_id, trial, score in (("r1", 0, 0.7), ("r1", 1, 0.8), ("r2", 0, 0.9), ("r3", 0, 0.6)):
            evals[(run_id, trial)] = str(tmp_path / f"eval-{run_id}-{trial}-{results[:2]}")
            _fake(storage.join(evals[(run_id, trial)], bundle.FOLDER), score, run_id)
        summaries = {}
        for run_id in ("r1", "r2", "r3"):
            finished = [_record(r, t, s, evals[(r, t)]) for (r, t), s in
                        zip(evals, (0.7, 0.8, 0.9, 0.6)) if r == run_id]
            summaries[run_id] = stages.aggregate(history_in="", finished=finished, results_uri=results,
                                                 out_dir=str(tmp_path / f"agg-{run_id}-{results[:2]}"))
            published = bundle.read_info(storage.join(results, "models", run_id))
            assert published["trial"]["score"] == max(s for (r, _), s in zip(evals, (0.7, 0.8, 0.9, 0.6)) if r == run_id)
            best = bundle.read_info(storage.join(results, "models", "best"))
            assert best["trial"]["run_id"] == ("r1" if run_id == "r1" else "r2")  # r3's 0.6 does not replace r2's 0.9
            report = (tmp_path / f"agg-{run_id}-{results[:2]}" / "report.html").read_text()
            assert f"<p>card of {best['trial']['run_id']}</p>" in report
        assert summaries["r3"]["bundle_uri"] == storage.join(results, "models", "best")


def test_test_time_augmentation_averages_the_shifted_copies():
    import keras

    from neumo import models, training
    from neumo.data import Fold

    keras.utils.set_random_seed(0)
    classifier = models.build_classifier(models.build_backbone(models.build_unet(32, 2, 4, "linear")), 2)
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    loaded = bundle.Bundle(uri="x", info={"test_time_augmentation": {"copies": 0}}, classifier=classifier)
    plain = predict.probabilities(loaded, images)
    assert np.allclose(plain, training.predict(classifier, Fold(images, np.zeros(3, np.int8), np.arange(3))))
    loaded.info["test_time_augmentation"]["copies"] = 2
    views = predict.tta_views(images, 2)
    assert len(views) == 2 and views[0].shape == images.shape and not np.array_equal(views[0], images)
    expected = np.mean([predict.probabilities(bundle.Bundle("x", {}, classifier), v) for v in (images, *views)], axis=0)
    assert np.allclose(predict.probabilities(loaded, images), expected, atol=1e-6)
    with pytest.raises(ValueError, match="copies must be in 0..8"):
        predict.tta_views(images, 9)


def _untrained_bundle(folder) -> dict:
    """A real bundle around an untrained 32 px classifier (bundle.write, as evaluate calls it)."""
    import keras

    from neumo import models

    keras.utils.set_random_seed(0)
    classifier = models.build_classifier(models.build_backbone(models.build_unet(32, 2, 4, "linear")), 2)
    model_dir = folder / "model"
    model_dir.mkdir(parents=True)
    classifier.save(str(model_dir / "model.keras"))
    (model_dir / "model.json").write_text(json.dumps({"config": {"pixels": 32, "mask": False}, "threshold": 0.5,
                                                      "threshold_policy": "0.5"}))
    valid = np.random.default_rng(1).integers(0, 255, (6, 32, 32), dtype=np.uint8)
    return bundle.write(str(folder / "bundle"), model_dir=str(model_dir), classifier=classifier,
                        variant={"pixels": 32, "mask": False, "clahe_clip": None, "data_version": "d0"},
                        train_row={"run_id": "r0", "round": 0, "trial": 0, "score": 0.5}, eval_rows=[], predictions=[],
                        valid_images=valid)


def test_the_predict_pipeline_runs_locally_and_gathers_what_neumo_predict_gives(tmp_path):
    """Listing, two scoring tasks (the loop, one at a time), gather: the same rows as `neumo predict`."""
    info = _untrained_bundle(tmp_path)
    assert info["decision"] == {"threshold": 0.5, "policy": "0.5", "positive": "PNEUMONIA", "negative": "NORMAL",
                                "chosen_on": "valid fold"}
    synthetic.write_nih(str(tmp_path / "incoming"), 4, size=48, seed=2)
    (tmp_path / "incoming" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    expected = stages.predict(bundle_uri=str(tmp_path / "bundle"), inputs=[str(tmp_path / "incoming")],
                              out_dir=str(tmp_path / "direct"))
    assert (expected["predicted"], expected["rejected"]) == (4, 1)
    done = subprocess.run([sys.executable, str(REPO_ROOT / "pipelines" / "predict.py"), "--local", "--workdir",
                           str(tmp_path / "run"), "--set", f"bundle_uri={tmp_path / 'bundle'}", "--set",
                           f"images_uri={tmp_path / 'incoming'}", "--set", f"predictions_uri={tmp_path / 'scores'}",
                           "--set", "shards=2", "--parallelism", "1"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "predict[1] started" in done.stdout and "predict-gather finished" in done.stdout, done.stdout
    (gathered,) = (tmp_path / "scores").glob(f"*/{predict.CSV}")
    rows, direct = predict.read_csv(str(gathered)), predict.read_csv(str(tmp_path / "direct" / predict.CSV))
    assert [{k: r[k] for k in ("file", "status", "decision", "reason", "gradcam")} for r in rows] == \
        [{k: r[k] for k in ("file", "status", "decision", "reason", "gradcam")} for r in direct]
    assert np.allclose([r["probability"] or 0 for r in rows], [r["probability"] or 0 for r in direct], atol=1e-6)
    assert all((gathered.parent / r["gradcam"]).stat().st_size > 500 for r in rows if r["gradcam"])
    assert (gathered.parent / predict.PAGE).read_text().count("<figure>") == 4
