"""The preprocess stage: every manifest image -> (lung mask applied) -> the seed's chain up to
CLAHE -> uint8 shards per fold. The z-score is applied when read (neumo.data), so training never
repeats decode, resize or CLAHE."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from neumo import data as nd
from neumo import imaging, storage

logger = logging.getLogger(__name__)

SHARD_BYTES = 100 * 2**20


@dataclass(frozen=True)
class PreprocessConfig:
    """One data variant: output size, lung masking, CLAHE clip (None = OpenCV's default 40)."""

    pixels: int
    mask: bool = False
    clahe_clip: float | None = None
    workers: int = 0
    shard_bytes: int = SHARD_BYTES

    def __post_init__(self):
        if not isinstance(self.pixels, int) or self.pixels < 8:
            raise ValueError(f"pixels must be an integer >= 8, got {self.pixels!r}")
        imaging.clahe_limit(self.clahe_clip)
        if self.workers < 0 or self.shard_bytes < 1:
            raise ValueError(f"workers must be >= 0 (0 = one per core) and shard_bytes >= 1: {self}")


def mask_path(masks_uri: str, image_id: str) -> str:
    """Where the mask stage stores the lung mask of an image id."""
    return storage.join(masks_uri, "masks", os.path.splitext(image_id)[0] + ".png")


def prepare_one(args: tuple[str, str, int, float | None]) -> np.ndarray:
    """uint8 (p, p) for one image uri (and its mask uri or ""): the stored form of the seed chain."""
    uri, mask_uri, pixels, clip = args
    image = imaging.decode(storage.read_bytes(uri))
    if mask_uri:
        mask = imaging.read_grey(storage.read_bytes(mask_uri)) > 127
        image = imaging.apply_mask(imaging.to_grey(image), mask)
    return imaging.prepare_uint8(image, pixels, clip)


def run(manifest: list[dict], config: PreprocessConfig, out_uri: str, masks_uri: str = "", data_version: str = "") -> dict:
    """Write the variant folder (variant.json + <fold>/shard-NNNNN.npz); returns variant.json's dict."""
    if config.mask and not masks_uri:
        raise ValueError("a masked variant needs the mask stage's output (no lung-mask model was available)")
    per_shard = max(16, config.shard_bytes // (config.pixels * config.pixels))
    by_fold = defaultdict(list)
    for r in manifest:
        by_fold[r["fold"]].append(r)
    workers = config.workers or os.cpu_count() or 1
    start, counts = time.monotonic(), {}
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        for fold in nd.FOLDS:
            rows = sorted(by_fold.get(fold, []), key=lambda r: r["id"])
            counts[fold] = len(rows)
            for s, lo in enumerate(range(0, len(rows), per_shard)):
                chunk = rows[lo:lo + per_shard]
                jobs = [(r["uri"], mask_path(masks_uri, r["id"]) if config.mask else "", config.pixels, config.clahe_clip)
                        for r in chunk]
                images = list(pool.imap(prepare_one, jobs, chunksize=8)) if pool else [prepare_one(j) for j in jobs]
                nd.write_shard(storage.join(out_uri, fold, f"shard-{s:05d}.npz"), np.stack(images),
                               [r["target"] for r in chunk], [r["id"] for r in chunk])
                logger.info("preprocess %dpx mask=%s: %s %d/%d", config.pixels, config.mask, fold, lo + len(chunk), len(rows))
    finally:
        if pool:
            pool.close()
            pool.join()
    seconds = time.monotonic() - start
    info = {"pixels": config.pixels, "mask": config.mask, "clahe_clip": config.clahe_clip, "counts": counts,
            "data_version": data_version, "seconds": round(seconds, 2),
            "images_per_s": round(sum(counts.values()) / seconds, 1) if seconds else None}
    # variant.json last: a folder without it is an unfinished variant.
    storage.write_text(storage.join(out_uri, "variant.json"), json.dumps(info, indent=2))
    return info
