"""Lung masks: Dice/IoU, the legacy Keras 2 `.h5` path, and the train-mask-model + mask stages."""

import json

import h5py
import keras
import numpy as np
import pytest

from neumo import masking, models, stages, synthetic


def test_dice_and_iou():
    m = np.zeros((20, 20), bool)
    m[5:15, 5:15] = True
    assert masking.dice_iou(m, m) == (1.0, 1.0)
    half = m.copy()
    half[5:10] = False
    dice, iou = masking.dice_iou(m, half)
    assert dice == pytest.approx(2 * 50 / 150) and iou == pytest.approx(0.5)
    assert masking.dice_iou(np.zeros((3, 3)), np.zeros((3, 3))) == (1.0, 1.0)


def _as_keras2_h5(model, path):
    """Save as .h5 and add the `groups` argument Keras 2 wrote into every Conv2DTranspose config."""
    model.save(path)
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "Conv2DTranspose":
                layer["config"]["groups"] = 1
        f.attrs["model_config"] = json.dumps(config)


def test_legacy_h5_with_conv2d_transpose_loads(tmp_path):
    unet = models.build_unet(32, 2, 4, "sigmoid", name="legacy")
    path = str(tmp_path / "unet_final_renacimiento_validation_6.h5")
    _as_keras2_h5(unet, path)
    with pytest.raises((TypeError, ValueError)):
        keras.saving.load_model(path, compile=False)  # why the shim exists
    loaded = masking.load(path)
    x = np.random.default_rng(0).random((1, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), unet.predict(x, verbose=0), atol=1e-5)
    assert masking.model_pixels(loaded) == 32


def test_unreadable_or_missing_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot load the mask model"):
        masking.load(str(bad))
    with pytest.raises(FileNotFoundError):
        masking.load(str(tmp_path / "absent.h5"))


@pytest.mark.slow
def test_train_mask_model_then_mask_stage(tmp_path):
    data = tmp_path / "data"
    synthetic.write_kaggle(str(data), {"train": (16, 16), "test": (2, 2)}, size=128, seed=2,
                           masks_uri=str(tmp_path / "masks"))
    stages.ingest(dataset_uri=str(data), masks_uri=str(tmp_path / "masks"), out_dir=str(tmp_path / "manifest"))
    info = stages.mask_model(manifest_dir=str(tmp_path / "manifest"), out_dir=str(tmp_path / "model"), mask_pixels=64,
                             mask_depth=3, filters=8, mask_epochs=12, seed=0)
    assert info["source"] == "trained" and 0.0 <= info["iou"] <= info["dice"] <= 1.0
    assert info["dice"] > 0.6  # synthetic lungs are easy; the real-data figure is in the README
    summary = stages.mask(manifest_dir=str(tmp_path / "manifest"), model_dir=str(tmp_path / "model"),
                          out_dir=str(tmp_path / "masks_out"))
    assert summary["available"] and summary["images"] == 36
    assert (tmp_path / "masks_out" / "contact_sheet.png").stat().st_size > 1000
    qa = (tmp_path / "masks_out" / "qa.csv").read_text().splitlines()
    assert qa[0] == "id,lung_fraction,components,flags" and len(qa) == 37
    written = sorted((tmp_path / "masks_out" / "masks").rglob("*.png"))
    assert len(written) == 36


def test_mask_model_not_needed_writes_a_marker(tmp_path):
    info = stages.mask_model(manifest_dir=str(tmp_path), out_dir=str(tmp_path / "model"),
                             planned=[{"pixels": 64, "mask": False}])
    assert info["source"] == "none"
    assert stages.mask(manifest_dir=str(tmp_path), model_dir=str(tmp_path / "model"),
                       out_dir=str(tmp_path / "masks")) == {"available": False}
