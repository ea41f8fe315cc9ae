"""neumo.data: shard format, the streamed training dataset against the in-memory one, augmentation
"none" as identity, class weights and the precision default."""

from __future__ import annotations

import numpy as np
import pytest

from neumo import data as nd
from neumo import imaging, storage

PIXELS = 16


def _variant(root, sizes=(7, 5, 9), fold="train", pixels=PIXELS) -> nd.Fold:
    """A prepared variant with shards of `sizes` images in `fold` (and an empty valid fold)."""
    rng = np.random.default_rng(0)
    names, parts = [], []
    for s, k in enumerate(sizes):
        images = rng.integers(0, 256, (k, pixels, pixels), dtype=np.uint8)
        targets = rng.integers(0, 2, k).astype(np.int8)
        ids = [f"s{s}_{i}" for i in range(k)]
        names.append(f"shard-{s:05d}.npz")
        nd.write_shard(storage.join(str(root), fold, names[-1]), images, targets, ids)
        parts.append(nd.Fold(images, targets, np.asarray(ids)))
    info = {"pixels": pixels, "mask": False, "clahe_clip": None, "counts": {fold: sum(sizes)},
            "shards": {fold: names, "valid": []}}
    storage.write_text(storage.join(str(root), "variant.json"), __import__("json").dumps(info))
    return nd.Fold(*(np.concatenate([getattr(p, a) for p in parts]) for a in ("images", "targets", "ids")))


def _epoch(ds) -> tuple[np.ndarray, np.ndarray, list]:
    xs, ys, ws = [], [], []
    for batch in ds:
        xs.append(batch[0].numpy())
        ys.append(batch[1].numpy())
        if len(batch) > 2:
            ws.append(batch[2].numpy())
    return np.concatenate(xs), np.concatenate(ys), ws


def _rows(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """Each (image, target) as bytes, sorted: the multiset of one epoch."""
    return sorted(np.round(xi, 4).tobytes() + yi.tobytes() for xi, yi in zip(x, y))


def test_shard_round_trip_and_reproducible_bytes(tmp_path):
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    a = nd.shard_bytes(images, [0, 1], ["a", "b"])
    assert a == nd.shard_bytes(images, np.array([0, 1]), ["a", "b"])
    nd.write_shard(str(tmp_path / "s.npz"), images, [0, 1], ["a", "b"])
    shard = nd.read_shard(str(tmp_path / "s.npz"))
    assert shard.images.dtype == np.uint8 and shard.targets.dtype == np.int8
    np.testing.assert_array_equal(shard.images, images)
    assert list(shard.ids) == ["a", "b"] and list(shard.targets) == [0, 1]
    with np.load(tmp_path / "s.npz") as z:  # still a plain .npz
        np.testing.assert_array_equal(z["images"], images)


@pytest.mark.parametrize("cache_bytes", [0, nd.CACHE_BYTES])
def test_stream_same_order_as_memory_without_shuffle(tmp_path, cache_bytes):
    fold = _variant(tmp_path)
    mem = _epoch(nd.make_dataset(nd.load_fold(str(tmp_path), "train"), batch_size=4))
    for _ in range(2):  # second pass reads the cache when there is one
        streamed = _epoch(nd.stream_dataset(str(tmp_path), "train", batch_size=4, cache_bytes=cache_bytes))
        np.testing.assert_array_equal(streamed[0], mem[0])
        np.testing.assert_array_equal(streamed[1], mem[1])
    np.testing.assert_array_equal(mem[1][:, 0], fold.targets.astype(np.float32))


@pytest.mark.parametrize("cache_bytes", [0, nd.CACHE_BYTES])
def test_stream_shuffled_epoch_is_the_same_multiset(tmp_path, cache_bytes):
    _variant(tmp_path)
    mem = _epoch(nd.make_dataset(nd.load_fold(str(tmp_path), "train"), batch_size=4))
    ds = nd.stream_dataset(str(tmp_path), "train", batch_size=4, shuffle=True, seed=3, cache_bytes=cache_bytes)
    first, second = _epoch(ds), _epoch(ds)
    assert _rows(*first[:2]) == _rows(*mem[:2]) == _rows(*second[:2])
    assert not np.array_equal(first[0], mem[0])  # actually shuffled
    assert not np.array_equal(first[0], second[0])  # and reshuffled each epoch


def test_stream_matches_zscore_and_seed_chain(tmp_path):
    fold = _variant(tmp_path)
    x, _, _ = _epoch(nd.stream_dataset(str(tmp_path), "train", batch_size=5))
    assert x.shape == (len(fold), PIXELS, PIXELS, 1) and x.dtype == np.float32
    assert np.max(np.abs(x - imaging.zscore(fold.images))) < 1e-4


def test_augmentation_none_is_identity_before_zscore(tmp_path):
    fold = _variant(tmp_path)
    for ds in (nd.make_dataset(fold, 4, "none"), nd.stream_dataset(str(tmp_path), "train", 4, "none")):
        x, y, _ = _epoch(ds)
        np.testing.assert_array_equal(x, imaging.zscore(fold.images))
    assert nd.augmenter("none", 0) is None


def test_augmentation_light_changes_images_keeps_shape(tmp_path):
    fold = _variant(tmp_path, pixels=32)
    x, y, _ = _epoch(nd.stream_dataset(str(tmp_path), "train", 4, "light", seed=1))
    assert x.shape == (len(fold), 32, 32, 1) and np.all(np.isfinite(x))
    assert not np.allclose(x, imaging.zscore(fold.images), atol=1e-3)
    np.testing.assert_array_equal(y[:, 0], fold.targets)


def test_strong_augmentation_adds_grain_to_some_images():
    """Detector grain: on a flat image only the noise can change pixels, so some images of a
    strong batch turn grainy (std up to nd._AUG_RANGES["strong"][4]) and others stay flat."""
    import tensorflow as tf

    flat = tf.fill((64, 32, 32, 1), 128.0)
    out = nd.augmenter("strong", seed=3)(flat).numpy()
    centre = out[:, 8:24, 8:24, 0]  # away from the zero fill of shifts and rotations
    stds = centre.reshape(64, -1).std(axis=1)
    grainy = stds > 1.0
    assert 10 < grainy.sum() < 54  # about half
    assert stds.max() < 1.2 * nd._AUG_RANGES["strong"][4]
    assert out.min() >= 0 and out.max() <= 255


def test_stream_class_weights_and_targets_as_images(tmp_path):
    fold = _variant(tmp_path)
    cw = nd.class_weights(fold.targets)
    x, y, ws = _epoch(nd.stream_dataset(str(tmp_path), "train", 4, class_weights=cw))
    np.testing.assert_allclose(np.concatenate(ws), np.where(fold.targets == 1, cw[1], cw[0]), rtol=1e-6)
    x2, y2, _ = _epoch(nd.stream_dataset(str(tmp_path), "train", 4, targets_as_images=True))
    np.testing.assert_array_equal(x2, y2)
    mem = _epoch(nd.make_dataset(fold, 4, sample_weights=np.where(fold.targets == 1, cw[1], cw[0])))
    np.testing.assert_allclose(np.concatenate(mem[2]), np.concatenate(ws), rtol=1e-6)


def test_stream_rejects(tmp_path):
    _variant(tmp_path)
    with pytest.raises(ValueError, match="no shards"):
        nd.stream_dataset(str(tmp_path), "valid")
    with pytest.raises(ValueError, match="fold must be"):
        nd.stream_dataset(str(tmp_path), "training")
    with pytest.raises(ValueError):
        nd.stream_dataset(str(tmp_path), "train", readers=0)


def test_load_fold_of_empty_fold(tmp_path):
    _variant(tmp_path)
    empty = nd.load_fold(str(tmp_path), "valid")
    assert len(empty) == 0 and empty.images.shape == (0, PIXELS, PIXELS)


def test_default_precision_on_this_cpu():
    assert nd.default_precision() == "float32"  # no GPU in the test environment
