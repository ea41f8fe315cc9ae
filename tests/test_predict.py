"""`neumo predict` with a model bundle: the bundle alone turns raw files (PNG, JPEG, DICOM; from a
folder and from gs://) into the probabilities the evaluate stage gave the same images, bad files get
the reasons ingest gives them, a masked bundle carries and applies its lung-mask model; and the
predict pipeline compiles (GPU placement, loop cap)."""

import csv
import io
import json
import shutil

import cv2
import numpy as np
import pytest
import yaml

from neumo import bundle, cli, imaging, ingest, predict, stages, storage, synthetic
from tests.conftest import REPO_ROOT, compile_with_only_kfp, lung_mask_stand_in

TRIAL = {"pixels": 64, "model": 2, "frozen_layers": 0, "learning_rate": 3e-3, "loss": "bce", "augmentation": "none",
         "class_weight": False}
BAD = {"empty.png": b"", "notes.jpeg": b"these are my notes, not an image\n"}


def _dicom(grey: np.ndarray) -> bytes:
    """An uncompressed 8-bit MONOCHROME2 DICOM file holding `grey`."""
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    ds.Modality = "DX"
    ds.set_pixel_data(grey, "MONOCHROME2", 8)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()




@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """A tiny unmasked trial and its masked twin (64 px) through the stages, then only their
    bundles, evaluate's probabilities and new files made from test images are kept: every other
    artifact (data, manifest, masks, variants, models, evaluations) is deleted. For time, the
    lung-mask model is imported (a made one), the backbone is not pretrained (pretrain_task none)
    and the masked trial reuses the unmasked one's weights: its evaluation still runs on the
    masked variant, which is what the bundle must reproduce."""
    work, keep = tmp_path_factory.mktemp("pipeline"), tmp_path_factory.mktemp("kept")
    w = {k: str(work / k) for k in ("data", "masks", "nih", "m", "mm", "lungs", "bb", "cat.json")}
    synthetic.write_kaggle(w["data"], {"train": (8, 8), "test": (2, 2)}, size=64, seed=3, masks_uri=w["masks"])
    synthetic.write_nih(w["nih"], 4, size=64, seed=4)
    stages.ingest(dataset_uri=w["data"], masks_uri=w["masks"], pretrain_uri=w["nih"], out_dir=w["m"])
    lung_mask_stand_in(str(work / "made.keras"))
    stages.mask_model(manifest_dir=w["m"], out_dir=w["mm"], mask_model_uri=str(work / "made.keras"))
    stages.mask(manifest_dir=w["m"], model_dir=w["mm"], out_dir=w["lungs"], sheet_size=0)
    variants = []
    for masked in (False, True):
        out = str(work / f"p{int(masked)}")
        stages.preprocess(manifest_dir=w["m"], variant={"pixels": 64, "mask": masked}, out_dir=out, masks_dir=w["lungs"],
                          workers=1, acquisition_copies=0)
        variants.append({"uri": out, "pixels": 64, "mask": masked})
    stages.pretrain(variant_dir=variants[0]["uri"], out_dir=w["bb"], filters=4, depth=3, pretrain_task="none")
    stages.catalog(variants=variants, backbones=[{**v, "uri": w["bb"]} for v in variants], out_path=w["cat.json"])
    row = stages.train(trial={**TRIAL, "mask": False, "round": 0, "trial": 0}, catalog_path=w["cat.json"],
                       out_dir=str(work / "t-plain"), epochs=1, seed=1, run_id="r1")
    assert row["status"] == "ok", row["error"]
    shutil.copytree(work / "t-plain", work / "t-masked")
    meta = json.loads((work / "t-masked" / "model.json").read_text())
    (work / "t-masked" / "model.json").write_text(json.dumps({**meta, "config": {**meta["config"], "mask": True}}))
    for name, trial_row in (("plain", row), ("masked", {**row, "mask": True, "trial": 1})):
        stages.evaluate(model_dir=str(work / f"t-{name}"), catalog_path=w["cat.json"], train_row=trial_row,
                        out_dir=str(work / f"e-{name}"), bootstrap=5)
        shutil.copytree(work / f"e-{name}" / bundle.FOLDER, keep / f"bundle-{name}")
        shutil.copy(work / f"e-{name}" / "predictions.csv", keep / f"evaluated-{name}.csv")
    tests = sorted((work / "data" / "test").glob("*/*.jpeg"))
    new = keep / "new"
    new.mkdir()
    grey = [imaging.read_grey(p.read_bytes()) for p in tests]
    shutil.copy(tests[0], new / tests[0].name)  # JPEG as it came
    (new / (tests[1].stem + ".png")).write_bytes(cv2.imencode(".png", grey[1])[1].tobytes())  # the same pixels
    (new / (tests[2].stem + ".dcm")).write_bytes(_dicom(grey[2]))
    for name, data in BAD.items():
        (new / name).write_bytes(data)
    (new / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    shutil.rmtree(work)
    return keep


def _by_stem(rows):
    return {r["file"].rsplit("/", 1)[-1].rsplit(".", 1)[0]: r for r in rows}


def test_the_bundle_alone_predicts_as_evaluate_did_from_a_folder_and_gs(kept, tmp_path, gcs_bucket):
    evaluated = _evaluated_csv(kept / "evaluated-plain.csv")
    info = bundle.read_info(str(kept / "bundle-plain"))
    assert not info["preprocessing"]["mask"] and info["mask_model"] is None and info["ood"]["file"] == bundle.OOD
    assert {"model.keras", "model.json", "ood.json", "MODEL_CARD.md", "MODEL_CARD.html", "gradcam.png"} <= set(info["files"])
    summary = stages.predict(bundle_uri=str(kept / "bundle-plain"), inputs=[str(kept / "new")], out_dir=str(tmp_path / "out"))
    assert summary["predicted"] == 3 and summary["rejected"] == 2 and summary["skipped"] == 1
    rows = predict.read_csv(str(tmp_path / "out" / predict.CSV))
    _check_rows(rows, evaluated, info["decision"]["threshold"], kept / "new")
    page = (tmp_path / "out" / predict.PAGE).read_text()
    shown = [r["file"] for r in sorted((r for r in rows if r["probability"] is not None), key=lambda r: -r["probability"])]
    assert [page.index(f) for f in shown] == sorted(page.index(f) for f in shown)  # most probable first
    assert all((tmp_path / "out" / r["gradcam"]).stat().st_size > 500 for r in rows if r["status"] == "predicted")

    base = f"gs://{gcs_bucket}"
    for path in (kept / "bundle-plain").iterdir():
        storage.write_bytes(f"{base}/models/best/{path.name}", path.read_bytes())
    for path in (kept / "new").iterdir():
        storage.write_bytes(f"{base}/incoming/{path.name}", path.read_bytes())
    assert cli.main(["predict", "--bundle", f"{base}/models/best", "--out", str(tmp_path / "gs-out"), f"{base}/incoming"]) == 0
    remote = predict.read_csv(str(tmp_path / "gs-out" / predict.CSV))
    _check_rows(remote, evaluated, info["decision"]["threshold"], kept / "new")
    assert [r["probability"] for r in remote] == [r["probability"] for r in rows]


def _evaluated_csv(path) -> dict[str, float]:
    rows = csv.DictReader(io.StringIO(path.read_text()))
    return {r["id"].rsplit("/", 1)[-1].rsplit(".", 1)[0]: float(r["probability"]) for r in rows}


def _check_rows(rows, evaluated, threshold, new):
    found = _by_stem(rows)
    scored = [r for r in rows if r["status"] == "predicted"]
    assert {r["file"].rsplit(".", 1)[-1] for r in scored} == {"jpeg", "png", "dcm"}, rows
    for r in scored:
        stem = r["file"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
        assert abs(r["probability"] - evaluated[stem]) < 1e-5, (r, evaluated[stem])
        call = "PNEUMONIA" if r["probability"] >= threshold else "NORMAL"
        assert r["decision"] == (predict.NO_CALL if r["warning"] else call), r
        assert not r["warning"] or r["warning"].startswith("outside the training distribution (score ")
    for name in BAD:  # the reason ingest gives the same file
        _, status, reason = ingest._read_one(str(new / name), name, "", "", {}, "")
        row = found[name.rsplit(".", 1)[0]]
        assert (row["status"], row["reason"], row["probability"]) == (status, reason, None), row
    assert found[""]["status"] == "skipped" and found[""]["reason"] == storage.skip_reason(".DS_Store")


def test_a_masked_bundle_carries_its_lung_mask_model_and_predict_applies_it(kept, tmp_path):
    evaluated = _evaluated_csv(kept / "evaluated-masked.csv")
    info = bundle.read_info(str(kept / "bundle-masked"))
    assert info["preprocessing"]["mask"] and info["mask_model"]["file"] in info["files"]
    loaded = bundle.load(str(kept / "bundle-masked"))
    assert loaded.mask_model is not None and loaded.mask_pixels == 32 and loaded.mask_model.name == "lung_mask"
    out = str(tmp_path / "out")
    rows = predict.score(loaded, predict.list_inputs([str(kept / "new")]), out)
    predict.write(loaded, rows, out)
    _check_rows(predict.read_csv(storage.join(out, predict.CSV)), evaluated, loaded.threshold, kept / "new")
    (png,) = [p for p in (kept / "new").iterdir() if p.suffix == ".png" and p.name not in BAD]
    image = imaging.decode(png.read_bytes())
    masked = predict.prepare(loaded, [image])[0]
    loaded.info["preprocessing"]["mask"] = False
    assert not np.array_equal(masked, predict.prepare(loaded, [image])[0])  # the mask changed the image


def test_a_folder_that_is_not_a_bundle_is_one_clear_line(tmp_path, caplog):
    (tmp_path / "x.png").write_bytes(b"")
    assert cli.main(["predict", "--bundle", str(tmp_path), "--out", str(tmp_path / "o"), str(tmp_path / "x.png")]) == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert f"{tmp_path} is not a neumo model bundle: no bundle.json" in line and "\n" not in line


def test_a_changed_bundle_file_and_a_newer_format_are_refused(kept, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(kept / "bundle-plain", copy)
    (copy / "ood.json").write_text("{}")
    with pytest.raises(ValueError, match="ood.json: 2 bytes with another sha256"):
        bundle.load(str(copy))
    info = json.loads((copy / bundle.INFO).read_text())
    (copy / bundle.INFO).write_text(json.dumps({**info, "version": bundle.VERSION + 1}))
    with pytest.raises(ValueError, match="bundle format version"):
        bundle.read_info(str(copy))


# --- the predict pipeline --------------------------------------------------------------------------

def _compiled(tmp_path, *args):
    from pipelines import predict as pipeline

    path = tmp_path / "predict.yaml"
    assert pipeline.main(["--compile", str(path), *args]) == 0
    return list(yaml.safe_load_all(path.read_text()))


def test_the_predict_pipeline_compiles_with_gpu_placement_and_a_loop_cap(tmp_path):
    spec, platform = _compiled(tmp_path, "--parallelism", "3", "--set", "shards=6", "--gpu-type", "NVIDIA_L4")
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert set(inputs) == {"bundle_uri", "images_uri", "predictions_uri", "shards"}
    assert inputs["shards"]["defaultValue"] == 6 and not inputs["bundle_uri"].get("isOptional")
    root = spec["root"]["dag"]["tasks"]
    (loop,) = [t for n, t in root.items() if n.startswith("for-loop")]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    (scoring,) = body.values()
    label = spec["components"][scoring["componentRef"]["name"]]["executorLabel"]
    assert executors[label]["container"]["resources"]["accelerator"]["resourceType"] == "NVIDIA_L4"
    assert k8s[label]["nodeSelector"] and k8s[label]["tolerations"] and scoring["retryPolicy"]["maxRetryCount"] == 2
    for name in ("predict-list", "predict-gather"):
        label = spec["components"][root[name]["componentRef"]["name"]]["executorLabel"]
        assert "accelerator" not in executors[label]["container"].get("resources", {}) and label not in k8s
    with pytest.raises(SystemExit, match="dataset_uri"):
        _compiled(tmp_path, "--set", "dataset_uri=x")


# The predict pipeline's local run: tests/test_bundle.py (an untrained bundle will do there).


def test_compiling_the_predict_pipeline_needs_only_kfp(tmp_path):
    """As tests/test_pipeline.py checks for full.py: TensorFlow, OpenCV, numpy and the library
    beyond the parameter declaration cannot be imported, and it still compiles."""
    compile_with_only_kfp(REPO_ROOT / "pipelines" / "predict.py", tmp_path / "p.yaml")
    assert (tmp_path / "p.yaml").stat().st_size > 5_000
