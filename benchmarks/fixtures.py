"""Prepared variants for the benchmarks, written straight as shards (no decode needed)."""

from __future__ import annotations

import json
import os

import numpy as np

from neumo import data as nd
from neumo import storage


def xray_stack(n: int, pixels: int, unique: int = 16) -> np.ndarray:
    """uint8 (n, pixels, pixels): `unique` synthetic chest X-rays after CLAHE, repeated."""
    import cv2

    from neumo import imaging, synthetic

    base = [imaging.prepare_uint8(synthetic.make_xray(i, pixels, pneumonia=bool(i % 2))[0], pixels)
            for i in range(min(unique, n))]
    _ = cv2  # the chain above is OpenCV's
    return np.stack([base[i % len(base)] for i in range(n)])


def write_variant(root: str, n: int, pixels: int, per_shard: int = 64, fold: str = "train") -> str:
    """A prepared variant folder with `n` images in `fold`, `per_shard` images a shard; returns it."""
    images = xray_stack(min(n, per_shard), pixels)
    names = []
    for s, lo in enumerate(range(0, n, per_shard)):
        k = min(per_shard, n - lo)
        names.append(f"shard-{s:05d}.npz")
        nd.write_shard(storage.join(root, fold, names[-1]), images[:k], np.arange(lo, lo + k) % 2,
                       [f"img{i:07d}" for i in range(lo, lo + k)])
    info = {"pixels": pixels, "mask": False, "clahe_clip": None, "counts": {fold: n},
            "shards": {f: (names if f == fold else []) for f in nd.FOLDS}}
    storage.write_text(storage.join(root, "variant.json"), json.dumps(info))
    os.sync() if hasattr(os, "sync") else None
    return root
