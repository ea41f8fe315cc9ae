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
    data = training.pretraining_data(str(root / "p"), 0)
    assert info["images"] == data.images == total - data.held and data.held >= 1  # held out for the validation loss
    assert np.isfinite(info["best_val_loss"])
    assert (root / "b" / "autoencoder.keras").exists() and (root / "b" / "history.csv").exists()
    assert (root / "b" / "loss_curve.png").stat().st_size > 1000  # the reconstruction loss curves, as a picture


@pytest.mark.parametrize("task,data", [("identity", "unlabelled"), ("none", "unlabelled+train")])
def test_the_seeds_pretraining_and_the_random_control(variant, tmp_path, task, data):
    """identity: the seed's plain autoencoder on the unlabelled set only, every skip kept; none: the
    seeded random initialisation, untrained. pretrain.json says which, for every trial's row."""
    import keras

    root, _ = variant
    info = stages.pretrain(variant_dir=str(root / "p"), out_dir=str(tmp_path), depth=2, filters=4, pretrain_epochs=1,
                           pretrain_task=task, pretrain_data=data)
    saved = json.loads((tmp_path / "pretrain.json").read_text())
    assert (saved["task"], saved["data"]) == (task, data) == (info["task"], info["data"])
    unet = keras.saving.load_model(str(tmp_path / "autoencoder.keras"), compile=False, safe_mode=True)
    concats = [layer.name for layer in unet.layers if layer.name.endswith("_concat")]
    if task == "identity":
        assert info["source"] == "8 unlabelled + 0 train" and info["epochs"] == 1
        assert concats == ["dec2_concat", "dec1_concat"]  # every skip: the seed's U-Net
    else:
        assert info["epochs"] == 0 and info["best_val_loss"] is None and not (tmp_path / "history.csv").exists()
        assert concats == ["dec2_concat", "dec1_concat"]  # the decoder is never used: only the encoder matters
        again = stages.pretrain(variant_dir=str(root / "p"), out_dir=str(tmp_path / "again"), depth=2, filters=4,
                                pretrain_task="none")
        other = keras.saving.load_model(str(tmp_path / "again" / "autoencoder.keras"), compile=False, safe_mode=True)
        assert again["epochs"] == 0 and all(np.array_equal(a, b) for a, b in zip(unet.get_weights(), other.get_weights()))


def test_streamed_pretraining_holds_out_by_a_fixed_rule_and_drops_copies(variant):
    """The shard reader keeps the originals (acquisition copies dropped) and splits them by a hash of
    (seed, id): the same split on every call, another with another seed; the streams carry exactly the
    counted images, the clean image as target, the input corrupted for "restore" only."""
    from neumo import data as nd
    from neumo.preprocess import COPY_MARK

    root, _ = variant
    p = str(root / "p")
    data = training.pretraining_data(p, 0)
    assert training.pretraining_data(p, 0) == data
    ids = np.concatenate([nd.shard_ids(u) for u in data.uris])
    assert any(COPY_MARK in i for i in ids)  # the train shards hold copies...
    fit, held = data.pick(False)(ids), data.pick(True)(ids)
    assert not (fit & held).any() and all(COPY_MARK not in i for i in ids[fit | held])  # ...never read
    assert (fit.sum(), held.sum()) == (data.images, data.held)
    assert (fit | held).sum() == data.unlabelled + data.train
    other = training.pretraining_data(p, 1)
    assert not np.array_equal(other.pick(True)(ids), held)  # another seed, other images held out
    seen = {}
    for task in ("identity", "restore"):
        train_ds, held_ds = training.pretrain_datasets(data, 4, task, 0)
        batches = list(train_ds.as_numpy_iterator())
        assert sum(len(x) for x, _ in batches) == data.images
        assert sum(len(x) for x, _ in held_ds.as_numpy_iterator()) == data.held
        seen[task] = max(float(np.abs(x - y).max()) for x, y in batches)
    assert seen["identity"] == 0.0 and seen["restore"] > 0.5


def test_pretraining_writes_to_a_storage_uri(variant, gcs_bucket, tmp_path):
    """out_dir may be a gs:// URI (a multi-node job has no shared disk): the stage trains into a local
    folder and uploads its files there."""
    from neumo import storage

    root, _ = variant
    out = f"gs://{gcs_bucket}/backbones/64"
    info = stages.pretrain(variant_dir=str(root / "p"), out_dir=out, depth=2, filters=4, pretrain_task="none")
    names = sorted(storage.relative(u, out) for u in storage.list_files(out))
    assert names == ["autoencoder.keras", "pretrain.json"]
    assert json.loads(storage.read_text(storage.join(out, "pretrain.json"))) == json.loads(json.dumps(info))


def test_the_held_out_rule_keeps_one_and_never_all():
    none_low = np.array([2**63, 2**63 + 5, 2**64 - 1], np.uint64)  # no hash in the lowest tenth
    assert (none_low < training.held_out_cutoff(none_low)).sum() == 1
    all_low = np.array([1, 2, 3], np.uint64)  # every hash in it
    assert (all_low < training.held_out_cutoff(all_low)).sum() == 2
    many = training.image_hashes([f"img{i}" for i in range(2000)], 0)
    assert 150 < (many < training.held_out_cutoff(many)).sum() < 250  # about a tenth
    assert np.array_equal(many, training.image_hashes([f"img{i}" for i in range(2000)], 0))


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


def _catalog(root, tmp_path):
    """The catalog of the fixture's one variant and its backbone."""
    catalog = tmp_path / "catalog.json"
    stages.catalog(variants=[{"uri": str(root / "p"), "pixels": 64, "mask": False}],
                   backbones=[{"uri": str(root / "b"), "pixels": 64, "mask": False}], out_path=str(catalog))
    return catalog


def test_train_component_turns_a_failing_trial_into_a_failed_row(variant, tmp_path):
    """The component, called as KFP calls it: an impossible configuration (more frozen layers than
    the backbone has) yields a failed row with the reason; a good one an ok row; neither raises."""
    from kfp import dsl

    from components.train.component import train

    root, _ = variant
    catalog = _catalog(root, tmp_path)
    good = {"pixels": 64, "mask": False, "model": 2, "frozen_layers": 0, "learning_rate": 1e-3, "loss": "bce",
            "augmentation": "none", "class_weight": False, "round": 1, "trial": 0}
    rows = {}
    cases = (("ok", good), ("bad", {**good, "frozen_layers": 999, "trial": 1}),
             ("impossible", {**good, "pixels": 128, "trial": 2}))
    for name, config in cases:
        model = dsl.Model(uri=str(tmp_path / name))
        rows[name] = json.loads(train.python_func(trial=config, catalog=dsl.Dataset(uri=str(catalog)), classifier=model,
                                                  epochs=1, batch_size=8, patience=3, seed=0, run_id="r1",
                                                  results_uri="", frozen_layers_count="keras",
                                                  threshold_policy="sensitivity_0.95", selection="shift"))
        assert model.metadata["status"] == rows[name]["status"]
    assert rows["ok"]["status"] == "ok" and rows["ok"]["model_uri"] == str(tmp_path / "ok")
    assert rows["bad"]["status"] == "failed" and "frozen_layers must be in 0.." in rows["bad"]["error"]
    assert (rows["bad"]["round"], rows["bad"]["trial"], rows["bad"]["frozen_layers"]) == (1, 1, 999)
    # every setting that changes what a trial sees or learns is in its row, ok or failed
    recorded = {"clahe_clip": 40.0, "acquisition_copies": 1, "mask_model": "none", "mask_model_dice": "none",
                "pretrain_task": "restore", "pretrain_data": "unlabelled+train", "pretrain_epochs": 2,
                "pretrain_data_version": json.loads((root / "p" / "variant.json").read_text())["data_version"],
                "frozen_layers_count": "keras", "threshold_policy": "sensitivity_0.95", "acquisition": "varied",
                "selection": "shift"}
    for name in ("ok", "bad"):
        assert {k: rows[name][k] for k in recorded} == recorded, name
        assert rows[name]["pretrain_images"] == json.loads((root / "b" / "pretrain.json").read_text())["images"]
    # a configuration with no prepared variant: its settings are unknown, and say so
    assert rows["impossible"]["status"] == "failed" and "no prepared variant" in rows["impossible"]["error"]
    assert rows["impossible"]["clahe_clip"] == rows["impossible"]["pretrain_task"] == stages.UNKNOWN
    assert rows["impossible"]["threshold_policy"] == "sensitivity_0.95"
    from neumo import results

    for row in rows.values():
        assert all(row.get(c) not in (None, "") for c in results.TRAIN_COLUMNS
                   if c not in ("error", "git_revision", "image") and (row["status"] == "ok" or c in stages.CONTEXT_COLUMNS)), row
    meta = json.loads((tmp_path / "ok" / "model.json").read_text())
    assert (meta["threshold_policy"], meta["frozen_layers_count"]) == ("sensitivity_0.95", "keras")


def test_evaluation_at_05_and_the_trials_own_loss_equal_keras_model_evaluate(variant, tmp_path):
    """The seed scored with model.evaluate: its loss (here focal) and accuracy at 0.5. The evaluation
    CSV carries that view, equal to Keras on the same model and images, beside the stored threshold's."""
    import keras

    from neumo import data as nd

    root, _ = variant
    catalog = _catalog(root, tmp_path)
    config = {"pixels": 64, "mask": False, "model": 2, "frozen_layers": 0, "learning_rate": 3e-3, "loss": "focal",
              "augmentation": "none", "class_weight": False, "round": 0, "trial": 0}
    row = stages.train(trial=config, catalog_path=str(catalog), out_dir=str(tmp_path / "m"), epochs=2)
    record = stages.evaluate(model_dir=str(tmp_path / "m"), catalog_path=str(catalog), train_row=row,
                             out_dir=str(tmp_path / "e"), bootstrap=5)
    model = keras.saving.load_model(str(tmp_path / "m" / "model.keras"), compile=False, safe_mode=True)
    model.compile(loss=training.loss_function("focal"), metrics=[
        keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.Recall(thresholds=0.5, name="sensitivity"),
        keras.metrics.TrueNegatives(0.5, name="tn"), keras.metrics.FalsePositives(0.5, name="fp")])
    by_split = {e["split"]: e for e in record["eval"]}
    assert set(by_split) == {"test", "valid"}
    for split, e in by_split.items():
        keras_view = model.evaluate(nd.make_dataset(nd.load_fold(str(root / "p"), split), 4), verbose=0,
                                    return_dict=True)
        assert e["loss_function"] == "focal" and e["loss"] == pytest.approx(keras_view["loss"], abs=1e-5)
        assert e["bce"] != pytest.approx(e["loss"], abs=1e-4)  # cross-entropy, kept beside it for comparisons
        assert e["accuracy_at_0.5"] == pytest.approx(keras_view["accuracy"], abs=1e-6)
        assert e["sensitivity_at_0.5"] == pytest.approx(keras_view["sensitivity"], abs=1e-6)
        tn, fp = keras_view["tn"], keras_view["fp"]
        assert e["specificity_at_0.5"] == pytest.approx(tn / (tn + fp), abs=1e-6)
        assert e["threshold"] == row["threshold"] and e["threshold_policy"] == "youden"
