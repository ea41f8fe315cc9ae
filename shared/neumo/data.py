"""Preprocessed data on disk and the training input pipeline.

A prepared variant (one pixels x mask combination) is a folder:

    variant.json                    pixels, mask, clahe_clip, counts per fold, data version
    <fold>/shard-00000.npz          images uint8 (N, p, p) after CLAHE, targets int8 (N,), ids (N,)

Folds: `train` and `valid` (the seeded patient-level 0.8/0.2 split of the official train split),
`val` and `test` (the official splits), `unlabelled` (pretraining images). The expensive part
(decode, mask, resize, CLAHE) is done once; training only z-scores and augments.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass

import numpy as np

from neumo import storage

logger = logging.getLogger(__name__)

FOLDS = ("train", "valid", "val", "test", "unlabelled")
AUGMENTATIONS = ("none", "light", "strong")


@dataclass(frozen=True)
class Fold:
    """One fold in memory: uint8 images (N, p, p), int8 targets (N,) (-1 unlabelled), ids (N,)."""

    images: np.ndarray
    targets: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


def write_shard(uri: str, images: np.ndarray, targets: np.ndarray, ids: list[str]) -> None:
    """Write one shard atomically (storage.write_bytes), so a crash never leaves half a shard."""
    buf = io.BytesIO()
    np.savez(buf, images=images.astype(np.uint8), targets=np.asarray(targets, np.int8), ids=np.asarray(ids, str))
    storage.write_bytes(uri, buf.getvalue())


def read_shard(uri: str) -> Fold:
    with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as z:
        return Fold(z["images"], z["targets"], z["ids"])


def read_variant(uri: str) -> dict:
    """The variant.json of a prepared variant folder."""
    return json.loads(storage.read_text(storage.join(uri, "variant.json")))


def load_fold(uri: str, fold: str) -> Fold:
    """Every shard of `fold` in the prepared variant at `uri`, concatenated (possibly empty)."""
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS}, got {fold!r}")
    info = read_variant(uri)
    shards = [read_shard(u) for u in storage.list_files(storage.join(uri, fold), (".npz",))]
    if not shards:
        p = int(info["pixels"])
        return Fold(np.zeros((0, p, p), np.uint8), np.zeros((0,), np.int8), np.zeros((0,), str))
    return Fold(
        np.concatenate([s.images for s in shards]),
        np.concatenate([s.targets for s in shards]),
        np.concatenate([s.ids for s in shards]),
    )


def augmenter(kind: str, seed: int):
    """A Keras preprocessing block for float images in 0..255, or None for "none".

    Geometric changes (small rotations, shifts, zoom) and a random gamma; no left-right flip
    (the heart sits on the left: a flipped chest is not a plausible X-ray). Brightness and
    contrast shifts would be undone by the per-image z-score, so gamma (non-linear) stands in.
    """
    import keras

    if kind not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {kind!r}")
    if kind == "none":
        return None
    rot, shift, zoom, gamma = (0.014, 0.05, 0.05, 0.1) if kind == "light" else (0.028, 0.1, 0.12, 0.3)
    geometric = keras.Sequential(
        [
            keras.layers.RandomRotation(rot, fill_mode="constant", seed=seed),
            keras.layers.RandomTranslation(shift, shift, fill_mode="constant", seed=seed + 1),
            keras.layers.RandomZoom(zoom, fill_mode="constant", seed=seed + 2),
        ],
        name=f"augment_{kind}",
    )
    return geometric, gamma


def make_dataset(
    fold: Fold,
    batch_size: int = 8,
    augmentation: str = "none",
    shuffle: bool = False,
    seed: int = 0,
    sample_weights: np.ndarray | None = None,
    targets_as_images: bool = False,
):
    """tf.data of (z-scored float32 (B, p, p, 1), target float32 (B, 1)[, weights]).

    uint8 -> float -> augmentation -> per-image z-score -> batch -> prefetch. With
    `targets_as_images` the target is the z-scored image itself (autoencoder pretraining).
    """
    import tensorflow as tf

    from neumo.imaging import zscore_tf

    aug = augmenter(augmentation, seed)
    images = fold.images[..., None]
    tensors = (images, fold.targets.astype(np.float32)[:, None])
    if sample_weights is not None:
        tensors += (np.asarray(sample_weights, np.float32),)
    ds = tf.data.Dataset.from_tensor_slices(tensors)
    if shuffle:
        ds = ds.shuffle(min(len(fold), 10_000), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def transform(x, y, *w):
        x = tf.cast(x, tf.float32)
        if aug is not None:
            geometric, gamma = aug
            x = geometric(x, training=True)
            g = tf.exp(tf.random.uniform((tf.shape(x)[0], 1, 1, 1), -gamma, gamma, seed=seed))
            x = 255.0 * tf.pow(tf.clip_by_value(x / 255.0, 0.0, 1.0), g)
        x = zscore_tf(x[..., 0])
        if targets_as_images:
            y = x
        return (x, y, *w)

    return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def class_weights(targets: np.ndarray) -> dict[int, float]:
    """Balanced class weights n / (2 n_c) for targets in {0, 1}; 1.0 for an absent class."""
    n = len(targets)
    counts = [int(np.sum(targets == c)) for c in (0, 1)]
    return {c: (n / (2 * k) if k else 1.0) for c, k in enumerate(counts)}
