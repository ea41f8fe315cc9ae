"""Training on a prepared variant: pretraining, a trial, its threshold, and resuming from object storage."""

import json
import logging

import numpy as np
import pytest

from neumo import stages, synthetic, training
from neumo.trial import TrialConfig


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """A tiny prepared 64 px variant (one acquisition copy of each train image, as the pipeline
    makes) and its pretrained 2-level backbone."""
    root = tmp_path_factory.mktemp("variant")
    synthetic.write_kaggle(str(root / "data"), {"train": (12, 12), "test": (3, 3)}, size=64, seed=4)
    synthetic.write_nih(str(root / "nih"), 8, size=64, seed=5)
    stages.ingest(dataset_uri=str(root / "data"), pretrain_uri=str(root / "nih"), out_dir=str(root / "m"))
    stages.preprocess(manifest_dir=str(root / "m"), variant={"pixels": 64, "mask": False}, out_dir=str(root / "p"),
                      workers=1, acquisition_copies=1)
    info = stages.pretrain(variant_dir=str(root / "p"), out_dir=str(root / "b"), depth=2, filters=4, pretrain_epochs=2)
    return root, info


def test_pretraining_uses_unlabelled_and_train_images(variant):
    root, info = variant
    train = sum(r["fold"] == "train" for r in stages.load_manifest(str(root / "m")))
    assert info["source"] == f"8 unlabelled + {train} train"  # the originals: acquisition copies are for classifiers
    total = sum(int(n) for n in info["source"].split() if n.isdigit())
    assert info["images"] == total - max(1, total // 10)  # a tenth held out for the validation loss
    assert np.isfinite(info["best_val_loss"])
    assert (root / "b" / "autoencoder.keras").exists() and (root / "b" / "history.csv").exists()
    assert (root / "b" / "loss_curve.png").stat().st_size > 1000  # the reconstruction loss curves, as a picture


def test_corruption_keeps_shape_and_changes_the_input():
    import tensorflow as tf

    x = tf.random.normal((4, 32, 32, 1), seed=1)
    y = training.corrupt_tf(x, seed=3)
    assert y.shape == x.shape
    assert float(tf.reduce_mean(tf.abs(y - x))) > 0.05


def test_trial_stores_model_threshold_and_config(variant, tmp_path):
    root, _ = variant
    cfg = TrialConfig.from_dict({"pixels": 64.0, "mask": False, "model": 2.0, "frozen_layers": 2,
                                 "learning_rate": 3e-3, "loss": "weighted_bce", "augmentation": "light",
                                 "class_weight": True})
    result = training.train_trial(cfg, training.TrainSettings(epochs=2, seed=1), str(root / "p"),
                                  str(root / "b" / "autoencoder.keras"), str(tmp_path))
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["threshold"] == result.threshold and 0 <= result.threshold <= 1
    assert meta["config"]["model"] == 2 and (tmp_path / "model.keras").exists()
    assert 1 <= result.best_epoch <= result.epochs <= 2


def test_a_restarted_trial_resumes_from_object_storage(variant, tmp_path, gcs_bucket, caplog):
    root, _ = variant
    cfg = TrialConfig(64, False, 1, 0, 1e-3, "bce", "none", False)
    checkpoint = f"gs://{gcs_bucket}/checkpoints/run/round-0-trial-0"
    backbone = str(root / "b" / "autoencoder.keras")
    training.train_trial(cfg, training.TrainSettings(epochs=1), str(root / "p"), backbone, str(tmp_path / "a"), checkpoint)
    caplog.clear()  # only what the restarted pod logs
    # a new pod: empty local disk, same checkpoint URI, one more epoch asked for
    with caplog.at_level(logging.INFO, logger="neumo.fitting"):
        result = training.train_trial(cfg, training.TrainSettings(epochs=2), str(root / "p"), backbone,
                                      str(tmp_path / "b"), checkpoint)
    assert "resuming from the training state" in caplog.text
    assert "trial epoch 2:" in caplog.text and "trial epoch 1:" not in caplog.text
    assert result.epochs == 1  # only the remaining epoch ran


@pytest.mark.parametrize("bad,match", [
    ({"model": 3}, "model"), ({"learning_rate": 0}, "learning_rate"), ({"loss": "hinge"}, "loss"),
    ({"augmentation": "flip"}, "augmentation"), ({"pixels": 64.5}, "pixels"), ({"pixels": 100}, "pixels"), ({"frozen_layers": -1}, "frozen"),
])
def test_bad_trial_configurations_raise(bad, match):
    good = {"pixels": 64, "mask": False, "model": 1, "frozen_layers": 0, "learning_rate": 1e-3, "loss": "bce",
            "augmentation": "none", "class_weight": False}
    with pytest.raises(ValueError, match=match):
        TrialConfig.from_dict({**good, **bad})


def test_nan_loss_fails_the_trial_with_a_reason(variant, tmp_path):
    root, _ = variant
    cfg = TrialConfig(64, False, 1, 0, 1e12, "bce", "none", False)
    with pytest.raises(FloatingPointError, match="NaN"):
        training.train_trial(cfg, training.TrainSettings(epochs=2), str(root / "p"),
                             str(root / "b" / "autoencoder.keras"), str(tmp_path))


def test_mixed_precision_trial_trains_and_saves(variant, tmp_path):
    """The GPU default (mixed_float16) on the same code path; the saved model predicts float32."""
    import keras

    root, _ = variant
    cfg = TrialConfig(64, False, 1, 0, 1e-3, "bce", "none", False)
    training.train_trial(cfg, training.TrainSettings(epochs=1, precision="mixed_float16"), str(root / "p"),
                         str(root / "b" / "autoencoder.keras"), str(tmp_path))
    assert keras.mixed_precision.global_policy().name == "float32"  # restored for the rest of the process
    model = keras.saving.load_model(str(tmp_path / "model.keras"), compile=False, safe_mode=True)
    assert model.get_layer("backbone").get_layer("enc1_conv1_raw").dtype_policy.name == "mixed_float16"
    assert model.predict(np.zeros((1, 64, 64, 1), "float32"), verbose=0).dtype == np.float32
    assert training.resolve_precision("auto") == "float32"  # no GPU here
    with pytest.raises(ValueError, match="precision"):
        training.TrainSettings(precision="half")


def test_train_component_turns_a_failing_trial_into_a_failed_row(variant, tmp_path):
    """The component, called as KFP calls it: an impossible configuration (more frozen layers than
    the backbone has) yields a failed row with the reason; a good one an ok row; neither raises."""
    from kfp import dsl

    from components.train.component import train

    root, _ = variant
    catalog = tmp_path / "catalog.json"
    stages.catalog(variants=[{"uri": str(root / "p"), "pixels": 64, "mask": False}],
                   backbones=[{"uri": str(root / "b"), "pixels": 64, "mask": False}], out_path=str(catalog))
    good = {"pixels": 64, "mask": False, "model": 2, "frozen_layers": 0, "learning_rate": 1e-3, "loss": "bce",
            "augmentation": "none", "class_weight": False, "round": 1, "trial": 0}
    rows = {}
    for name, config in (("ok", good), ("bad", {**good, "frozen_layers": 999, "trial": 1})):
        model = dsl.Model(uri=str(tmp_path / name))
        rows[name] = json.loads(train.python_func(trial=config, catalog=dsl.Dataset(uri=str(catalog)), classifier=model,
                                                  epochs=1, batch_size=8, patience=3, seed=0, run_id="r1",
                                                  results_uri=""))
        assert model.metadata["status"] == rows[name]["status"]
    assert rows["ok"]["status"] == "ok" and rows["ok"]["model_uri"] == str(tmp_path / "ok")
    assert rows["bad"]["status"] == "failed" and "frozen_layers must be in 0.." in rows["bad"]["error"]
    assert (rows["bad"]["round"], rows["bad"]["trial"], rows["bad"]["frozen_layers"]) == (1, 1, 999)
