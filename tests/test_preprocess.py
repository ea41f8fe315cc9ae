"""neumo.preprocess: the stage's shards are the seed chain, identical with any number of workers,
sized by rule, and a crashed run never looks complete."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from neumo import data as nd
from neumo import imaging, preprocess, storage, synthetic

PIXELS = 32


def _write_set(root, n: int = 40, size: int = 64, folds=("train", "valid", "test")) -> list[dict]:
    """n synthetic PNGs (with lung masks under root/masks) and their manifest rows, folds in turn."""
    rows = []
    for i in range(n):
        image, mask = synthetic.make_xray(i, size, pneumonia=bool(i % 2))
        image_id = f"img{i:03d}.png"
        path = os.path.join(root, "images", image_id)
        storage.write_bytes(path, cv2.imencode(".png", image)[1].tobytes())
        storage.write_bytes(preprocess.mask_path(str(root), image_id), cv2.imencode(".png", mask)[1].tobytes())
        rows.append({"id": image_id, "uri": path, "fold": folds[i % len(folds)], "target": i % 2})
    return rows


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return str(root), _write_set(root)


def _files(folder) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name.endswith(".npz"):
                with open(os.path.join(dirpath, name), "rb") as fh:
                    out[os.path.relpath(os.path.join(dirpath, name), folder)] = fh.read()
    return out


def test_workers_give_byte_identical_shards(image_set, tmp_path):
    root, rows = image_set
    cfg = dict(pixels=PIXELS, mask=True, shard_bytes=8 * PIXELS * PIXELS, acquisition_copies=0)  # 8 images a shard: several shards
    one = preprocess.prepare_variant(rows, preprocess.PreprocessConfig(workers=1, **cfg), str(tmp_path / "one"), root)
    two = preprocess.prepare_variant(rows, preprocess.PreprocessConfig(workers=2, **cfg), str(tmp_path / "two"), root)
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(a) >= 5 and a == b
    assert one["shards"] == two["shards"] and one["counts"] == two["counts"]
    assert (one["workers"], two["workers"]) == (1, 2)


@pytest.mark.parametrize("mask", [False, True])
def test_stored_form_then_zscore_is_the_seed_chain(image_set, tmp_path, mask):
    root, rows = image_set
    out = str(tmp_path / "v")
    preprocess.prepare_variant(rows, preprocess.PreprocessConfig(acquisition_copies=0, pixels=PIXELS, mask=mask, clahe_clip=2.0, workers=1), out, root)
    for fold in ("train", "valid", "test"):
        stored = nd.load_fold(out, fold)
        for image, image_id in zip(stored.images, stored.ids):
            decoded = imaging.decode(storage.read_bytes(os.path.join(root, "images", image_id)))
            if mask:
                m = imaging.read_grey(storage.read_bytes(preprocess.mask_path(root, image_id))) > 127
                decoded = imaging.apply_mask(imaging.to_grey(decoded), m)
            expected = imaging.prepare(decoded, PIXELS, 2.0)
            assert np.max(np.abs(imaging.zscore(image) - expected)) < 1e-4


def test_crash_leaves_no_variant_json(image_set, tmp_path):
    root, rows = image_set
    bad = [dict(r) for r in rows]
    bad[len(bad) // 2]["uri"] = os.path.join(root, "images", "missing.png")
    out = tmp_path / "crashed"
    with pytest.raises(FileNotFoundError) as err:
        preprocess.prepare_variant(bad, preprocess.PreprocessConfig(acquisition_copies=0, pixels=PIXELS, workers=2, shard_bytes=4 * PIXELS**2), str(out))
    assert any("missing.png" in note for note in getattr(err.value, "__notes__", []))
    assert not (out / "variant.json").exists()
    assert not [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".npz")]  # no half-written files
    with pytest.raises(FileNotFoundError):
        nd.load_fold(str(out), "train")


def test_readers_trust_only_listed_shards(image_set, tmp_path):
    root, rows = image_set
    out = tmp_path / "v"
    info = preprocess.prepare_variant(rows, preprocess.PreprocessConfig(acquisition_copies=0, pixels=PIXELS, workers=1), str(out))
    nd.write_shard(str(out / "train" / "shard-09999.npz"), np.zeros((1, PIXELS, PIXELS), np.uint8), [0], ["stale"])
    fold = nd.load_fold(str(out), "train")
    assert "stale" not in set(fold.ids) and len(fold) == info["counts"]["train"]


@pytest.mark.parametrize("n, pixels, shard_bytes, expected", [
    (5216, 512, preprocess.SHARD_BYTES, 400),        # Kermany train at 512: 100 MB shards (14 of them)
    (5216, 256, preprocess.SHARD_BYTES, 522),        # at 256 the 10-shard rule wins: 10 shards of 34 MB
    (112_120, 512, preprocess.SHARD_BYTES, 400),     # NIH: 281 shards of 100 MB
    (100, 256, preprocess.SHARD_BYTES, 16),          # small folds: shards of 16 images (7 shards)
    (1000, 64, 64 * 64 * 3, 3),                      # shard_bytes caps below MIN_SHARD_IMAGES
    (0, 64, preprocess.SHARD_BYTES, 16),
])
def test_images_per_shard(n, pixels, shard_bytes, expected):
    per = preprocess.images_per_shard(n, pixels, shard_bytes)
    assert per == expected
    assert per * pixels * pixels <= max(shard_bytes, pixels * pixels)
    if n >= preprocess.MIN_SHARDS * preprocess.MIN_SHARD_IMAGES:
        assert -(-n // per) >= preprocess.MIN_SHARDS


def test_shard_layout_on_disk(tmp_path):
    rows = _write_set(tmp_path, n=50, size=32, folds=("train",))
    out = tmp_path / "v"
    info = preprocess.prepare_variant(rows, preprocess.PreprocessConfig(acquisition_copies=0, pixels=16, workers=1), str(out))
    names = info["shards"]["train"]
    assert names == [f"shard-{i:05d}.npz" for i in range(4)]  # 50 images, 16 a shard
    assert [len(nd.read_shard(str(out / "train" / n))) for n in names] == [16, 16, 16, 2]
    assert info["shards"]["test"] == [] and info["counts"]["train"] == 50


@pytest.mark.parametrize("bad", [dict(pixels=4), dict(pixels=64, workers=-1), dict(pixels=64, min_shards=0),
                                 dict(pixels=64, clahe_clip=3.0)])
def test_config_rejects(bad):
    with pytest.raises(ValueError):
        preprocess.PreprocessConfig(**bad)


def test_masked_variant_needs_masks():
    with pytest.raises(ValueError, match="mask"):
        preprocess.prepare_variant([], preprocess.PreprocessConfig(acquisition_copies=0, pixels=64, mask=True), "/nonexistent")


def test_acquisition_copies_only_for_train_and_reproducible(image_set, tmp_path):
    root, rows = image_set
    cfg = dict(pixels=PIXELS, mask=True, acquisition_copies=2, shard_bytes=8 * PIXELS * PIXELS)
    one = preprocess.prepare_variant(rows, preprocess.PreprocessConfig(workers=1, **cfg), str(tmp_path / "one"), root)
    preprocess.prepare_variant(rows, preprocess.PreprocessConfig(workers=2, **cfg), str(tmp_path / "two"), root)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")  # the copies too: byte for byte
    assert one["acquisition_copies"] == 2
    train = nd.load_fold(str(tmp_path / "one"), "train")
    originals = [r["id"] for r in rows if r["fold"] == "train"]
    assert one["counts"]["train"] == len(originals) and len(train) == 3 * len(originals)
    assert sorted(train.ids) == sorted(originals + [f"{i}~acq{k}" for k in (1, 2) for i in originals])
    plain = nd.load_fold(str(tmp_path / "one"), "valid")
    assert all(preprocess.COPY_MARK not in i for i in plain.ids)
    by_id = dict(zip(train.ids, train.images))
    for i in originals:  # each copy is the same chest, changed, with the same label
        assert not np.array_equal(by_id[i], by_id[f"{i}~acq1"]) and not np.array_equal(by_id[i], by_id[f"{i}~acq2"])
    targets = dict(zip(train.ids, train.targets))
    assert all(targets[f"{i}~acq1"] == targets[i] for i in originals)
    # copy 0 (no copies) is exactly the seed chain's variant
    base = preprocess.prepare_variant(rows, preprocess.PreprocessConfig(acquisition_copies=0, workers=1, pixels=PIXELS, mask=True), str(tmp_path / "b"), root)
    assert base["acquisition_copies"] == 0
    plain_train = nd.load_fold(str(tmp_path / "b"), "train")
    stored = dict(zip(plain_train.ids, plain_train.images))
    assert all(np.array_equal(stored[i], by_id[i]) for i in originals)


@pytest.mark.parametrize("copies", [-1, 5, 1.5])
def test_acquisition_copies_rejects(copies):
    with pytest.raises(ValueError, match="acquisition_copies"):
        preprocess.PreprocessConfig(pixels=64, acquisition_copies=copies)
