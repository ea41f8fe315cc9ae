"""Bad parameters fail at once, before any GPU time, with an error naming the parameter and what
is allowed: search space, trial configuration, stage configs, U-Net pixels, mask model, storage,
and the pipeline command line."""

from __future__ import annotations

import json

import pytest

from neumo import ingest, models, preprocess, stages, storage
from neumo.training import PretrainConfig, TrainSettings
from neumo.trial import SearchSpace, TrialConfig

SPACE = {"pixels": [64], "mask": [False], "model": [1, 2], "frozen_layers": [0, 4], "learning_rate": [1e-5, 1e-2],
         "loss": ["bce"], "augmentation": ["none"], "class_weight": [False]}
TRIAL = {"pixels": 64, "mask": False, "model": 1, "frozen_layers": 0, "learning_rate": 1e-3, "loss": "bce",
         "augmentation": "none", "class_weight": False}


@pytest.mark.parametrize("change,match", [
    ({"pixels": [100]}, r"'pixels': 100 is not one of the allowed integers from \(64, 128, 256, 512\)"),
    ({"pixels": [256, 1024]}, r"'pixels'.*\(64, 128, 256, 512\)"),
    ({"pixels": []}, r"'pixels': expected a non-empty list"),
    ({"pixels": 256}, r"'pixels': expected a non-empty list"),
    ({"loss": ["hinge"]}, r"'loss': 'hinge' is not one of the allowed strings from \('bce', 'weighted_bce', 'focal'\)"),
    ({"augmentation": ["extreme"]}, r"'augmentation': 'extreme'.*\('none', 'light', 'strong'\)"),
    ({"model": [3]}, r"'model': 3 .*\(1, 2\)"),
    ({"frozen_layers": [-1]}, r"'frozen_layers': -1 .*integers >= 0"),
    ({"mask": ["yes"]}, r"'mask': 'yes' .*booleans"),
    ({"learning_rate": [0, 1e-3]}, r"'learning_rate': expected \[low, high\] with 0 < low < high"),
    ({"learning_rate": [-1e-3, 1e-2]}, r"'learning_rate'.*0 < low < high"),
    ({"learning_rate": [1e-2, 1e-5]}, r"'learning_rate'.*0 < low < high"),  # contradictory
    ({"learning_rate": [1e-3, 1e-3]}, r"'learning_rate'.*0 < low < high"),  # empty range
    ({"learning_rate": [1e-3, float("nan")]}, r"'learning_rate'"),
    ({"batch": [8]}, r"unknown parameter\(s\) \['batch'\]; allowed: \('pixels'"),
])
def test_search_space_errors_name_the_parameter_and_allowed_values(change, match):
    with pytest.raises(ValueError, match=match):
        SearchSpace.from_dict({**SPACE, **change})


def test_empty_or_partial_search_space():
    with pytest.raises(ValueError, match=r"missing parameter\(s\) \['pixels', 'mask'"):
        SearchSpace.from_dict({})
    with pytest.raises(ValueError, match="expected a dict"):
        SearchSpace.from_dict([SPACE])
    partial = dict(SPACE)
    del partial["loss"]
    with pytest.raises(ValueError, match=r"missing parameter\(s\) \['loss'\]"):
        SearchSpace.from_dict(partial)


@pytest.mark.parametrize("change,match", [
    ({"learning_rate": 0}, "learning_rate must be > 0, got 0"),
    ({"learning_rate": -1e-3}, "learning_rate must be > 0"),
    ({"learning_rate": float("nan")}, "learning_rate must be > 0"),
    ({"loss": "mse"}, r"loss must be one of \('bce', 'weighted_bce', 'focal'\), got 'mse'"),
    ({"augmentation": "mixup"}, r"augmentation must be one of \('none', 'light', 'strong'\)"),
    ({"model": 5}, "model must be 1 or 2"),
    ({"frozen_layers": -2}, "frozen_layers must be >= 0"),
    ({"pixels": 64.5}, "pixels must be an integer"),
])
def test_trial_config_errors(change, match):
    with pytest.raises(ValueError, match=match):
        TrialConfig.from_dict({**TRIAL, **change})


def test_trial_config_missing_key_and_float_ints():
    partial = dict(TRIAL)
    del partial["loss"]
    with pytest.raises(ValueError, match="trial configuration lacks 'loss'"):
        TrialConfig.from_dict(partial)
    assert TrialConfig.from_dict({**TRIAL, "pixels": 64.0}).pixels == 64  # KFP's local runner sends floats


def test_trial_config_rejects_pixels_outside_the_allowed_set():
    with pytest.raises(ValueError, match=r"pixels must be one of \(64, 128, 256, 512\)"):
        TrialConfig.from_dict({**TRIAL, "pixels": 100})


@pytest.mark.parametrize("pixels,depth", [(100, 4), (64, 7), (0, 2), (-32, 2), (256.0, 4)])
def test_pixels_must_divide_by_the_unet_downsampling(pixels, depth):
    with pytest.raises(ValueError, match=rf"pixels must be a positive multiple of 2\*\*depth={2 ** depth}"):
        models.check_pixels(pixels, depth)


def test_build_unet_refuses_bad_pixels_before_building():
    with pytest.raises(ValueError, match=r"2\*\*depth=16, got 100"):
        models.build_unet(100, 4)


@pytest.mark.parametrize("kwargs,match", [
    ({"pixels": 4}, "pixels must be an integer >= 8, got 4"),
    ({"pixels": "256"}, "pixels must be an integer >= 8"),
    ({"pixels": 64, "clahe_clip": 3.0}, r"CLAHE clip must be one of \(None, 2.0, 20.0\)"),
    ({"pixels": 64, "workers": -1}, "workers must be >= 0"),
])
def test_preprocess_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preprocess.PreprocessConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"dataset_uri": ""}, "dataset_uri is required"),
    ({"dataset_uri": "d", "valid_fraction": 0}, r"valid_fraction must be in \(0, 1\)"),
    ({"dataset_uri": "d", "sample_per_class": -3}, "sample_per_class must be >= 0"),
])
def test_ingest_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ingest.IngestConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"learning_rate": 0}, "pretrain learning_rate must be > 0"),
    ({"epochs": 0}, "pretrain epochs must be >= 1"),
    ({"task": "blur"}, "pretrain_task must be one of .*'restore', 'identity', 'none'"),
    ({"data": "nih"}, "pretrain_data must be one of"),
])
def test_pretrain_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PretrainConfig(**kwargs)


def test_train_settings_errors():
    with pytest.raises(ValueError, match="epochs, batch_size and patience must be >= 1"):
        TrainSettings(batch_size=0)


FOLDS = {"train": {"NORMAL": 8, "PNEUMONIA": 8}, "valid": {"NORMAL": 2, "PNEUMONIA": 2}}


def _manifest_dir(tmp_path, with_mask=0):
    storage.write_text(str(tmp_path / "summary.json"), json.dumps({"with_mask": with_mask, "folds": FOLDS}))
    return str(tmp_path)


def test_plan_validates_the_space_against_the_data(tmp_path):
    manifest = _manifest_dir(tmp_path)
    assert stages.plan(search_space=SPACE, manifest_dir=manifest) == [{"pixels": 64, "mask": False}]
    with pytest.raises(ValueError, match="'loss'"):
        stages.plan(search_space={**SPACE, "loss": ["nope"]}, manifest_dir=manifest)
    with pytest.raises(ValueError, match="search_space.mask includes true, but no image has a lung mask"):
        stages.plan(search_space={**SPACE, "mask": [True]}, manifest_dir=manifest)


@pytest.mark.parametrize("settings,match", [
    ({"acquisition_copies": 9}, r"acquisition_copies must be an integer in 0\.\.4, got 9"),
    ({"clahe_clip": 3.0}, r"CLAHE clip must be one of \(None, 2.0, 20.0\)"),
])
def test_plan_refuses_bad_preprocessing_settings_before_gpu_time(tmp_path, settings, match):
    with pytest.raises(ValueError, match=match):
        stages.plan(search_space=SPACE, manifest_dir=_manifest_dir(tmp_path), **settings)


def test_plan_refuses_pixels_the_unet_cannot_halve_depth_times(tmp_path):
    with pytest.raises(ValueError, match=r"2\*\*depth=128"):
        stages.plan(search_space=SPACE, manifest_dir=_manifest_dir(tmp_path), depth=7)  # 64 px cannot be halved 7 times


def test_mask_model_file_errors(tmp_path):
    from neumo import masking

    with pytest.raises(FileNotFoundError, match="mask model file not found"):
        masking.load(str(tmp_path / "absent.keras"))
    (tmp_path / "text.keras").write_text("not a zip")
    (tmp_path / "text.h5").write_text("not hdf5")
    (tmp_path / "model.onnx").write_bytes(b"\0")
    for name, match in [("text.keras", "cannot load the mask model"), ("text.h5", "not an HDF5 file"),
                        ("model.onnx", "expected a .keras file or a legacy Keras 2 .h5 or .hdf5")]:
        with pytest.raises(ValueError, match=match):
            masking.load(str(tmp_path / name))
    (tmp_path / "folder.keras").mkdir()
    with pytest.raises(FileNotFoundError):
        masking.load(str(tmp_path / "folder.keras"))


def test_wrong_kind_of_model_is_refused(tmp_path):
    import keras

    from neumo import masking

    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1)(inputs))  # RGB in: not a lung-mask model
    path = str(tmp_path / "rgb.keras")
    model.save(path)
    with pytest.raises(ValueError, match=r"takes \(p, p, 1\) and returns \(p, p, 1\)"):
        masking.model_pixels(masking.load(path))


def test_missing_bucket_is_file_not_found_naming_it(gcs_bucket, tmp_path):
    missing = "gs://no-such-bucket-neumo-test/data"
    with pytest.raises(FileNotFoundError, match="no-such-bucket-neumo-test"):
        storage.list_files(missing)
    with pytest.raises(FileNotFoundError, match="no-such-bucket-neumo-test"):
        storage.read_bytes(missing + "/x.csv")
    with pytest.raises(FileNotFoundError, match="no-such-bucket-neumo-test"):
        storage.write_bytes(missing + "/x.csv", b"x")
    with pytest.raises(FileNotFoundError, match="no-such-bucket-neumo-test"):
        storage.check_writable("gs://no-such-bucket-neumo-test/results")
    storage.check_writable(f"gs://{gcs_bucket}/results")  # a real bucket passes, and keeps no probe
    assert storage.list_files(f"gs://{gcs_bucket}/results") == []
    with pytest.raises(FileNotFoundError, match="no-such-bucket-neumo-test"):
        stages.ingest(dataset_uri=missing, out_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("uri", ["gs://", "gs://Bad_Bucket/x", "s3://bucket/x", "file://host/x"])
def test_malformed_uris_are_value_errors(uri):
    with pytest.raises(ValueError, match="gs://|file://"):
        storage.check_writable(uri)


def test_pipeline_cli_without_dataset_uri_stops_before_running(tmp_path, monkeypatch):
    from pipelines import full, runner

    ran = []
    monkeypatch.setattr(runner, "run_local", lambda *a: ran.append(a))
    with pytest.raises(SystemExit, match="dataset_uri is required"):
        full.main(["--local", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown pipeline parameter 'pixel'"):
        full.main(["--local", "--workdir", str(tmp_path), "--set", "pixel=3"])
    with pytest.raises(SystemExit, match="bad value for depth"):
        full.main(["--local", "--workdir", str(tmp_path), "--set", "depth=four"])
    assert ran == []


def test_neumo_cli_reports_a_bad_stage_parameter_with_exit_code_2(tmp_path, caplog):
    from neumo import cli

    assert cli.main(["ingest", "--dataset-uri", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no files under" in caplog.text
    assert cli.main(["preprocess", "--manifest", str(tmp_path), "--pixels", "4", "--out", str(tmp_path / "p")]) == 2
    assert "pixels must be an integer >= 8" in caplog.text


@pytest.mark.parametrize("folds,match", [
    ({"train": {"NORMAL": 8}, "valid": {"NORMAL": 2, "PNEUMONIA": 2}}, "train has 0 PNEUMONIA"),
    ({"train": {"NORMAL": 8, "PNEUMONIA": 8}, "valid": {"PNEUMONIA": 2}}, "valid has 0 NORMAL"),
    ({"train": {"NORMAL": 1, "PNEUMONIA": 8}, "valid": {"NORMAL": 2, "PNEUMONIA": 2}}, r"train has 1 NORMAL \(needs >= 2\)"),
    ({"train": {"NORMAL": 1}}, "valid has 0 NORMAL"),
])
def test_plan_refuses_a_dataset_that_cannot_train_or_validate(tmp_path, folds, match):
    """A one-class train fold, or an empty valid fold, is refused before any GPU time, by name."""
    storage.write_text(str(tmp_path / "summary.json"), json.dumps({"with_mask": 0, "folds": folds}))
    with pytest.raises(ValueError, match=match):
        stages.plan(search_space=SPACE, manifest_dir=str(tmp_path))
