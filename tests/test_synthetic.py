"""neumo.synthetic: deterministic synthetic chest X-rays and the data sets written from them."""

from __future__ import annotations

import re
import time

import cv2
import numpy as np
import pytest

from neumo import imaging
from neumo.synthetic import make_xray, write_kaggle, write_nih

NORMAL_RE = re.compile(r"^IM-(\d{4})-(\d{4})\.jpeg$")
PNEUMONIA_RE = re.compile(r"^person(\d+)_(bacteria|virus)_(\d+)\.jpeg$")
NIH_RE = re.compile(r"^(\d{8})_(\d{3})\.png$")


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC of a score separating pos from neg."""
    ranks = np.concatenate([pos, neg]).argsort().argsort() + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def test_make_xray_contract_and_determinism():
    image, mask = make_xray(11)
    assert image.dtype == np.uint8 and image.shape == (256, 256)
    assert mask.dtype == np.uint8 and mask.shape == (256, 256)
    assert set(np.unique(mask)) <= {0, 255}
    again = make_xray(11)
    assert image.tobytes() == again[0].tobytes() and mask.tobytes() == again[1].tobytes()
    other = make_xray(12)
    assert not np.array_equal(image, other[0]) and not np.array_equal(mask, other[1])
    small, small_mask = make_xray(11, 96, pneumonia=True)
    assert small.shape == small_mask.shape == (96, 96)
    assert image.std() > 20  # not a flat image


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_mask_covers_two_dark_lung_fields(seed):
    image, mask = make_xray(seed, 128)
    lung = mask > 0
    qa = imaging.mask_qa(lung)
    assert qa["flags"] == [] and qa["components"] == 2
    assert 0.08 < qa["lung_fraction"] < 0.4
    ring = (cv2.dilate(mask, np.ones((9, 9), np.uint8)) > 0) & ~lung  # tissue just outside
    assert image[lung].mean() + 15 < image[ring].mean()
    # the two fields lie either side of the midline
    cols = np.nonzero(lung.any(axis=0))[0]
    assert cols.min() < 64 < cols.max() and not lung[:, 62:66].all(axis=0).any()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pneumonia_differs_only_inside_lungs(seed):
    normal, mask = make_xray(seed, 128)
    sick, sick_mask = make_xray(seed, 128, pneumonia=True)
    assert np.array_equal(mask, sick_mask)
    diff = sick.astype(int) - normal.astype(int)
    near_lungs = cv2.dilate(mask, np.ones((15, 15), np.uint8)) > 0
    assert np.abs(diff[~near_lungs]).max() <= 1
    assert diff[mask > 0].mean() > 1.5  # opacities brighten the lungs
    assert (diff[mask > 0] > 10).sum() > 30  # as patches, not a uniform shift


def test_mean_brightness_alone_is_a_weak_cue():
    normal = np.array([make_xray(1000 + i, 64)[0].mean() for i in range(120)])
    sick = np.array([make_xray(2000 + i, 64, pneumonia=True)[0].mean() for i in range(120)])
    assert 0.3 < _auc(sick, normal) < 0.7


def test_anatomy_seed_shares_anatomy():
    a = make_xray(1, 64, anatomy_seed=5)
    assert not np.array_equal(a[0], make_xray(2, 64, anatomy_seed=5)[0])
    assert np.array_equal(a[0], make_xray(1, 64, anatomy_seed=5)[0])

    def iou(m: np.ndarray, n: np.ndarray) -> float:
        return float(((m > 0) & (n > 0)).sum() / max(((m > 0) | (n > 0)).sum(), 1))

    # the pose jitters per image, so compare on average: same patient overlaps more
    same = [iou(make_xray(2 * i, 128, anatomy_seed=100 + i)[1],
                make_xray(2 * i + 1, 128, anatomy_seed=100 + i)[1]) for i in range(12)]
    other = [iou(make_xray(2 * i, 128, anatomy_seed=100 + i)[1],
                 make_xray(2 * i + 1, 128, anatomy_seed=200 + i)[1]) for i in range(12)]
    assert np.mean(same) > np.mean(other)


def test_make_xray_speed():
    make_xray(0)
    start = time.perf_counter()
    for i in range(40):
        make_xray(i, 256, pneumonia=bool(i % 2))
    rate = 40 / (time.perf_counter() - start)
    assert rate > 60, f"{rate:.0f} images/s at 256 px"  # ~250/s on an idle core; lenient for CI


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"seed": 1.5}, {"seed": 0, "size": 4},
                                    {"seed": 0, "size": "a"}, {"seed": True}])
def test_make_xray_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_xray(**kwargs)


def _tree(root) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            split, cls, name = path.relative_to(root).parts
            out.setdefault(split, {}).setdefault(cls, []).append(name)
    return out


def test_write_kaggle_layout_names_and_patients(tmp_path):
    counts = {"train": (9, 12), "test": (4, 5), "val": (1, 1)}
    images, masks = tmp_path / "images", tmp_path / "masks"
    n = write_kaggle(str(images), counts, size=64, seed=3, masks_uri=str(masks))
    assert n == sum(a + b for a, b in counts.values())
    tree = _tree(images)
    assert set(tree) == set(counts)
    patients: dict[str, dict[str, set]] = {"NORMAL": {}, "PNEUMONIA": {}}
    per_patient: dict[tuple, int] = {}
    for split, (n_normal, n_pneumonia) in counts.items():
        assert len(tree[split].get("NORMAL", [])) == n_normal
        assert len(tree[split].get("PNEUMONIA", [])) == n_pneumonia
        for cls, names in tree[split].items():
            for name in names:
                match = (NORMAL_RE if cls == "NORMAL" else PNEUMONIA_RE).match(name)
                assert match, name
                patient = int(match.group(1))
                patients[cls].setdefault(split, set()).add(patient)
                per_patient[(cls, patient)] = per_patient.get((cls, patient), 0) + 1
                image = cv2.imread(str(images / split / cls / name), cv2.IMREAD_UNCHANGED)
                assert image.shape == (64, 64) and image.dtype == np.uint8
                mask = cv2.imread(str(masks / split / cls / (name.rsplit(".", 1)[0] + ".png")),
                                  cv2.IMREAD_UNCHANGED)
                assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    for cls, by_split in patients.items():  # no patient in two splits
        splits = list(by_split)
        for i, a in enumerate(splits):
            for b in splits[i + 1:]:
                assert not by_split[a] & by_split[b], (cls, a, b)
    assert max(per_patient.values()) >= 2 and max(per_patient.values()) <= 3
    assert _tree(masks) == {s: {c: [x.replace(".jpeg", ".png") for x in v] for c, v in d.items()}
                            for s, d in tree.items()}
    numbers = [int(PNEUMONIA_RE.match(x).group(3)) for d in tree.values() for x in d["PNEUMONIA"]]
    assert len(set(numbers)) == len(numbers)  # image numbers run over the class, as in Kermany


def test_write_kaggle_is_deterministic_and_accepts_file_uri(tmp_path):
    counts = {"train": (2, 3)}
    assert write_kaggle(f"file://{tmp_path / 'a'}", counts, size=48, seed=9) == 5
    assert write_kaggle(str(tmp_path / "b"), counts, size=48, seed=9) == 5
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpeg"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.jpeg"))
    assert files_a == files_b and len(files_a) == 5
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    write_kaggle(str(tmp_path / "c"), counts, size=48, seed=10)
    content = lambda folder: b"".join(p.read_bytes() for p in sorted(folder.rglob("*.jpeg")))  # noqa: E731
    assert content(tmp_path / "c") != content(tmp_path / "a")


def test_write_kaggle_empty_class_and_bad_counts(tmp_path):
    assert write_kaggle(str(tmp_path / "x"), {"train": (0, 2)}, size=32) == 2
    assert not (tmp_path / "x" / "train" / "NORMAL").exists()
    for bad in ({}, {"train": (1,)}, {"train": (-1, 2)}, {"a/b": (1, 1)}, {"train": (1.5, 1)},
                [("train", (1, 1))]):
        with pytest.raises(ValueError):
            write_kaggle(str(tmp_path / "y"), bad, size=32)
    with pytest.raises(ValueError):
        write_kaggle(str(tmp_path / "y"), {"train": (1, 1)}, size=32, jpeg_quality=101)


def test_write_nih_flat_pngs(tmp_path):
    assert write_nih(str(tmp_path), 9, size=48, seed=1) == 9
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 9 and all(NIH_RE.match(x) for x in names)
    by_patient: dict[str, list[int]] = {}
    for name in names:
        patient, index = NIH_RE.match(name).groups()
        by_patient.setdefault(patient, []).append(int(index))
    assert all(v == list(range(len(v))) for v in by_patient.values())
    assert len(by_patient) < 9  # some patients have several images
    image = imaging.decode((tmp_path / names[0]).read_bytes())
    assert image.shape == (48, 48) and image.dtype == np.uint8
    assert write_nih(str(tmp_path / "empty"), 0) == 0
    with pytest.raises(ValueError):
        write_nih(str(tmp_path), -1)


def test_write_kaggle_and_nih_to_gcs(gcs_bucket):
    from neumo import storage

    root = f"gs://{gcs_bucket}/kaggle"
    assert write_kaggle(root, {"train": (2, 2), "test": (1, 1)}, size=32, seed=2,
                        masks_uri=f"gs://{gcs_bucket}/masks") == 6
    images = storage.list_files(root, (".jpeg",))
    assert len(images) == 6 and all("/NORMAL/" in x or "/PNEUMONIA/" in x for x in images)
    assert len(storage.list_files(f"gs://{gcs_bucket}/masks", (".png",))) == 6
    assert imaging.read_grey(storage.read_bytes(images[0])).shape == (32, 32)
    assert write_nih(f"gs://{gcs_bucket}/nih", 3, size=32) == 3
    assert len(storage.list_files(f"gs://{gcs_bucket}/nih", (".png",))) == 3
