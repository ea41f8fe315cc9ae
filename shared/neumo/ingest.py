"""Ingest and validation: a dataset URI in -> a manifest and a report accounting for every file.

Layouts: Kaggle (`split/CLASS/file`, split in train/val/test, CLASS in NORMAL/PNEUMONIA) and
NIH (a flat folder of unlabelled images). Every entry under the dataset root (storage.walk) ends as
exactly one report row: accepted, rejected (with the reason), duplicate (same bytes as an accepted
file) or skipped (hidden, system or temp file, or not sampled), the same on a folder and on gs://;
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
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from neumo import cells, imaging, parameters, storage

logger = logging.getLogger(__name__)

CLASSES = ("NORMAL", "PNEUMONIA")
SPLITS = ("train", "val", "test")
#: PNG and JPEG, and DICOM (told apart by content when decoded: imaging.decode_with_header).
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm", ".dicom")
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


def _empty_class_folders(listing: storage.Walk) -> list[str]:
    """Class folders (`split/CLASS`, not hidden) holding nothing but hidden or system files. A
    folder that could not be listed has its own rejected row and is never called empty."""
    used = {"/".join(e.rel.split("/")[:2]) for e in listing.entries if e.status != "skipped"}
    hidden = storage.skip_reason  # a folder is hidden when a file in it is skipped for its folder's name
    return [f for f in listing.folders if f.count("/") == 1 and f not in used and not hidden(f + "/file")]


def _shared_stems(candidates: list[tuple[str, str, str, str]]) -> Counter:
    """How many candidate images share each (folder, stem): a lung mask found by stem
    (`<stem>.png`, as the Kermany masks are named) is ambiguous when two do."""
    return Counter(os.path.splitext(rel)[0] for _, rel, _, _ in candidates)


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
    """Read every file once; returns (manifest rows, report rows, summary).

    Every entry storage.walk finds is one report row: the walk's skipped (hidden, system, temp)
    and rejected ones (links out, loops, unreadable files and folders, unsafe names) as it found
    them, the rest classified by layout and read. Raises ValueError only when a source has no
    entries at all (a wrong URI)."""
    sources = [("data", config.dataset_uri, True)]
    if config.pretrain_uri:
        sources.append(("pretrain", config.pretrain_uri, False))
    manifest, report, seen = [], [], {}
    empty_folders = []
    for source, base, labelled in sources:
        listing = storage.walk(base)
        if not listing.entries:
            raise ValueError(f"no files under {base!r}: check the dataset URI")
        logger.info("ingest: %d entries under %s", len(listing.entries), base)
        candidates = []
        for entry in listing.entries:
            split, label, reason = ("", "", entry.reason) if entry.status else _classify(entry.rel, labelled)
            if reason:
                report.append({"uri": entry.uri, "status": entry.status or "rejected", "reason": reason, "id": ""})
            else:
                candidates.append((entry.uri, entry.rel, split, label))
        stems = _shared_stems(candidates) if labelled and config.masks_uri else Counter()
        keep = _sample(candidates, config.sample_per_class, config.seed) if config.sample_per_class else None
        for n, (uri, rel, split, label) in enumerate(candidates, 1):
            if keep is not None and uri not in keep:
                report.append({"uri": uri, "status": "skipped",
                               "reason": f"not sampled (sample_per_class={config.sample_per_class})", "id": ""})
                continue
            sharing = stems[os.path.splitext(rel)[0]]
            row, status, reason = _read_one(uri, f"{source}/{rel}", split, label, seen,
                                            config.masks_uri if labelled else "", sharing)
            report.append({"uri": uri, "status": status, "reason": reason, "id": row["id"] if row else ""})
            if row:
                manifest.append(row)
            if n % 500 == 0:
                logger.info("ingest: %s %d/%d files read", source, n, len(candidates))
        if labelled:
            empty_folders = _empty_class_folders(listing)
    assign_folds(manifest, config.valid_fraction, config.seed)
    return manifest, report, summarise(manifest, report, empty_folders)


def _read_one(uri, file_id, split, label, seen, masks_uri, sharing=1, size=None):
    """(manifest row or None, status, reason) for one candidate file (the patient: a DICOM header's
    PatientID when it has one, else the file-name rule of patient_id); `sharing`: how many
    candidates share its folder and stem (more than one: a mask found by stem is ambiguous);
    `size`: its size from the listing, if known (over MAX_FILE_BYTES it is refused unread)."""
    data, reason = read_file(uri, size)
    if data is None:
        return None, "rejected", reason
    checksum = hashlib.sha256(data).hexdigest()
    if checksum in seen:
        return None, "duplicate", f"same bytes as {seen[checksum]}"
    try:  # the header is checked first: bombs, tiny images, strips and 12-bit JPEGs are never decoded
        image, header = decode_file(data)
        grey = imaging.to_grey(image)
    except imaging.ImageError as err:
        return None, "rejected", str(err)
    seen[checksum] = file_id
    mask_uri, reason = "", ""
    if masks_uri:
        mask_uri, reason = _find_mask(masks_uri, file_id, grey.shape, sharing)
    row = {
        "id": file_id, "uri": uri, "split": split, "fold": "", "label": label,
        "target": CLASSES.index(label) if label else -1, "patient_id": header.get("patient_id") or patient_id(file_id),
        "width": grey.shape[1], "height": grey.shape[0], "bytes": len(data), "checksum": checksum,
        "mask_uri": mask_uri,
    }
    return row, "accepted", reason


def read_file(uri: str, size: int | None = None) -> tuple[bytes | None, str]:
    """(the file's bytes, "") or (None, the reason ingest reports): unreadable, or over the size
    cap (refused unread when `size`, from the listing, says so). `neumo predict` reads files so too."""
    try:
        return _read_capped(uri, size), ""
    except OSError as err:
        return None, f"unreadable: {err}"
    except FileTooLarge as err:
        return None, str(err)


def decode_file(data: bytes) -> tuple[np.ndarray, dict]:
    """(image, DICOM header or {}) with ingest's checks (too small, too large, extreme aspect ratio,
    damaged or unsupported data: imaging.ImageError with the reason)."""
    return imaging.decode_with_header(data, min_side=imaging.MIN_SIDE, max_aspect=imaging.MAX_ASPECT)


def _find_mask(masks_uri: str, file_id: str, shape: tuple[int, int], sharing: int = 1) -> tuple[str, str]:
    """The lung mask provided beside an image (`<masks>/<split>/<CLASS>/<stem>.png`, named by stem
    as the Kermany masks are), if usable: not when `sharing` > 1 images of the folder have that stem."""
    rel = os.path.splitext(file_id.split("/", 1)[1])[0] + ".png"
    uri = storage.join(masks_uri, rel)
    try:
        if not storage.exists(uri):
            return "", ""
    except UnicodeEncodeError:  # a local name that is not UTF-8 cannot name a gs:// mask
        return "", "mask not looked up: the file name is not valid UTF-8, which an object name must be"
    if sharing > 1:
        stem = os.path.basename(rel)[:-len(".png")]
        return "", (f"mask ignored: ambiguous, {sharing} images in this folder share the stem {stem!r}, "
                    f"so {os.path.basename(rel)!r} could be the mask of any of them")
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
        h.update(f"{r['id']}\t{r['checksum']}\t{r['fold']}\t{r['mask_uri'] != ''}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def to_csv(rows: list[dict], columns: list[str]) -> str:
    """The rows as CSV text (names not valid UTF-8 keep os.fsdecode's surrogates: see csv_bytes;
    text a spreadsheet would run as a formula escaped: neumo.cells)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: cells.escape(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows)
    return buf.getvalue()


def csv_bytes(rows: list[dict], columns: list[str]) -> bytes:
    """The rows as a UTF-8 CSV file that round-trips every file name the file system accepts.

    A local name that is not valid UTF-8 is written as its own raw bytes (os.fsdecode's
    surrogates encoded with errors="surrogateescape"), so the CSV shows exactly what `ls` shows
    and :func:`read_csv_text` gives back the str os.fsdecode gave, which opens the same file.
    Every other name is plain UTF-8. A strict UTF-8 reader fails on such a row: read these files
    with read_csv_text (or decode with errors="surrogateescape").
    """
    return to_csv(rows, columns).encode("utf-8", "surrogateescape")


def read_csv_text(uri: str) -> str:
    """The text of a CSV written by :func:`csv_bytes`, names that are not UTF-8 back in os.fsdecode's form."""
    return storage.read_bytes(uri).decode("utf-8", "surrogateescape")


def read_manifest(uri: str) -> list[dict]:
    """Manifest rows with typed target/width/height/bytes; a manifest that is not one (a missing
    column, a value that is not a number) is a ValueError naming the file and the row."""
    reader = csv.DictReader(io.StringIO(read_csv_text(uri)))
    missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{uri} is not a neumo manifest: missing column(s) {', '.join(missing)} (written by ingest)")
    rows = [cells.unescape_row(r) for r in reader]
    for line, r in enumerate(rows, 2):
        for k in ("target", "width", "height", "bytes"):
            try:
                r[k] = int(r[k])
            except (TypeError, ValueError):
                raise ValueError(f"{uri} row {line}: {k} must be an integer, got {r[k]!r}") from None
    return rows


# --- reading image files safely: a size cap before reading, and the manifest's checks after ---

#: The largest image file read. The decompression-bomb guard admits 50 megapixels, which as a 16-bit
#: grey PNG is at most 100 MB even uncompressed, and real chest X-rays are 0.1-30 MB; a file over
#: 256 MiB is refused from its size, before a byte is read, so no single file can take GBs of memory.
MAX_FILE_BYTES = 256 * 2**20


class FileTooLarge(ValueError):
    """A file over MAX_FILE_BYTES (the message gives its size); it was not read."""


def _too_large(size: int) -> FileTooLarge:
    return FileTooLarge(f"file too large: {size} bytes ({size / 2**20:.0f} MiB), over the limit of "
                        f"{MAX_FILE_BYTES // 2**20} MiB for one image; not read")


def _stat_size(uri: str) -> int | None:
    """The size of a local file from a stat (nothing read); None for an object store."""
    path = storage.local_path(uri)
    return None if path is None else os.stat(path).st_size


def _read_capped(uri: str, size: int | None = None) -> bytes:
    """The bytes of `uri`, refusing (FileTooLarge) a file over MAX_FILE_BYTES before reading it.

    Local files are sized by a stat; a gs:// object by `size` from the listing when the caller
    has it (else its length is checked once read). OSError when it cannot be read.
    """
    if size is None:
        size = _stat_size(uri)
    if size is not None and size > MAX_FILE_BYTES:
        raise _too_large(size)
    data = storage.read_bytes(uri)
    if len(data) > MAX_FILE_BYTES:  # an object listed without its size, or a file that grew meanwhile
        raise _too_large(len(data))
    return data


def _changed(row: dict, what: str) -> ValueError:
    return ValueError(f"image {row['id']} ({row['uri']}) changed since ingest: {what}: rerun ingest")


def check_unchanged(row: dict, data: bytes) -> None:
    """ValueError naming the image (id and uri) unless `data` has the size and sha256 that ingest
    recorded in the manifest row (`bytes`, `checksum`)."""
    if len(data) != int(row["bytes"]):
        raise _changed(row, f"{len(data)} bytes, the manifest says {int(row['bytes'])}")
    checksum = hashlib.sha256(data).hexdigest()
    if checksum != row["checksum"]:
        raise _changed(row, f"sha256 {checksum[:16]}…, the manifest says {row['checksum'][:16]}… (same size)")


def read_verified(row: dict) -> bytes:
    """The bytes of a manifest row's file, exactly as ingest saw them.

    Raises ValueError naming the image (id and uri) when its size or sha256 differ from the
    manifest's `bytes` and `checksum` ("changed since ingest: rerun ingest"); a local regular
    file's size is compared from a stat, before it is read (a replacement of another size is
    refused unread, however large). FileNotFoundError naming it when it is gone.
    """
    from stat import S_ISREG

    uri, checksum, size = row["uri"], row.get("checksum"), row.get("bytes")
    if not checksum or size is None or size == "":
        raise ValueError(f"manifest row {row.get('id')!r} has no bytes/checksum to verify it by: rerun ingest")
    size = int(size)
    path = storage.local_path(uri)
    try:
        if path is not None:
            st = os.stat(path)
            if st.st_size != size and S_ISREG(st.st_mode):  # a FIFO or device says 0: read, then checked
                raise _changed(row, f"{st.st_size} bytes, the manifest says {size}")
        data = storage.read_bytes(uri)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image {row['id']} ({uri}) is gone since ingest: rerun ingest") from err
    if len(data) != size or hashlib.sha256(data).hexdigest() != checksum:
        check_unchanged(row, data)  # raises, saying which differs
    return data
