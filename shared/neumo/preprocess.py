"""The preprocess stage: every manifest image -> (lung mask applied) -> the seed's chain up to
CLAHE -> uint8 shards per fold. The z-score is applied when read (neumo.data), so training never
repeats decode, resize or CLAHE.

The stage streams: workers read each image from storage themselves (a folder or gs://), at most
three shards of results are held at a time (one computing, one queued, one being written), and each shard is written whole (storage.write_bytes
is atomic) as soon as it is complete. variant.json, written last, lists the shards and marks the
variant complete: a crashed run leaves no variant.json, and readers only trust listed shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from neumo import data as nd
from neumo import imaging, ingest, parameters, shifts, storage

logger = logging.getLogger(__name__)

#: Target size of one shard at scale (TFRecord guidance: 100 MB+ per file).
SHARD_BYTES = 100 * 2**20
#: Split a fold into at least this many shards when it has enough images (>= 10 files per reading host).
MIN_SHARDS = 10
#: Never make shards smaller than this many images (unless shard_bytes forces it).
MIN_SHARD_IMAGES = 16
#: Most acquisition copies of each train image (each one adds a train fold's worth of training time).
MAX_COPIES = 4
#: Marks the id of an acquisition copy: "<image id>~acq<k>".
COPY_MARK = "~acq"
#: Log progress at most this often (seconds), and at the end of every fold.
LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class PreprocessConfig:
    """One data variant: output size, lung masking, CLAHE clip (None or 0 = OpenCV's default 40).

    `acquisition_copies`: extra copies of every TRAIN-fold image, each through a random other
    acquisition (`acquisition`: shifts.ACQUISITIONS) before the seed's chain: augmentation
    that must happen before CLAHE to be realistic, so it is stored once here rather than drawn
    per batch. Stored after the originals with ids "<id>~acq<k>". The valid fold is also stored
    under each fixed shift of shifts.SHIFTS (the "shifted" fold) for the shift-aware selection score.
    `workers`: processes decoding in parallel (0 = one per core, 1 = in this process).
    `shard_bytes`: the largest shard; `min_shards`: shards per fold wanted when it has enough images.
    """

    pixels: int
    mask: bool = False
    clahe_clip: float | None = parameters.default("clahe_clip")
    acquisition_copies: int = parameters.default("acquisition_copies")
    acquisition: str = parameters.default("acquisition")
    workers: int = 0
    shard_bytes: int = SHARD_BYTES
    min_shards: int = MIN_SHARDS

    def __post_init__(self):
        if self.clahe_clip == 0 and not isinstance(self.clahe_clip, bool):
            object.__setattr__(self, "clahe_clip", None)  # the pipeline parameter's 0 = OpenCV's default
        if not isinstance(self.pixels, int) or self.pixels < 8:
            raise ValueError(f"pixels must be an integer >= 8, got {self.pixels!r}")
        imaging.clahe_limit(self.clahe_clip)
        if not isinstance(self.acquisition_copies, int) or not 0 <= self.acquisition_copies <= MAX_COPIES:
            raise ValueError(f"acquisition_copies must be an integer in 0..{MAX_COPIES}, got {self.acquisition_copies!r}")
        parameters.parse("acquisition", self.acquisition)  # one of the declared choices, or a clear error
        if self.workers < 0 or self.shard_bytes < 1 or self.min_shards < 1:
            raise ValueError(f"workers must be >= 0 (0 = one per core), shard_bytes and min_shards >= 1: {self}")


def images_per_shard(n: int, pixels: int, shard_bytes: int = SHARD_BYTES, min_shards: int = MIN_SHARDS) -> int:
    """Images per shard for a fold of `n` images: at most shard_bytes per shard; at least
    `min_shards` shards when that leaves MIN_SHARD_IMAGES or more in each."""
    cap = max(1, shard_bytes // (pixels * pixels))
    return max(1, min(cap, max(MIN_SHARD_IMAGES, math.ceil(n / min_shards))))


def mask_path(masks_uri: str, image_id: str) -> str:
    """Where the mask stage stores the lung mask of an image id: `<masks>/masks/<id>.png`, keyed by
    the whole id, extension kept (`data/train/NORMAL/x.jpeg.png`), so `x.jpeg` and `x.png` in one
    folder get a mask each. A name over the file system's 255-byte limit once `.png` is added
    keeps its start plus a hash of the whole id: still one mask per id, and every name fits."""
    folder, _, name = image_id.rpartition("/")
    name += ".png"
    if len(os.fsencode(name)) > 255:
        digest = f"~{hashlib.sha256(os.fsencode(image_id)).hexdigest()[:16]}.png"
        while len(os.fsencode(name + digest)) > 255:
            name = name[:-1]
        name += digest
    return storage.join(masks_uri, "masks", folder, name)


def prepare_one(args: tuple) -> np.ndarray:
    """uint8 (p, p) for one image: the stored form of the seed chain.

    args: (image uri, mask uri or "", pixels, CLAHE clip, image id, acquisition copy, bytes,
    sha256, acquisition kind, shift name or ""). The file is checked against the size and sha256 ingest recorded (ingest.read_verified:
    a file changed since ingest is refused by name); rows without them (hand-made lists in tests
    and benchmarks) are read unchecked. Copy 0 is the image as acquired; copy k > 0 first passes
    the raw (masked) image through a random acquisition (shifts.acquisition), drawn from (copy, id)
    so any worker makes the same bytes. Every error names the image (id and uri) or its mask.
    """
    uri, mask_uri, pixels, clip, image_id, copy, size, checksum, kind, shift = args
    row = {"id": image_id, "uri": uri, "bytes": size, "checksum": checksum}
    try:
        try:
            # bytes verified as those ingest accepted need not be watched for damage again
            data = ingest.read_verified(row) if checksum else storage.read_bytes(uri)
            image = imaging.decode(data, check_damage=not checksum)
        except imaging.ImageError as err:  # rebuilt with the name: the message is what the CLI shows
            raise imaging.ImageError(f"image {image_id} ({uri}): {err}") from err
        mask = None
        if mask_uri:
            try:
                mask = imaging.read_grey(storage.read_bytes(mask_uri)) > 127
            except imaging.ImageError as err:
                raise imaging.ImageError(f"lung mask {mask_uri} of image {image_id}: {err}") from err
        return variant_image(image, pixels, clip, mask, copy, image_id, kind, shift)
    except Exception as err:  # name the image (notes survive the pool's pickling); re-raised as is
        err.add_note(f"while preprocessing {image_id} ({uri})")
        raise


def variant_image(image: np.ndarray, pixels: int, clip: float | None, lung_mask: np.ndarray | None = None,
                  copy: int = 0, image_id: str = "", acquisition: str = parameters.default("acquisition"),
                  shift: str = "") -> np.ndarray:
    """Decoded image (uint8 grey/BGR/BGRA) [+ its boolean lung mask, same size] -> uint8 (pixels, pixels):
    the stored form of the seed chain (mask applied, then acquisition copy `copy` > 0 of kind
    `acquisition` drawn from (copy, image_id), or the fixed shift `shift` of shifts.SHIFTS, then
    grey, resize, CLAHE). The one chain the preprocess stage and `neumo predict` (neumo.predict) both run."""
    if lung_mask is not None:
        image = imaging.apply_mask(imaging.to_grey(image), lung_mask)
    if copy:
        image = shifts.acquisition(imaging.to_grey(image), shifts.acquisition_rng(image_id, copy), acquisition)
    if shift:
        image = shifts.SHIFTS[shift](imaging.to_grey(image))
    return imaging.prepare_uint8(image, pixels, clip)


def _init_worker() -> None:
    """Pool worker: one OpenCV thread, so N workers use N cores without oversubscription."""
    import cv2

    cv2.setNumThreads(1)


def _shard_jobs(manifest: list[dict], config: PreprocessConfig, masks_uri: str):
    """[(fold, shard index, rows, jobs)] for every shard, in the order they are written."""
    by_fold = defaultdict(list)
    for r in manifest:
        if r["fold"] not in nd.FOLDS or r["fold"] in nd.DERIVED:
            raise ValueError(f"manifest row {r.get('id')!r} has fold {r['fold']!r}, not one of "
                             f"{tuple(f for f in nd.FOLDS if f not in nd.DERIVED)}")
        by_fold[r["fold"]].append(r)
    plan = []
    for fold in nd.FOLDS:
        # (row, acquisition copy, shift): copy 0 and no shift is the image as acquired
        if fold == "shifted":
            rows = sorted(by_fold.get("valid", []), key=lambda r: r["id"])
            copies = [(r, 0, name) for name in shifts.SHIFTS for r in rows]
        else:
            rows = sorted(by_fold.get(fold, []), key=lambda r: r["id"])
            copies = [(r, 0, "") for r in rows]
        if fold == "train":
            copies += [(r, k, "") for k in range(1, config.acquisition_copies + 1) for r in rows]
        per = images_per_shard(len(copies), config.pixels, config.shard_bytes, config.min_shards)
        for s, lo in enumerate(range(0, len(copies), per)):
            chunk = copies[lo:lo + per]
            jobs = [(r["uri"], mask_path(masks_uri, r["id"]) if config.mask else "", config.pixels,
                     config.clahe_clip, r["id"], k, r.get("bytes"), r.get("checksum"), config.acquisition, shift)
                    for r, k, shift in chunk]
            stored = [{**r, "id": f"{r['id']}{COPY_MARK}{k}"} if k else
                      {**r, "id": shifts.shifted_id(r["id"], shift)} if shift else r for r, k, shift in chunk]
            plan.append((fold, s, stored, jobs))
    return by_fold, plan


def prepare_variant(manifest: list[dict], config: PreprocessConfig, out_uri: str, masks_uri: str = "", data_version: str = "",
                    mask_model: dict | None = None) -> dict:
    """Write the variant folder (<fold>/shard-NNNNN.npz, then variant.json); returns variant.json's dict.
    `mask_model`: what made the masks of a masked variant (the mask stage's record), kept in variant.json.

    Shards are identical, byte for byte, whatever the number of workers.
    """
    if config.mask and not masks_uri:
        raise ValueError("a masked variant needs the mask stage's output (no lung-mask model was available)")
    by_fold, plan = _shard_jobs(manifest, config, masks_uri)
    total = sum(len(rows) for _, _, rows, _ in plan)
    workers = max(1, min(config.workers or os.cpu_count() or 1, total))
    logger.info("preprocess %dpx mask=%s: %d images in %d shards, %d worker(s)", config.pixels, config.mask,
                total, len(plan), workers)
    start, done, last_log = time.monotonic(), 0, 0.0
    shards: dict[str, list[str]] = {fold: [] for fold in nd.FOLDS}
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) if workers > 1 else None
    # One writer thread: shard n is encoded and written (GIL released in crc32 and file/network I/O)
    # while shard n+1 is computed; waiting for it before the next keeps memory at two shards.
    writer, written = ThreadPoolExecutor(1, thread_name_prefix="shard-writer"), None
    try:
        chunksize = 4
        pending = None  # the next shard is queued while this one is written: at most two in memory
        for i, (fold, s, rows, jobs) in enumerate(plan):
            if pool is None:
                images = [prepare_one(j) for j in jobs]
            else:
                result = pending if pending is not None else pool.map_async(prepare_one, jobs, chunksize)
                pending = pool.map_async(prepare_one, plan[i + 1][3], chunksize) if i + 1 < len(plan) else None
                images = result.get()
            name = f"shard-{s:05d}.npz"
            if written is not None:
                written.result()  # raises if the previous write failed
            written = writer.submit(nd.write_shard, storage.join(out_uri, fold, name), np.stack(images),
                                    [r["target"] for r in rows], [r["id"] for r in rows])
            shards[fold].append(name)
            done += len(rows)
            now = time.monotonic() - start
            last_of_fold = i + 1 == len(plan) or plan[i + 1][0] != fold
            if now - last_log >= LOG_EVERY_S or last_of_fold:
                last_log = now
                rate = done / now if now else 0.0
                logger.info("preprocess %dpx mask=%s: %s shard %d, %d/%d images, %.1f images/s, ETA %.0f s",
                            config.pixels, config.mask, fold, s + 1, done, total, rate,
                            (total - done) / rate if rate else 0.0)
        if written is not None:
            written.result()
    finally:
        writer.shutdown(wait=True)
        if pool:
            pool.terminate()  # every result is in hand (or a job failed): nothing left to wait for
            pool.join()
    seconds = time.monotonic() - start
    counts = {fold: len(by_fold.get(fold, [])) for fold in nd.FOLDS if fold not in nd.DERIVED}
    info = {"pixels": config.pixels, "mask": config.mask, "clahe_clip": config.clahe_clip,
            "acquisition_copies": config.acquisition_copies, "acquisition": config.acquisition,
            "shifts": list(shifts.SHIFTS), "shifted_images": counts["valid"] * len(shifts.SHIFTS), "counts": counts,
            "mask_model": (mask_model or {"source": "unknown"}) if config.mask else {"source": "none"},
            "data_version": data_version, "seconds": round(seconds, 2),
            "images_per_s": round(total / seconds, 1) if seconds else None, "workers": workers,
            "shards": shards}
    # variant.json last: a folder without it is an unfinished variant.
    storage.write_text(storage.join(out_uri, "variant.json"), json.dumps(info, indent=2))
    return info
