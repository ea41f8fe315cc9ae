"""Preprocessed data on disk and the training input pipeline.

A prepared variant (one pixels x mask combination) is a folder:

    variant.json                    pixels, mask, clahe_clip, counts and shard names per fold, data version
    <fold>/shard-00000.npz          images uint8 (N, p, p) after CLAHE, targets int8 (N,), ids (N,)

Folds: `train` and `valid` (the seeded patient-level 0.8/0.2 split of the official train split),
`val` and `test` (the official splits), `unlabelled` (pretraining images), `shifted` (the valid
images under each acquisition shift of the suite, made by preprocess). The expensive part
(decode, mask, resize, CLAHE) is done once; training only z-scores and augments.

Two ways in: :func:`load_fold` + :func:`make_dataset` hold a fold in memory (evaluation, small
folds); :func:`stream_dataset` reads the shards in parallel as it goes (training at any scale),
caching the fold in memory when it fits in ``cache_bytes``. Both yield the same batches.
Shards are plain uncompressed .npz files, written byte-for-byte reproducibly.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import zipfile
from dataclasses import dataclass

import numpy as np

from neumo import storage
from neumo.trial import AUGMENTATIONS  # the trial vocabulary: augmenter() implements each

logger = logging.getLogger(__name__)

FOLDS = ("train", "valid", "val", "test", "unlabelled", "shifted")
#: Folds the preprocess stage derives (never a manifest's): "shifted", the valid fold's images under
#: each acquisition shift of neumo.shifts.SHIFTS (ids "<id>~shift:<name>"), for the selection score.
DERIVED = ("shifted",)
#: A fold whose stored images fit in this many bytes is cached in memory after the first epoch.
CACHE_BYTES = 2 * 2**30
#: Memory for the element shuffle buffer of a streamed (uncached) fold.
SHUFFLE_BYTES = 512 * 2**20
#: Shards read at once by a streamed dataset (each shard is held whole while it is read).
READERS = 4
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Fold:
    """One fold in memory: uint8 images (N, p, p), int8 targets (N,) (-1 unlabelled), ids (N,)."""

    images: np.ndarray
    targets: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


def shard_bytes(images: np.ndarray, targets: np.ndarray, ids: list[str]) -> bytes:
    """The .npz bytes of one shard, byte-for-byte reproducible (fixed zip timestamps, no compression)."""
    arrays = {"images": np.ascontiguousarray(images, dtype=np.uint8), "targets": np.asarray(targets, np.int8),
              "ids": np.asarray(ids, str)}
    buf = io.BytesIO()
    # np.savez stamps each member with the current time; a fixed date makes equal shards equal bytes.
    # The array data goes in as a memoryview (no tobytes copy): shards are up to 100 MB.
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            with zf.open(info, "w", force_zip64=True) as fh:
                # format 1.0 as np.save writes it (our dtypes and shapes keep the header tiny)
                np.lib.format.write_array_header_1_0(fh, np.lib.format.header_data_from_array_1_0(array))
                fh.write(memoryview(array).cast("B") if array.size else b"")
    return buf.getvalue()


def write_shard(uri: str, images: np.ndarray, targets: np.ndarray, ids: list[str]) -> None:
    """Write one shard atomically (storage.write_bytes), so a crash never leaves half a shard."""
    storage.write_bytes(uri, shard_bytes(images, targets, ids))


def parse_shard(data: bytes) -> Fold:
    """A shard's .npz bytes -> Fold (no pickles allowed)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return Fold(z["images"], z["targets"], z["ids"])


def read_shard(uri: str) -> Fold:
    return parse_shard(storage.read_bytes(uri))


def shard_ids(uri: str) -> np.ndarray:
    """The ids of one shard, without its images: np.load reads .npz members on demand, and
    storage.open_read fetches a remote object by ranges, so only the ids member is read."""
    with storage.open_read(uri) as f, np.load(f, allow_pickle=False) as z:
        return z["ids"]


def read_variant(uri: str) -> dict:
    """The variant.json of a prepared variant folder."""
    return json.loads(storage.read_text(storage.join(uri, "variant.json")))


def _check_fold(fold: str) -> None:
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS}, got {fold!r}")


def shard_uris(uri: str, fold: str, info: dict | None = None) -> list[str]:
    """The shards of `fold`, in order: those variant.json lists (so files left by an earlier,
    crashed run are never read), else (variants written before the list existed) a listing."""
    _check_fold(fold)
    info = read_variant(uri) if info is None else info
    listed = info.get("shards", {}).get(fold) if isinstance(info.get("shards"), dict) else None
    if listed is not None:
        return [storage.join(uri, fold, name) for name in listed]
    return storage.list_files(storage.join(uri, fold), (".npz",))


def load_fold(uri: str, fold: str) -> Fold:
    """Every shard of `fold` in the prepared variant at `uri`, concatenated (possibly empty).

    Holds the whole fold in memory: for evaluation and small folds. Training streams with
    :func:`stream_dataset`.
    """
    _check_fold(fold)
    info = read_variant(uri)
    shards = [read_shard(u) for u in shard_uris(uri, fold, info)]
    if not shards:
        p = int(info["pixels"])
        return Fold(np.zeros((0, p, p), np.uint8), np.zeros((0,), np.int8), np.zeros((0,), str))
    return Fold(
        np.concatenate([s.images for s in shards]),
        np.concatenate([s.targets for s in shards]),
        np.concatenate([s.ids for s in shards]),
    )


#: Augmentation strengths: rotation (fraction of a full turn), shift and zoom (fractions of the
#: image side), gamma (log-range of the random exponent), detector grain (largest noise std, grey
#: levels). The grain is added after the seed's CLAHE, where a noisy detector's grain ends up:
#: noise of std 12 on a raw image measures as std ~30 on the stored images (the INTER_LINEAR
#: resize keeps it, CLAHE amplifies it), so strong draws up to 30. Without it a classifier reads
#: grain as opacity (benchmarks/science.py).
_AUG_RANGES = {"light": (0.014, 0.05, 0.05, 0.1, 8.0), "strong": (0.028, 0.1, 0.2, 0.3, 30.0)}


def augmenter(kind: str, seed: int):
    """A batch augmentation for float32 (B, p, p, 1) images in 0..255 (same shape out), or None for "none".

    Geometric changes (small rotations, shifts, zoom, drawn per image and applied as ONE affine
    resampling, bilinear, zero fill), a random gamma and, on half the images, detector grain
    (Gaussian noise of a random std); no left-right flip (the heart sits on the
    left: a flipped chest is not a plausible X-ray). Brightness and contrast shifts would be undone
    by the per-image z-score, so gamma (non-linear) stands in. The same ranges as Keras'
    RandomRotation/RandomTranslation/RandomZoom, at a third of their cost (one resampling, not three).
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {kind!r}")
    if kind == "none":
        return None
    rot, shift, zoom, gamma, grain = _AUG_RANGES[kind]

    def augment(x):
        import math

        import tensorflow as tf

        shape = tf.shape(x)
        b, h, w = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)

        def draw(k, lo, hi):
            return tf.random.uniform((b,), lo, hi, seed=seed + k)

        angle = draw(0, -rot, rot) * 2.0 * math.pi
        tx, ty = draw(1, -shift, shift) * w, draw(2, -shift, shift) * h
        scale = 1.0 + draw(3, -zoom, zoom)  # > 1 samples a larger area: zooms out
        cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
        cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
        # output pixel (x, y) reads input ((cos, -sin), (sin, cos)) @ (x - cx, y - cy) + (cx, cy) - (tx, ty)
        transforms = tf.stack([cos, -sin, cx - cos * cx + sin * cy - tx,
                               sin, cos, cy - sin * cx - cos * cy - ty,
                               tf.zeros_like(cos), tf.zeros_like(cos)], axis=1)
        x = tf.raw_ops.ImageProjectiveTransformV3(
            images=x, transforms=transforms, output_shape=shape[1:3], fill_value=0.0,
            interpolation="BILINEAR", fill_mode="CONSTANT")
        g = tf.exp(draw(4, -gamma, gamma))[:, None, None, None]
        # (x/255)**g as exp(g log(x/255)): 3x faster than tf.pow with a broadcast exponent; log 0 -> 0
        x = 255.0 * tf.exp(g * tf.math.log(tf.clip_by_value(x / 255.0, 0.0, 1.0)))
        # half the images get detector grain of a random std in (0, grain)
        std = tf.maximum(draw(5, -grain, grain), 0.0)[:, None, None, None]
        return tf.clip_by_value(x + std * tf.random.normal(tf.shape(x), seed=seed + 6), 0.0, 255.0)

    return augment


def _batches(ds, batch_size: int, augmentation: str, seed: int, targets_as_images: bool, weigh=None):
    """Elements (uint8 (p, p, 1), float32 (1,)[, w]) -> batched, augmented, z-scored, prefetched.

    The tail shared by the in-memory and the streamed datasets, so both deliver the same tensors.
    `weigh` maps a target batch (B, 1) to sample weights (B,), appended to each batch.
    """
    import tensorflow as tf

    from neumo.imaging import zscore_tf

    aug = augmenter(augmentation, seed)
    ds = ds.batch(batch_size)

    def transform(x, y, *w):
        x = tf.cast(x, tf.float32)
        if aug is not None:
            x = aug(x)
        x = zscore_tf(x[..., 0])
        if weigh is not None:
            w = (weigh(y),)
        if targets_as_images:
            y = x
        return (x, y, *w)

    return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def make_dataset(
    fold: Fold,
    batch_size: int = 8,
    augmentation: str = "none",
    shuffle: bool = False,
    seed: int = 0,
    sample_weights: np.ndarray | None = None,
    targets_as_images: bool = False,
):
    """tf.data of (z-scored float32 (B, p, p, 1), target float32 (B, 1)[, weights]) from a fold in memory.

    uint8 -> float -> augmentation -> per-image z-score -> batch -> prefetch. With
    `targets_as_images` the target is the z-scored image itself (autoencoder pretraining).
    For training on a prepared variant prefer :func:`stream_dataset`, which never holds the fold.
    """
    import tensorflow as tf

    images = fold.images[..., None]
    tensors = (images, fold.targets.astype(np.float32)[:, None])
    if sample_weights is not None:
        tensors += (np.asarray(sample_weights, np.float32),)
    ds = tf.data.Dataset.from_tensor_slices(tensors)
    if shuffle:
        ds = ds.shuffle(min(len(fold), 10_000), seed=seed, reshuffle_each_iteration=True)
    return _batches(ds, batch_size, augmentation, seed, targets_as_images)


def _read_arrays(uri, select=None) -> tuple[np.ndarray, np.ndarray]:
    """tf.numpy_function body: shard uri (bytes) -> (uint8 (N, p, p, 1), float32 (N, 1)), only the
    images whose ids `select` (ids -> boolean mask) keeps when given."""
    shard = read_shard(uri.decode() if isinstance(uri, bytes) else str(uri))
    keep = slice(None) if select is None else np.asarray(select(shard.ids), bool)
    return shard.images[keep][..., None], shard.targets[keep].astype(np.float32)[:, None]


def stream_dataset(
    variant_uri: str,
    fold: str,
    batch_size: int = 8,
    augmentation: str = "none",
    shuffle: bool = False,
    seed: int = 0,
    class_weights: dict | None = None,
    targets_as_images: bool = False,
    cache_bytes: int = CACHE_BYTES,
    readers: int = READERS,
    shuffle_bytes: int = SHUFFLE_BYTES,
):
    """tf.data over the shards of `fold` in a prepared variant, without loading the fold.

    Yields the same batches as ``make_dataset(load_fold(variant_uri, fold), ...)``: in the same
    order with ``shuffle=False``, the same images per epoch with ``shuffle=True``. Up to `readers`
    shards are read in parallel (through neumo.storage: local, file:// or gs://), so memory is a
    few shards plus the shuffle buffer (`shuffle_bytes` of images). A fold whose stored size is at most
    `cache_bytes` is kept in memory after the first epoch. `class_weights` ({0: w0, 1: w1})
    appends a per-image weight to each batch, as ``sample_weights`` does in make_dataset.
    """
    info = read_variant(variant_uri)
    uris = shard_uris(variant_uri, fold, info)
    if not uris:
        raise ValueError(f"fold {fold!r} of {variant_uri} has no shards")
    return stream_shards(uris, int(info["pixels"]), int(info.get("counts", {}).get(fold, 0)), batch_size,
                         augmentation, shuffle, seed, class_weights, targets_as_images, cache_bytes, readers,
                         shuffle_bytes)


def stream_shards(
    uris: list[str],
    pixels: int,
    count: int,
    batch_size: int = 8,
    augmentation: str = "none",
    shuffle: bool = False,
    seed: int = 0,
    class_weights: dict | None = None,
    targets_as_images: bool = False,
    cache_bytes: int = CACHE_BYTES,
    readers: int = READERS,
    shuffle_bytes: int = SHUFFLE_BYTES,
    select=None,
):
    """:func:`stream_dataset` over given shards of `pixels` px images: `count` images in all (after
    `select`), which sizes the cache and the shuffle buffer. `select` (ids -> boolean mask, a
    picklable callable) keeps only some images of each shard as it is read, so memory stays a few
    shards plus the shuffle buffer (and the cache, only when `count` images fit in `cache_bytes`)."""
    import tensorflow as tf

    p, n = int(pixels), int(count)
    if not uris:
        raise ValueError("stream_shards needs at least one shard uri")
    if readers < 1 or batch_size < 1:
        raise ValueError(f"readers and batch_size must be >= 1, got {readers} and {batch_size}")
    cached = n * p * p <= cache_bytes
    files = tf.data.Dataset.from_tensor_slices(list(uris))
    if shuffle and not cached:
        files = files.shuffle(len(uris), seed=seed, reshuffle_each_iteration=True)
    body = _read_arrays if select is None else functools.partial(_read_arrays, select=select)

    def read(uri):
        images, targets = tf.numpy_function(body, [uri], (tf.uint8, tf.float32), stateful=False)
        images.set_shape((None, p, p, 1))
        targets.set_shape((None, 1))
        return images, targets

    ds = files.map(read, num_parallel_calls=min(readers, len(uris)), deterministic=True).prefetch(1).unbatch()
    if cached:
        ds = ds.cache()
    if shuffle:
        buffer = n if cached else min(n, max(1, shuffle_bytes // (p * p)))
        ds = ds.shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=True)
    weigh = None
    if class_weights is not None:
        table = tf.constant([float(class_weights.get(0, 1.0)), float(class_weights.get(1, 1.0))], tf.float32)

        def weigh(y):
            return tf.gather(table, tf.clip_by_value(tf.cast(y[:, 0], tf.int32), 0, 1))
    return _batches(ds, batch_size, augmentation, seed, targets_as_images, weigh)


def default_precision() -> str:
    """The Keras dtype policy to train with: "mixed_float16" where the backend sees a GPU, else "float32".

    Mixed precision is about 2.6x faster on tensor-core GPUs (../shared/docs/ANCHORS.md) and slower on CPUs.
    Call ``keras.mixed_precision.set_global_policy(default_precision())`` before building a
    model; Keras then wraps the optimizer in a LossScaleOptimizer at compile.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpu = bool(tf.config.list_physical_devices("GPU"))
    elif backend == "jax":
        import jax

        gpu = any(d.platform == "gpu" for d in jax.devices())
    elif backend == "torch":
        import torch

        gpu = torch.cuda.is_available()
    else:
        gpu = False
    return "mixed_float16" if gpu else "float32"


def class_weights(targets: np.ndarray) -> dict[int, float]:
    """Balanced class weights n / (2 n_c) for targets in {0, 1}; 1.0 for an absent class."""
    n = len(targets)
    counts = [int(np.sum(targets == c)) for c in (0, 1)]
    return {c: (n / (2 * k) if k else 1.0) for c, k in enumerate(counts)}
