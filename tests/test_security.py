"""Nothing let in: model files cannot run code when loaded, and names from a listing cannot
escape the folder they are joined to."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from neumo import ingest, masking, models, storage, synthetic


def _lambda_model(marker: Path) -> keras.Model:
    """A model whose Lambda layer, if ever run, leaves a marker file behind."""
    path = str(marker)
    # a lambda is stored as Python bytecode; opening a file stands for any code an attacker would run
    payload = lambda x: (open(path, "w").close(), x)[1]  # noqa: E731
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Lambda(payload, name="payload")(inputs)
    return keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(x))


@pytest.mark.parametrize("name,match", [
    ("lung_mask.keras", "(?s)cannot load the mask model.*(Lambda|lambda|safe_mode)"),  # safe mode refuses it
    ("unet_final.h5", r"refusing the mask model .*\['Lambda'\] are not standard Keras layers"),  # before loading
])
def test_model_file_with_lambda_is_refused(tmp_path, name, match):
    marker = tmp_path / "pwned"
    model = _lambda_model(marker)
    marker.unlink()  # building the model ran it once; loading must not
    path = tmp_path / name
    model.save(path)
    with pytest.raises(ValueError, match=match):
        masking.load(str(path))
    assert not marker.exists()


def _edit_h5_config(path: Path, edit) -> None:
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        edit(config)
        f.attrs["model_config"] = json.dumps(config)


@pytest.mark.parametrize("change,named", [
    ({"class_name": "EvilLayer"}, "EvilLayer"),
    ({"module": "os"}, "Conv2D"),  # a standard name from a foreign module
    ({"class_name": "TFOpLambda"}, "TFOpLambda"),
])
def test_legacy_h5_with_unknown_layers_is_refused(tmp_path, change, named):
    path = tmp_path / "model.h5"
    models.build_unet(32, 2, 4, "sigmoid", name="legacy").save(path)

    def edit(config):
        layer = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Conv2D")
        layer.update(change)

    _edit_h5_config(path, edit)
    with pytest.raises(ValueError, match=f"refusing the mask model.*{named}"):
        masking.load(str(path))


def test_legacy_h5_nested_models_are_checked_too(tmp_path):
    marker = tmp_path / "pwned"
    inner = _lambda_model(marker)
    marker.unlink()
    inputs = keras.Input((32, 32, 1))
    outer = keras.Model(inputs, inner(inputs))
    path = tmp_path / "nested.h5"
    outer.save(path)
    with pytest.raises(ValueError, match="Lambda"):
        masking.check_h5(str(path))
    assert not marker.exists()


def test_a_standard_legacy_h5_still_loads(tmp_path):
    unet = models.build_unet(32, 2, 4, "sigmoid", name="legacy")
    path = tmp_path / "ok.hdf5"
    unet.save(tmp_path / "ok.h5")
    (tmp_path / "ok.h5").rename(path)
    x = np.random.default_rng(0).random((1, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(masking.load(str(path)).predict(x, verbose=0), unet.predict(x, verbose=0), atol=1e-5)


def test_a_keras_zip_named_h5_is_refused(tmp_path):
    path = tmp_path / "disguised.h5"
    models.build_unet(32, 2, 4, "sigmoid").save(tmp_path / "real.keras")
    (tmp_path / "real.keras").rename(path)
    with pytest.raises(ValueError, match="not an HDF5 file"):
        masking.load(str(path))


@pytest.mark.parametrize("name", [
    "train/NORMAL/../../../etc/x.jpeg", "train/NORMAL/./x.jpeg", "train//NORMAL/x.jpeg", "/etc/x.jpeg",
    "train/NORMAL/x\0.jpeg", "..", ".",
])
def test_relative_refuses_object_names_that_could_escape(name):
    with pytest.raises(ValueError, match="is not under"):
        storage.relative(f"gs://bucket/data/{name}", "gs://bucket/data")


@pytest.mark.parametrize("name", ["train/NORMAL/../../../etc/x.jpeg", "..", ".", "train/x\0.jpeg"])
def test_relative_refuses_local_paths_that_escape(name):
    with pytest.raises(ValueError, match="is not under"):
        storage.relative(f"/data/{name}", "/data")
    assert storage.relative("/data/train/./NORMAL//x.jpeg", "/data") == "train/NORMAL/x.jpeg"  # normalised, inside


def test_ingest_refuses_escaping_object_names_without_reading_them(gcs_bucket, monkeypatch):
    """The emulator refuses to store such names, real GCS does not: the listing is faked around real objects."""
    base = f"gs://{gcs_bucket}/data"
    synthetic.write_kaggle(base, {"train": (2, 2)}, size=64, seed=1)
    evil = [f"{base}/train/NORMAL/../../../etc/x.jpeg", f"{base}/train/NORMAL/./x.jpeg",
            f"{base}//train/NORMAL/x.jpeg", f"{base}/train/NORMAL/..", f"{base}/train/NORMAL/x\0.jpeg"]
    real_list, real_read = storage.list_versions, storage.read_bytes
    read = []
    monkeypatch.setattr(storage, "list_versions",
                        lambda uri, suffixes=None: sorted(real_list(uri, suffixes) + [(u, 10, 1) for u in evil]))
    monkeypatch.setattr(storage, "read_bytes", lambda uri: read.append(uri) or real_read(uri))
    manifest, report, summary = ingest.scan(ingest.IngestConfig(base))
    rejected = {r["uri"]: r["reason"] for r in report if r["status"] == "rejected"}
    assert set(rejected) == set(evil)
    assert all(reason.startswith("unsafe name") for reason in rejected.values())
    assert not set(read) & set(evil)
    assert summary["accepted"] == len(manifest) == 4 and summary["files"] == 4 + len(evil)
    assert all(".." not in r["id"].split("/") for r in manifest)
