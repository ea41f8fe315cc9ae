"""Ingest and validation: a dataset URI in -> a manifest and a report accounting for every file.

Layouts: Kaggle (`split/CLASS/file`, split in train/val/test, CLASS in NORMAL/PNEUMONIA) and
NIH (a flat folder of unlabelled images). Every file ends as exactly one report row: accepted,
rejected (with the reason), duplicate (same bytes as an accepted file) or skipped (not sampled);
so files in = accepted + rejected + duplicate + skipped. Accepted files make the manifest, with a
seeded, stratified, patient-level 0.8/0.2 train/valid split of the official train split.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from neumo import imaging, parameters, storage

logger = logging.getLogger(__name__)

CLASSES = ("NORMAL", "PNEUMONIA")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
MANIFEST_COLUMNS = ["id", "uri", "split", "fold", "label", "target", "patient_id", "width", "height",
                    "bytes", "checksum", "mask_uri"]
REPORT_COLUMNS = ["uri", "status", "reason", "id"]
#: Share of the official train split's patients held out as the "valid" fold (the group's 0.8/0.2).
VALID_FRACTION = 0.2


@dataclass(frozen=True)
class IngestConfig:
    """What to read: the labelled dataset, optional lung masks and an optional unlabelled set."""

    dataset_uri: str
    masks_uri: str = ""
    pretrain_uri: str = ""
    valid_fraction: float = VALID_FRACTION
    sample_per_class: int = parameters.default("sample_per_class")
    seed: int = parameters.default("seed")

    def __post_init__(self):
        if not self.dataset_uri:
            raise ValueError("dataset_uri is required: a folder or gs://bucket/prefix in Kaggle layout")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in (0, 1), got {self.valid_fraction}")
        if self.sample_per_class < 0:
            raise ValueError(f"sample_per_class must be >= 0 (0 = all), got {self.sample_per_class}")


def patient_id(name: str) -> str:
    """The patient a Kermany or NIH file name belongs to (the file stem when no rule matches).

    `person123_bacteria_456.jpeg` -> person123; `IM-0115-0001.jpeg` -> IM-0115;
    `NORMAL2-IM-1427-0001.jpeg` -> NORMAL2-IM-1427; NIH `00000013_005.png` -> 00000013.
    """
    stem = os.path.splitext(os.path.basename(name))[0]
    for pattern in (r"^(person\d+)_", r"^((?:NORMAL2-)?IM-\d+)-\d+", r"^(\d{8})_\d+$"):
        m = re.match(pattern, stem)
        if m:
            return m.group(1)
    return stem


def _classify(rel: str, labelled: bool) -> tuple[str, str, str]:
    """(split, label, rejection reason) of a relative path."""
    parts = rel.split("/")
    if not parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return "", "", f"not an image file (suffix not in {IMAGE_SUFFIXES})"
    if not labelled:
        return "unlabelled", "", ""
    if len(parts) != 3:
        return "", "", "not in the split/CLASS/file layout"
    split, label = parts[0].lower(), parts[1].upper()
    if split not in SPLITS:
        return "", "", f"unknown split folder {parts[0]!r} (expected one of {SPLITS})"
    if label not in CLASSES:
        return "", "", f"unknown class folder {parts[1]!r} (expected one of {CLASSES})"
    return split, label, ""


def _unsafe_local(uri: str, base: str) -> str:
    """Why a local dataset file must not be read (a link out of the dataset, not a regular file), or ""."""
    path, root = storage.local_path(uri), storage.local_path(base)
    if path is None or root is None:
        return ""  # object stores have no links; their names are checked by storage.relative
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.islink(path) and os.path.commonpath([real, real_root]) != real_root:
        return f"link outside the dataset (points to {real})"
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        return f"unreadable: {err}"
    if not stat.S_ISREG(mode):  # a FIFO or device would block or stream forever
        return "not a regular file"
    return ""


def _empty_class_folders(uri: str) -> list[str]:
    """Class folders with no files (local datasets only: object stores have no empty folders)."""
    root = storage.local_path(uri)
    if root is None or not os.path.isdir(root):
        return []
    found = []
    for split in sorted(os.listdir(root)):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            continue
        for cls in sorted(os.listdir(split_dir)):
            d = os.path.join(split_dir, cls)
            if os.path.isdir(d) and not any(f for _, _, fs in os.walk(d) for f in fs):
                found.append(f"{split}/{cls}")
    return found


def _sample(items: list[tuple[str, str, str, str]], per_class: int, seed: int) -> set[str]:
    """Seeded choice of at most `per_class` files per (split, label): the uris to keep."""
    groups = defaultdict(list)
    for uri, _, split, label in items:
        groups[(split, label)].append(uri)
    rng = np.random.default_rng(seed)
    keep = set()
    for key in sorted(groups):
        uris = sorted(groups[key])
        if len(uris) > per_class:
            uris = [uris[i] for i in sorted(rng.choice(len(uris), per_class, replace=False))]
        keep.update(uris)
    return keep


def scan(config: IngestConfig) -> tuple[list[dict], list[dict], dict]:
    """Read every file once; returns (manifest rows, report rows, summary)."""
    sources = [("data", config.dataset_uri, True)]
    if config.pretrain_uri:
        sources.append(("pretrain", config.pretrain_uri, False))
    manifest, report, seen = [], [], {}
    empty_folders = []
    for source, base, labelled in sources:
        files = storage.list_files(base)
        if not files:
            raise ValueError(f"no files under {base!r}: check the dataset URI")
        logger.info("ingest: %d files under %s", len(files), base)
        candidates = []
        for uri in files:
            try:
                rel = storage.relative(uri, base)
            except ValueError:
                report.append({"uri": uri, "status": "rejected", "id": "",
                               "reason": "unsafe name: '..', '.', an empty segment or an absolute path"})
                continue
            reason = _unsafe_local(uri, base)
            split, label, reason = ("", "", reason) if reason else _classify(rel, labelled)
            if reason:
                report.append({"uri": uri, "status": "rejected", "reason": reason, "id": ""})
            else:
                candidates.append((uri, rel, split, label))
        keep = _sample(candidates, config.sample_per_class, config.seed) if config.sample_per_class else None
        for n, (uri, rel, split, label) in enumerate(candidates, 1):
            if keep is not None and uri not in keep:
                report.append({"uri": uri, "status": "skipped",
                               "reason": f"not sampled (sample_per_class={config.sample_per_class})", "id": ""})
                continue
            row, status, reason = _read_one(uri, f"{source}/{rel}", split, label, seen, config.masks_uri if labelled else "")
            report.append({"uri": uri, "status": status, "reason": reason, "id": row["id"] if row else ""})
            if row:
                manifest.append(row)
            if n % 500 == 0:
                logger.info("ingest: %s %d/%d files read", source, n, len(candidates))
        if labelled:
            empty_folders = _empty_class_folders(base)
    assign_folds(manifest, config.valid_fraction, config.seed)
    return manifest, report, summarise(manifest, report, empty_folders)


def _read_one(uri, file_id, split, label, seen, masks_uri):
    """(manifest row or None, status, reason) for one candidate file."""
    try:
        data = storage.read_bytes(uri)
    except OSError as err:
        return None, "rejected", f"unreadable: {err}"
    checksum = hashlib.sha256(data).hexdigest()
    if checksum in seen:
        return None, "duplicate", f"same bytes as {seen[checksum]}"
    try:  # the header is checked first: decompression bombs and tiny images are never decoded
        grey = imaging.to_grey(imaging.decode(data, min_side=imaging.MIN_SIDE))
    except imaging.ImageError as err:
        return None, "rejected", str(err)
    seen[checksum] = file_id
    mask_uri, reason = "", ""
    if masks_uri:
        mask_uri, reason = _find_mask(masks_uri, file_id, grey.shape)
    row = {
        "id": file_id, "uri": uri, "split": split, "fold": "", "label": label,
        "target": CLASSES.index(label) if label else -1, "patient_id": patient_id(file_id),
        "width": grey.shape[1], "height": grey.shape[0], "bytes": len(data), "checksum": checksum,
        "mask_uri": mask_uri,
    }
    return row, "accepted", reason


def _find_mask(masks_uri: str, file_id: str, shape: tuple[int, int]) -> tuple[str, str]:
    """The lung mask beside an image (`<masks>/<split>/<CLASS>/<stem>.png`), if usable."""
    rel = os.path.splitext(file_id.split("/", 1)[1])[0] + ".png"
    uri = storage.join(masks_uri, rel)
    if not storage.exists(uri):
        return "", ""
    try:
        mask = imaging.read_grey(storage.read_bytes(uri))
    except imaging.ImageError as err:
        return "", f"mask ignored: undecodable ({err})"
    if mask.shape != shape:
        return "", f"mask ignored: size {mask.shape[::-1]} differs from the image's {shape[::-1]}"
    return uri, ""


def assign_folds(rows: list[dict], valid_fraction: float, seed: int) -> None:
    """Set `fold`: official train split -> train/valid by patient, stratified by label; others keep their split."""
    patients = defaultdict(list)
    for r in rows:
        if r["split"] == "train":
            patients[r["patient_id"]].append(r)
        else:
            r["fold"] = r["split"]
    rng = np.random.default_rng(seed)
    by_label = defaultdict(list)
    for pid in sorted(patients):
        targets = [r["target"] for r in patients[pid]]
        by_label[max(set(targets), key=targets.count)].append(pid)
    for label in sorted(by_label):
        pids = by_label[label]
        order = rng.permutation(len(pids))
        n_valid = int(round(valid_fraction * len(pids)))
        if len(pids) >= 2:
            n_valid = min(max(n_valid, 1), len(pids) - 1)
        valid = {pids[i] for i in order[:n_valid]}
        for pid in pids:
            for r in patients[pid]:
                r["fold"] = "valid" if pid in valid else "train"


def summarise(manifest: list[dict], report: list[dict], empty_folders: list[str]) -> dict:
    """Counts that reconcile (files = accepted + rejected + duplicate + skipped) and data facts."""
    status = Counter(r["status"] for r in report)
    by_split = defaultdict(Counter)
    for r in manifest:
        by_split[r["fold"]][r["label"] or "unlabelled"] += 1
    split_patients = defaultdict(set)
    for r in manifest:
        if r["split"] in SPLITS:
            split_patients[r["split"]].add(r["patient_id"])
    overlap = {f"{a}&{b}": len(split_patients[a] & split_patients[b])
               for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:] if split_patients[a] and split_patients[b]}
    return {
        "files": len(report), "accepted": status["accepted"], "rejected": status["rejected"],
        "duplicate": status["duplicate"], "skipped": status["skipped"],
        "folds": {k: dict(v) for k, v in sorted(by_split.items())},
        "with_mask": sum(1 for r in manifest if r["mask_uri"]),
        "patients": len({r["patient_id"] for r in manifest}),
        "patient_overlap_between_splits": overlap,
        "empty_class_folders": empty_folders,
    }


def data_version(manifest: list[dict]) -> str:
    """A short hash of what the manifest holds (ids, checksums, folds): changes when the data does."""
    h = hashlib.sha256()
    for r in sorted(manifest, key=lambda r: r["id"]):
        h.update(f"{r['id']}\t{r['checksum']}\t{r['fold']}\t{r['mask_uri'] != ''}\n".encode())
    return h.hexdigest()[:16]


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_manifest(uri: str) -> list[dict]:
    """Manifest rows with typed target/width/height/bytes."""
    rows = list(csv.DictReader(io.StringIO(storage.read_text(uri))))
    for r in rows:
        for k in ("target", "width", "height", "bytes"):
            r[k] = int(r[k])
    return rows
