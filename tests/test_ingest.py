"""Ingest and validation: every file accounted for, patient-level split, local and gs:// sources."""

import json
import shutil
from collections import Counter

import pytest

from neumo import ingest, stages, storage, synthetic


@pytest.fixture(scope="module")
def messy_dataset(tmp_path_factory):
    """A small Kaggle-layout folder with a corrupt file, a duplicate, a text file, an unknown class
    folder, a misplaced file and an empty class folder."""
    root = tmp_path_factory.mktemp("messy") / "data"
    synthetic.write_kaggle(str(root), {"train": (6, 6), "val": (2, 2), "test": (2, 2)}, size=64, seed=3,
                           masks_uri=str(root.parent / "masks"))
    first = sorted((root / "train" / "NORMAL").iterdir())[0]
    shutil.copy(first, root / "train" / "NORMAL" / "copy of first.jpeg")
    (root / "train" / "PNEUMONIA" / "person999_bacteria_1.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    (root / "train" / "COVID").mkdir()
    shutil.copy(first, root / "train" / "COVID" / "x.jpeg")
    shutil.copy(sorted((root / "val" / "NORMAL").iterdir())[0], root / "stray.jpeg")
    (root / "test" / "EMPTY").mkdir()
    return root


def _by_uri(report):
    return {r["uri"].rsplit("/", 1)[-1]: r for r in report}


def test_report_accounts_for_every_file(messy_dataset):
    manifest, report, summary = ingest.scan(ingest.IngestConfig(str(messy_dataset)))
    files = [p for p in messy_dataset.rglob("*") if p.is_file()]
    assert summary["files"] == len(files) == len(report)
    assert summary["accepted"] + summary["rejected"] + summary["duplicate"] + summary["skipped"] == len(files)
    assert summary["accepted"] == len(manifest) == 6 + 6 + 2 + 2 + 2 + 2
    rows = _by_uri(report)
    assert rows["copy of first.jpeg"]["status"] == "duplicate"
    assert "same bytes as data/train/NORMAL/" in rows["copy of first.jpeg"]["reason"]
    assert rows["person999_bacteria_1.jpeg"]["status"] == "rejected"
    assert "undecodable" in rows["person999_bacteria_1.jpeg"]["reason"]
    assert "not an image file" in rows["notes.txt"]["reason"]
    assert "unknown class folder 'COVID'" in rows["x.jpeg"]["reason"]
    assert "layout" in rows["stray.jpeg"]["reason"]
    assert summary["empty_class_folders"] == ["test/EMPTY"]


def test_manifest_rows_and_patient_level_split(messy_dataset):
    manifest, _, summary = ingest.scan(ingest.IngestConfig(str(messy_dataset), masks_uri=str(messy_dataset.parent / "masks")))
    assert set(manifest[0]) == set(ingest.MANIFEST_COLUMNS)
    folds = Counter(r["fold"] for r in manifest)
    assert folds["val"] == 4 and folds["test"] == 4 and folds["train"] + folds["valid"] == 12
    assert folds["valid"] >= 2  # at least one patient of each class
    train_patients = {r["patient_id"] for r in manifest if r["fold"] == "train"}
    valid_patients = {r["patient_id"] for r in manifest if r["fold"] == "valid"}
    assert train_patients and valid_patients and not train_patients & valid_patients
    for label in ingest.CLASSES:
        assert any(r["label"] == label for r in manifest if r["fold"] == "valid")
    assert all(r["mask_uri"] for r in manifest)
    assert all(r["width"] == r["height"] == 64 and len(r["checksum"]) == 64 for r in manifest)


def test_split_is_seeded():
    rows = [{"split": "train", "patient_id": f"p{i}", "target": i % 2, "fold": ""} for i in range(40)]
    again = [dict(r) for r in rows]
    ingest.assign_folds(rows, 0.2, seed=1)
    ingest.assign_folds(again, 0.2, seed=1)
    assert [r["fold"] for r in rows] == [r["fold"] for r in again]
    assert Counter(r["fold"] for r in rows)["valid"] == 8


@pytest.mark.parametrize("name,patient", [
    ("person123_bacteria_456.jpeg", "person123"), ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"), ("00000013_005.png", "00000013"), ("odd.png", "odd"),
])
def test_patient_ids(name, patient):
    assert ingest.patient_id(f"data/train/X/{name}") == patient


def test_sampling_keeps_counts_reconciled(messy_dataset):
    manifest, report, summary = ingest.scan(ingest.IngestConfig(str(messy_dataset), sample_per_class=2))
    assert Counter((r["split"], r["label"]) for r in manifest)[("train", "PNEUMONIA")] <= 2
    assert summary["skipped"] > 0 and summary["files"] == len(report)


@pytest.mark.parametrize("kwargs,match", [
    ({"dataset_uri": ""}, "dataset_uri"), ({"dataset_uri": "x", "valid_fraction": 1.0}, "valid_fraction"),
    ({"dataset_uri": "x", "sample_per_class": -1}, "sample_per_class"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ingest.IngestConfig(**kwargs)


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no files under"):
        ingest.scan(ingest.IngestConfig(str(tmp_path / "nothing")))


def test_ingest_from_gcs_with_nih_pretraining_set(gcs_bucket, tmp_path):
    base = f"gs://{gcs_bucket}/kermany"
    synthetic.write_kaggle(base, {"train": (4, 4), "test": (1, 1)}, size=64, seed=5)
    synthetic.write_nih(f"gs://{gcs_bucket}/nih", 3, size=64, seed=6)
    summary = stages.ingest(dataset_uri=base, pretrain_uri=f"gs://{gcs_bucket}/nih", out_dir=str(tmp_path / "out"))
    assert summary["accepted"] == 13 and summary["folds"]["unlabelled"] == {"unlabelled": 3}
    manifest = stages.load_manifest(str(tmp_path / "out"))
    assert all(r["uri"].startswith(f"gs://{gcs_bucket}/") for r in manifest)
    assert {r["split"] for r in manifest} == {"train", "test", "unlabelled"}
    assert json.loads(storage.read_text(str(tmp_path / "out" / "summary.json")))["data_version"] == summary["data_version"]


def test_real_kermany_train_duplicates(shared_data):
    """The shared train split holds 24 groups of byte-identical images: each is reported."""
    manifest, report, summary = ingest.scan(ingest.IngestConfig(str(shared_data / "kermany_224")))
    assert summary["files"] == 5216 + 16
    assert summary["rejected"] == 0
    assert summary["duplicate"] >= 24
    assert summary["accepted"] + summary["duplicate"] == summary["files"]
    assert not ({r["patient_id"] for r in manifest if r["fold"] == "train"}
                & {r["patient_id"] for r in manifest if r["fold"] == "valid"})
