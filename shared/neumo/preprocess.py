"""The preprocess stage: every manifest image -> (lung mask applied) -> the seed's chain up to
CLAHE -> uint8 shards per fold. The z-score is applied when read (neumo.data), so training never
repeats decode, resize or CLAHE.

The stage streams: workers read each image from storage themselves (a folder or gs://) and write
whole shards themselves (storage.write_bytes is atomic), so memory is one shard per worker (with
one worker: one computing, one being written) and the main process does no per-image work. variant.json, written last, lists the shards and marks the
variant complete: a crashed run leaves no variant.json, and readers only trust listed shards.

For a large dataset the stage runs as parts across pods: part k of n writes its contiguous share of
the same shard plan (balanced by images) under its own folder with a part record (part.json), and
gather_variant copies every part's shards to where one pod would have written them and writes
variant.json last: the same bytes as one pod, variant.json's timing fields aside (TIMING).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from bisect import bisect_left
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
#: The record a preprocess part writes beside its shards (prepare_variant with parts > 1).
PART_RECORD = "part.json"
#: variant.json's fields that measure the run, not the variant: gathered parts give seconds = the
#: parts' seconds summed (pod time spent), images_per_s = images / those seconds (the rate of one
#: pod), workers = the most workers one part used.
TIMING = ("seconds", "images_per_s", "workers")
#: Files copied at once by a gather (object stores answer each request slowly, many at once well).
COPY_THREADS = 16


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


def check_part(part: int, parts: int) -> None:
    """Part `part` of `parts` must be an integer in 0..parts-1, `parts` an integer >= 1."""
    if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        raise ValueError(f"parts must be an integer >= 1, got {parts!r}")
    if not isinstance(part, int) or isinstance(part, bool) or not 0 <= part < parts:
        raise ValueError(f"part must be an integer in 0..{parts - 1} (parts={parts}), got {part!r}")


def split_plan(plan: list, parts: int) -> list[list]:
    """The plan in `parts` contiguous ranges holding about as many images each (a part may be
    empty when there are fewer shards than parts). Deterministic: every pod computes the same split."""
    cum = [0]
    for _, _, rows, _ in plan:
        cum.append(cum[-1] + len(rows))
    cuts = [0]
    for k in range(1, parts):
        target = cum[-1] * k / parts
        i = bisect_left(cum, target)  # cum[i] >= target > cum[i - 1]
        if i > 0 and target - cum[i - 1] <= cum[i] - target:
            i -= 1  # the nearer boundary
        cuts.append(max(cuts[-1], i))
    cuts.append(len(plan))
    return [plan[lo:hi] for lo, hi in zip(cuts, cuts[1:])]


def _plan_key(plan: list, described: dict) -> str:
    """A digest of everything a part's shards depend on (the plan: every image, copy, shift, target
    and setting; and the variant's description): parts of one variant share it, a foreign one does not."""
    h = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    for fold, s, rows, jobs in plan:
        h.update(json.dumps([fold, s, [r["id"] for r in rows], [r["target"] for r in rows], jobs],
                            default=str).encode())
    return h.hexdigest()


def _prepare_shard(task: tuple) -> int:
    """Pool worker: compute one shard's images and write the shard itself; returns its image count.
    The worker writes, so the main process only hands out jobs: no image crosses a pipe."""
    uri, targets, ids, jobs = task
    nd.write_shard(uri, np.stack([prepare_one(j) for j in jobs]), targets, ids)
    return len(jobs)


def _write_shards(plan: list, config: PreprocessConfig, out_uri: str) -> tuple[float, int]:
    """Write <fold>/shard-NNNNN.npz under out_uri for every plan item; (seconds, workers used).

    One worker: this process computes shard n+1 while a writer thread encodes and writes shard n
    (at most two in memory). N workers: each worker computes and writes whole shards (one shard
    per worker in memory), so the main process does no per-image work and N workers use N cores."""
    total = sum(len(rows) for _, _, rows, _ in plan)
    workers = max(1, min(config.workers or os.cpu_count() or 1, total))
    logger.info("preprocess %dpx mask=%s: %d images in %d shards, %d worker(s)", config.pixels, config.mask,
                total, len(plan), workers)
    start, done, last_log = time.monotonic(), 0, 0.0
    tasks = [(storage.join(out_uri, fold, f"shard-{s:05d}.npz"), [r["target"] for r in rows],
              [r["id"] for r in rows], jobs) for fold, s, rows, jobs in plan]
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) if workers > 1 else None
    writer, written = ThreadPoolExecutor(1, thread_name_prefix="shard-writer"), None
    try:
        if pool is None:
            def one(task):
                nonlocal written
                uri, targets, ids, jobs = task
                images = np.stack([prepare_one(j) for j in jobs])
                if written is not None:
                    written.result()  # raises if the previous write failed
                written = writer.submit(nd.write_shard, uri, images, targets, ids)
                return len(jobs)

            counts = map(one, tasks)
        else:
            counts = pool.imap(_prepare_shard, tasks, chunksize=1)  # in plan order, as shards finish
        for i, n in enumerate(counts):
            fold, s = plan[i][0], plan[i][1]
            done += n
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
            pool.terminate()  # every shard is written (or one failed): nothing left to wait for
            pool.join()
    return time.monotonic() - start, workers


def _timing(images: int, seconds: float, workers: int) -> dict:
    """variant.json's TIMING fields for `images` prepared in `seconds` by `workers` processes."""
    return {"seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1) if seconds else None,
            "workers": workers}


def prepare_variant(manifest: list[dict], config: PreprocessConfig, out_uri: str, masks_uri: str = "", data_version: str = "",
                    mask_model: dict | None = None, part: int = 0, parts: int = 1) -> dict:
    """Write the variant folder (<fold>/shard-NNNNN.npz, then variant.json); returns variant.json's dict.
    `mask_model`: what made the masks of a masked variant (the mask stage's record), kept in variant.json.

    With parts > 1, only part `part` of the shard plan (split_plan) is written, at the same paths
    under out_uri, then its part record (PART_RECORD, returned): gather_variant makes the variant.
    Shards are identical, byte for byte, whatever the number of workers or parts.
    """
    check_part(part, parts)
    if config.mask and not masks_uri:
        raise ValueError("a masked variant needs the mask stage's output (no lung-mask model was available)")
    by_fold, plan = _shard_jobs(manifest, config, masks_uri)
    counts = {fold: len(by_fold.get(fold, [])) for fold in nd.FOLDS if fold not in nd.DERIVED}
    info = {"pixels": config.pixels, "mask": config.mask, "clahe_clip": config.clahe_clip,
            "acquisition_copies": config.acquisition_copies, "acquisition": config.acquisition,
            "shifts": list(shifts.SHIFTS), "shifted_images": counts["valid"] * len(shifts.SHIFTS), "counts": counts,
            "mask_model": (mask_model or {"source": "unknown"}) if config.mask else {"source": "none"},
            "data_version": data_version, **dict.fromkeys(TIMING),
            "shards": {fold: [f"shard-{s:05d}.npz" for f, s, _, _ in plan if f == fold] for fold in nd.FOLDS}}
    mine = split_plan(plan, parts)[part] if parts > 1 else plan
    seconds, workers = _write_shards(mine, config, out_uri)
    images = sum(len(rows) for _, _, rows, _ in mine)
    if parts > 1:
        record = {"part": part, "parts": parts, "key": _plan_key(plan, info), "images": images,
                  "seconds": seconds, "workers": workers,
                  "files": [f"{fold}/shard-{s:05d}.npz" for fold, s, _, _ in mine], "variant": info}
        storage.write_text(storage.join(out_uri, PART_RECORD), json.dumps(record, indent=2))
        return record
    info.update(_timing(images, seconds, workers))
    # variant.json last: a folder without it is an unfinished variant.
    storage.write_text(storage.join(out_uri, "variant.json"), json.dumps(info, indent=2))
    return info


def read_parts(part_uris: list[str], record: str, what: str) -> list[dict]:
    """The part records (`record` in each folder) of one split, checked: each folder holds one, every
    part 0..n-1 is there once and in order, all share one key (the same manifest and settings).
    Anything else is refused with one line naming the part: a gather must not mix or miss work."""
    if not part_uris:
        raise ValueError(f"{what} gather: no parts given")
    records = []
    for uri in part_uris:
        try:
            records.append(json.loads(storage.read_text(storage.join(uri, record))))
        except FileNotFoundError:
            raise ValueError(f"{what} gather: {uri} holds no {record}: not a {what} part") from None
    n = records[0]["parts"]
    seen: dict[int, str] = {}
    for uri, r in zip(part_uris, records):
        if r["parts"] != n:
            raise ValueError(f"{what} gather: {uri} is part {r['part']} of {r['parts']}, the first given of {n}: "
                             "parts of different splits")
        if r["part"] in seen:
            raise ValueError(f"{what} gather: part {r['part']} of {n} given twice ({seen[r['part']]} and {uri})")
        seen[r["part"]] = uri
        if r["key"] != records[0]["key"]:
            raise ValueError(f"{what} gather: part {r['part']} ({uri}) was made from another manifest or settings "
                             f"than part {records[0]['part']} ({part_uris[0]})")
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise ValueError(f"{what} gather: part(s) {', '.join(map(str, missing))} of {n} missing: give every part")
    order = [r["part"] for r in records]
    if order != list(range(n)):
        raise ValueError(f"{what} gather: parts given in the order {order}: give them in order 0..{n - 1}")
    return records


def copy_files(pairs: list[tuple[str, str]]) -> None:
    """Copy each (source uri, destination uri), COPY_THREADS at a time (storage.copy: atomic, and
    server-side within GCS)."""
    with ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="copy") as pool:
        list(pool.map(lambda pair: storage.copy(*pair), pairs))  # list(): re-raises the first failure


def gather_variant(part_uris: list[str], out_uri: str) -> dict:
    """The variant folder one pod would have written, from the folders of its parts (in order):
    every shard copied to the same path under out_uri, then variant.json, last, with the same
    content except TIMING (summed seconds, the images per second they give, the most workers)."""
    records = read_parts(part_uris, PART_RECORD, "preprocess")
    info = records[0]["variant"]
    files = [f for r in records for f in r["files"]]
    listed = [f"{fold}/{name}" for fold, names in info["shards"].items() for name in names]
    if files != listed:  # the same key gives the same split: only a hand-edited record lands here
        raise ValueError(f"preprocess gather: the parts hold {len(files)} shards, not the variant's {len(listed)}")
    copy_files([(storage.join(uri, f), storage.join(out_uri, f)) for uri, r in zip(part_uris, records)
                for f in r["files"]])
    info.update(_timing(sum(r["images"] for r in records), sum(r["seconds"] for r in records),
                        max(r["workers"] for r in records)))
    logger.info("preprocess gather: %d shards of %d parts in %s", len(files), len(records), out_uri)
    storage.write_text(storage.join(out_uri, "variant.json"), json.dumps(info, indent=2))
    return info
