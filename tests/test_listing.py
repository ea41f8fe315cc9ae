"""Nothing vanishes, nothing is half-trusted: every entry under a dataset root ends as exactly one
row of the ingest report, the same on a folder and on gs://; one bad entry is one row, never the
end of the run; and any name the file system accepts goes through every stage.

Each corpus is made here, in tmp_path. Root ignores permission bits, so the unreadable folders are
chmod-ed on disk *and* refused by an injected os.scandir (the `permissions` fixture); the test
that relies on the mode bits alone runs only as a normal user.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from neumo import data as nd
from neumo import ingest, preprocess, stages, storage, synthetic


def image(seed: int, ext: str = ".png", size: int = 40) -> bytes:
    """A small synthetic chest X-ray, encoded; a different seed gives different bytes."""
    return cv2.imencode(ext, synthetic.make_xray(seed, size)[0])[1].tobytes()


def put(root: Path, rel: str | bytes, data: bytes = b"x") -> bytes:
    """Write `data` at root/rel (rel may be bytes: a name that is not UTF-8); returns the path as bytes."""
    path = os.fsencode(root) + b"/" + os.fsencode(rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


class _Unenterable:
    """os.scandir over a folder of mode r-- (listed, never entered): names and types come from the
    listing; anything that needs an entry's inode fails with EACCES."""

    def __init__(self, it):
        self._it = it

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._it.close()

    def __iter__(self):
        return self

    def __next__(self):
        return _NoInode(next(self._it))


class _NoInode:
    def __init__(self, entry: os.DirEntry):
        self._entry, self.name, self.path = entry, entry.name, entry.path

    def is_symlink(self) -> bool:
        return self._entry.is_symlink()

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_dir(follow_symlinks=follow_symlinks)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_file(follow_symlinks=follow_symlinks)

    def stat(self, *, follow_symlinks: bool = True):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), self.path)


@pytest.fixture
def permissions(monkeypatch):
    """lock(path, "unlistable"): chmod 000, listing it fails; lock(path, "unenterable"): chmod 444,
    its names list but nothing in it can be read. Also injected into os.scandir (which os.walk and
    neumo.storage both use), since root ignores the mode bits."""
    unlistable: set[str] = set()
    unenterable: set[str] = set()
    real = os.scandir

    def scandir(path="."):
        p = os.path.realpath(os.fsdecode(path))  # the same folder by any route
        if p in unlistable or any(p.startswith(u + os.sep) for u in unlistable | unenterable):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), p)
        it = real(path)
        return _Unenterable(it) if p in unenterable else it

    def lock(path, how: str) -> None:
        path = os.path.realpath(os.fsdecode(path))
        (unlistable if how == "unlistable" else unenterable).add(path)
        os.chmod(path, 0o000 if how == "unlistable" else 0o444)

    monkeypatch.setattr(os, "scandir", scandir)
    yield lock
    for p in unlistable | unenterable:
        os.chmod(p, 0o755)  # so the tmp folder can be removed by a normal user


def independent_count(root: str) -> int:
    """How many report rows the tree under `root` must give, found without neumo.

    os.walk, following no link, counts every entry that is not a folder, and each folder it cannot
    list as one. A link to a folder counts as one when its target is outside `root` or is a folder
    on the way down to the link (a loop); otherwise the target's tree is counted by the same rule.
    """
    real_root = os.path.realpath(root)

    def count(top: str, above: tuple[str, ...]) -> int:
        errors: list[OSError] = []
        n = 0
        for dirpath, dirnames, filenames in os.walk(top, onerror=errors.append):
            n += len(filenames)
            rel = os.path.relpath(dirpath, top)
            parts = [] if rel == "." else rel.split(os.sep)
            chain = above + tuple(os.path.join(above[-1], *parts[:i]) for i in range(1, len(parts) + 1))
            for d in dirnames:
                path = os.path.join(dirpath, d)
                if not os.path.islink(path):
                    continue  # os.walk goes there itself
                target = os.path.realpath(path)
                if os.path.commonpath([target, real_root]) != real_root or target in chain:
                    n += 1
                else:
                    n += count(path, (*chain, target))
        return n + len(errors)

    return count(root, (real_root,))


def by_rel(report: list[dict], base: str) -> dict[str, dict]:
    """Report rows by their path under base (local rows in os.fsdecode's form)."""
    out = {}
    for r in report:
        uri = r["uri"]
        rel = storage.relative(uri, base) if uri != base else ""
        assert rel not in out, rel
        out[rel] = r
    return out


# --- the rules, one by one ---------------------------------------------------------------------

@pytest.mark.parametrize("rel,reason", [
    (".DS_Store", "macOS metadata file"),
    ("train/NORMAL/.DS_Store", "macOS metadata file"),
    ("train/NORMAL/._x.jpeg", "macOS metadata file (AppleDouble"),
    ("train/NORMAL/.x.jpeg", "hidden file (name starts with '.')"),
    ("train/.NORMAL/x.jpeg", "in a hidden folder ('.NORMAL'"),
    (".git/objects/ab/cdef", "in a hidden folder ('.git'"),
    ("__MACOSX/train/NORMAL/._x.jpeg", "macOS metadata folder"),
    ("train/NORMAL/Thumbs.db", "Windows metadata file"),
    ("train/NORMAL/desktop.ini", "Windows metadata file"),
    ("train/NORMAL/x.jpeg.0123456789abcdef.neumo-tmp", "temp file of an unfinished write"),
    ("train/NORMAL/.x.jpeg.0123456789abcdef.neumo-tmp", "temp file of an unfinished write"),
    ("train/NORMAL/x.jpeg", ""),
    ("train/NORMAL/x.DS_Store.jpeg", ""),
    ("train/NORMAL/a..b.jpeg", ""),
])
def test_skip_reasons(rel, reason):
    got = storage.skip_reason(rel)
    assert (reason in got) if reason else got == ""


# --- one corpus per kind, on a folder ----------------------------------------------------------

# rel -> (status, a piece of the reason); every other row of the corpus is an accepted image
KINDS = {
    "train/NORMAL/.DS_Store": ("skipped", "macOS metadata file (.DS_Store"),
    "train/NORMAL/._n0.png": ("skipped", "AppleDouble"),
    "train/NORMAL/.hidden-but-valid.png": ("skipped", "hidden file (name starts with '.')"),
    "train/.PNEUMONIA/hidden-class.png": ("skipped", "in a hidden folder ('.PNEUMONIA'"),
    "__MACOSX/train/NORMAL/._n0.png": ("skipped", "macOS metadata folder"),
    "train/NORMAL/Thumbs.db": ("skipped", "Windows metadata file"),
    "train/NORMAL/n9.png.0123456789abcdef.neumo-tmp": ("skipped", "temp file of an unfinished write"),
    "train/EMPTY/.DS_Store": ("skipped", "macOS metadata file"),
    "val/NORMAL/t0.png": ("duplicate", "same bytes as data/test/NORMAL/t0.png"),  # val -> test, followed
    "val/PNEUMONIA/t1.png": ("duplicate", "same bytes as data/test/PNEUMONIA/t1.png"),
    "train/PNEUMONIA/more": ("rejected", "link outside the dataset"),  # a folder link out
    "train/NORMAL/loop": ("rejected", "symlink loop (points to"),  # -> .. (train, which encloses it)
    "train/NORMAL/self.png": ("rejected", "symlink loop (the link resolves to itself)"),
    "train/NORMAL/gone.png": ("rejected", "dangling link"),
    "train/NORMAL/fifo.png": ("rejected", "not a regular file"),
    "train/LOCKED": ("rejected", "unreadable folder, its files cannot be listed: Permission denied"),
    "train/DOOR/a.png": ("rejected", "unreadable: Permission denied"),
    "train/DOOR/sub": ("rejected", "unreadable folder"),
    os.fsdecode(b"train/\xff\xfe/x.png"): ("rejected", "unknown class folder '\\udcff\\udcfe'"),
    "train/PNEUMONIA/twin.jpeg": ("accepted", "mask ignored: ambiguous, 2 images in this folder share the stem 'twin'"),
    "train/PNEUMONIA/twin.png": ("accepted", "mask ignored: ambiguous"),
}
LATIN1 = os.fsdecode(b"train/NORMAL/caf\xe9 radiograf\xeda.png")  # not UTF-8: ISO-8859-1 bytes
LONG_250 = "train/NORMAL/" + "l" * 246 + ".png"  # a 250-byte name
LONG_255 = "train/PNEUMONIA/" + "m" * 251 + ".png"  # the longest a name can be


@pytest.fixture
def kinds(tmp_path, permissions) -> dict:
    base = tmp_path
    root, masks, outside = base / "data", base / "masks", base / "outside"
    seed = iter(range(100, 1000))
    for rel in ("train/NORMAL/n0.png", "train/NORMAL/n1.jpeg", "train/PNEUMONIA/p0.png", "train/PNEUMONIA/p1.jpeg",
                "test/NORMAL/t0.png", "test/PNEUMONIA/t1.png", LONG_250, LONG_255):
        put(root, rel, image(next(seed), os.path.splitext(rel)[1]))
    put(root, LATIN1, image(next(seed)))
    for rel, (status, _) in KINDS.items():
        if rel.endswith((".png", ".jpeg")) and status in ("skipped", "accepted") and "/." not in "/" + rel:
            put(root, rel, image(next(seed), os.path.splitext(rel)[1]))
    for rel in ("train/NORMAL/.DS_Store", "__MACOSX/train/NORMAL/._n0.png", "train/NORMAL/._n0.png",
                "train/NORMAL/Thumbs.db", "train/NORMAL/n9.png.0123456789abcdef.neumo-tmp", "train/EMPTY/.DS_Store"):
        put(root, rel, b"\0\5\26\7 metadata")
    put(root, "train/NORMAL/.hidden-but-valid.png", image(next(seed)))
    put(root, "train/.PNEUMONIA/hidden-class.png", image(next(seed)))
    put(root, b"train/\xff\xfe/x.png", image(next(seed)))
    # masks by stem: one for n0, one that both twins could claim
    put(masks, "train/NORMAL/n0.png", cv2.imencode(".png", synthetic.make_xray(0, 40)[1].astype(np.uint8) * 255)[1])
    put(masks, "train/PNEUMONIA/twin.png", cv2.imencode(".png", np.full((40, 40), 255, np.uint8))[1].tobytes())
    # links and special files
    (root / "val").symlink_to("test")  # a whole split linked to a folder inside the dataset
    put(outside, "NORMAL/o.png", image(next(seed)))
    (root / "train/PNEUMONIA/more").symlink_to(outside)
    (root / "train/NORMAL/loop").symlink_to("..")
    (root / "train/NORMAL/self.png").symlink_to("self.png")
    (root / "train/NORMAL/gone.png").symlink_to("not-there.png")
    os.mkfifo(root / "train/NORMAL/fifo.png")
    put(root, "train/LOCKED/l.png", image(next(seed)))
    put(root, "train/DOOR/a.png", image(next(seed)))
    put(root, "train/DOOR/sub/b.png", image(next(seed)))
    permissions(root / "train/LOCKED", "unlistable")
    permissions(root / "train/DOOR", "unenterable")
    return {"root": root, "masks": masks}


def test_every_kind_of_entry_is_one_row_with_its_reason(kinds, tmp_path):
    root = str(kinds["root"])
    summary = stages.ingest(dataset_uri=root, masks_uri=str(kinds["masks"]), out_dir=str(tmp_path / "out"))
    report = list(csv.DictReader(io.StringIO(ingest.read_csv_text(str(tmp_path / "out" / "report.csv")))))
    rows = by_rel(report, root)
    for rel, (status, reason) in KINDS.items():
        assert rel in rows, rel
        assert rows[rel]["status"] == status, (rel, rows[rel])
        assert reason in rows[rel]["reason"], (rel, rows[rel]["reason"])
    others = {rel: r for rel, r in rows.items() if rel not in KINDS}
    assert {r["status"] for r in others.values()} == {"accepted"}, others
    assert {LATIN1, LONG_250, LONG_255} <= set(others)
    # the counts reconcile with a walk of the tree that knows nothing of neumo
    assert summary["files"] == len(report) == independent_count(root)
    assert summary["accepted"] + summary["rejected"] + summary["duplicate"] + summary["skipped"] == summary["files"]
    assert summary["empty_class_folders"] == ["train/EMPTY"]  # not LOCKED nor DOOR (rows of their own), not .PNEUMONIA
    manifest = stages.load_manifest(str(tmp_path / "out"))
    assert {r["id"] for r in manifest} == {f"data/{rel}" for rel, r in rows.items() if r["status"] == "accepted"}
    masked = {r["id"]: r["mask_uri"] for r in manifest}
    assert masked["data/train/NORMAL/n0.png"] and not masked["data/train/PNEUMONIA/twin.png"]
    assert not masked["data/train/PNEUMONIA/twin.jpeg"]


def test_names_that_are_not_utf8_round_trip_through_the_csvs(kinds, tmp_path):
    out = tmp_path / "out"
    stages.ingest(dataset_uri=str(kinds["root"]), out_dir=str(out))
    raw_name = b"caf\xe9 radiograf\xeda.png"
    # the CSVs hold the name's own bytes (what `ls` shows), everything else is UTF-8
    for name in ("report.csv", "manifest.csv"):
        data = (out / name).read_bytes()
        assert raw_name in data
        with pytest.raises(UnicodeDecodeError):
            data.decode("utf-8")
        assert data.decode("utf-8", "surrogateescape").encode("utf-8", "surrogateescape") == data
    row = next(r for r in stages.load_manifest(str(out)) if r["id"].endswith(os.fsdecode(raw_name)))
    assert os.fsencode(row["uri"]) == os.fsencode(kinds["root"]) + b"/train/NORMAL/" + raw_name
    assert storage.read_bytes(row["uri"])[:8] == b"\x89PNG\r\n\x1a\n"
    json.loads((out / "summary.json").read_text())  # plain ASCII JSON either way
    # and preprocessing reads it like any other image
    variant = preprocess.prepare_variant(stages.load_manifest(str(out)),
                                         preprocess.PreprocessConfig(pixels=32, workers=1, acquisition_copies=0),
                                         str(tmp_path / "p32"))
    ids = np.concatenate([nd.load_fold(str(tmp_path / "p32"), f).ids for f in nd.FOLDS if f not in nd.DERIVED])
    assert row["id"] in set(ids.tolist()) and sum(variant["counts"].values()) == len(ids)


def test_file_uris_quote_names_that_are_not_utf8(kinds):
    uri = "file://" + str(kinds["root"])
    listed = [e for e in storage.walk(uri).entries if e.rel == LATIN1]
    assert len(listed) == 1 and "%E9" in listed[0].uri
    assert storage.local_path(listed[0].uri) == str(kinds["root"]) + "/" + LATIN1
    assert storage.read_bytes(listed[0].uri)[:4] == b"\x89PNG"


def test_one_bad_entry_never_stops_the_fingerprint(kinds):
    root = str(kinds["root"])
    first = stages.fingerprint(dataset_uri=root, masks_uri=str(kinds["masks"]))
    assert stages.fingerprint(dataset_uri=root, masks_uri=str(kinds["masks"])) == first
    put(kinds["root"], "train/NORMAL/.another-hidden", b"")  # a new row of the report: a new key
    assert stages.fingerprint(dataset_uri=root, masks_uri=str(kinds["masks"])) != first


def test_a_root_that_cannot_be_listed_is_an_error_naming_it(tmp_path, permissions):
    put(tmp_path / "data", "train/NORMAL/x.png", image(1))
    permissions(tmp_path / "data", "unlistable")
    with pytest.raises(PermissionError) as err:
        storage.walk(str(tmp_path / "data"))
    assert err.value.filename == str(tmp_path / "data")
    assert storage.walk(str(tmp_path / "absent")).entries == []  # missing: nothing listed (ingest says so)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits (CAP_DAC_OVERRIDE); "
                    "the fault-injected folders of test_every_kind_of_entry_is_one_row_with_its_reason cover it")
def test_mode_bits_alone_make_folders_unreadable(tmp_path):
    root = tmp_path / "data"
    put(root, "train/NORMAL/ok.png", image(1))
    put(root, "train/LOCKED/x.png", image(2))
    put(root, "train/DOOR/y.png", image(3))
    os.chmod(root / "train/LOCKED", 0o000)
    os.chmod(root / "train/DOOR", 0o444)
    try:
        manifest, report, summary = ingest.scan(ingest.IngestConfig(str(root)))
    finally:
        os.chmod(root / "train/LOCKED", 0o755)
        os.chmod(root / "train/DOOR", 0o755)
    rows = by_rel(report, str(root))
    assert rows["train/LOCKED"]["reason"].startswith("unreadable folder")
    assert rows["train/DOOR/y.png"]["reason"].startswith("unreadable")
    assert summary["accepted"] == 1 and summary["files"] == 3


# --- ingest fails well -------------------------------------------------------------------------

def test_no_usable_file_still_writes_the_report_and_summary(tmp_path):
    root = tmp_path / "data"
    put(root, "train/NORMAL/.DS_Store")
    put(root, "train/NORMAL/._a.png")
    put(root, "train/NORMAL/.a.png", image(1))
    put(root, "train/NORMAL/broken.png", image(2)[:40])
    put(root, "train/NORMAL/notes.txt", b"not an image")
    put(root, "test/NORMAL/t.png", image(3))  # accepted, but no training image
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"no accepted training image .*6 files, 1 accepted, 2 rejected, "
                                         r"0 duplicate, 3 skipped.*report\.csv"):
        stages.ingest(dataset_uri=str(root), out_dir=str(out), report_path=str(tmp_path / "report.md"))
    report = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert len(report) == 6 and Counter(r["status"] for r in report) == {"skipped": 3, "rejected": 2, "accepted": 1}
    assert json.loads((out / "summary.json").read_text())["files"] == 6
    assert "| 6 | 1 | 2 | 0 | 3 |" in (tmp_path / "report.md").read_text()
    assert not (out / "manifest.csv").exists()  # nothing downstream can take it for a dataset


# --- names that collide or overflow ------------------------------------------------------------

def test_mask_keys_keep_the_extension_and_fit_the_name_limit():
    jpeg, png = (preprocess.mask_path("/m", f"data/train/NORMAL/x.{ext}") for ext in ("jpeg", "png"))
    assert jpeg == "/m/masks/data/train/NORMAL/x.jpeg.png" and png == "/m/masks/data/train/NORMAL/x.png.png"
    fits = "data/train/NORMAL/" + "a" * 247 + ".jpg"  # 251 bytes: + ".png" is exactly 255
    assert preprocess.mask_path("/m", fits) == "/m/masks/" + fits + ".png"
    for name in ("n" * 251 + ".png", "😀" * 62 + ".png", os.fsdecode(b"\xff" * 251 + b".png")):
        a, b = (preprocess.mask_path("gs://bucket/m", f"data/train/{c}/{name}") for c in ("NORMAL", "PNEUMONIA"))
        other = preprocess.mask_path("gs://bucket/m", f"data/train/NORMAL/{name[:-5]}Z.png")
        for key in (a, b, other):
            assert len(os.fsencode(key.rsplit("/", 1)[1])) <= 255 and key.endswith(".png")
        assert a != b and a.rsplit("/", 1)[1] != other.rsplit("/", 1)[1]  # one key per id, even shortened
        assert preprocess.mask_path("gs://bucket/m", f"data/train/NORMAL/{name}") == a  # the same every time
    assert "😀" * 50 in preprocess.mask_path("/m", "d/" + "😀" * 62 + ".png")  # whole characters kept


def test_temp_files_have_short_names_whatever_the_target(tmp_path, monkeypatch):
    temps = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: temps.append(src) or real(src, dst))
    for name in ("x" * 251 + ".png", "😀" * 62 + ".png", os.fsdecode(b"\xfe" * 255)):
        target = os.path.join(tmp_path, name)
        storage.write_bytes(target, b"data")
        with open(target, "rb") as f:
            assert f.read() == b"data"
    for tmp in temps:
        tmp = os.path.basename(tmp)
        assert tmp.startswith(".") and tmp.endswith(".neumo-tmp") and len(os.fsencode(tmp)) <= 1 + 4 * 24 + 1 + 16 + 10
    assert sorted(os.listdir(tmp_path)) == sorted(["x" * 251 + ".png", "😀" * 62 + ".png", os.fsdecode(b"\xfe" * 255)])
    assert storage.list_files(str(tmp_path)) == sorted(os.path.join(tmp_path, n) for n in os.listdir(tmp_path))


@pytest.mark.slow
def test_long_names_and_stem_twins_go_through_every_stage(tmp_path):
    """ingest -> mask (a given, tiny mask model) -> preprocess with masks, on names up to 255 bytes
    and on x.jpeg + x.png in one folder: every image gets its own mask."""
    import keras

    root = tmp_path / "data"
    names = {"train/NORMAL/" + "l" * 246 + ".png", "train/NORMAL/" + "k" * 250 + ".jpeg",
             "train/PNEUMONIA/" + "😀" * 62 + ".png", "train/PNEUMONIA/twin.jpeg", "train/PNEUMONIA/twin.png",
             "train/NORMAL/n1.png", "train/PNEUMONIA/p1.png", "test/NORMAL/t.png"}
    for seed, rel in enumerate(sorted(names)):
        put(root, rel, image(seed, os.path.splitext(rel)[1], size=48))
    stages.ingest(dataset_uri=str(root), out_dir=str(tmp_path / "manifest"))
    model = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")])
    model.save(tmp_path / "tiny.keras")
    stages.mask_model(manifest_dir=str(tmp_path / "manifest"), out_dir=str(tmp_path / "model"),
                      mask_model_uri=str(tmp_path / "tiny.keras"))
    summary = stages.mask(manifest_dir=str(tmp_path / "manifest"), model_dir=str(tmp_path / "model"),
                          out_dir=str(tmp_path / "masks"))
    assert summary["images"] == len(names)
    written = {p.relative_to(tmp_path / "masks" / "masks").as_posix() for p in (tmp_path / "masks").rglob("*.png")
               if "masks/masks" in p.as_posix()}
    assert len(written) == len(names)
    assert {"data/train/PNEUMONIA/twin.jpeg.png", "data/train/PNEUMONIA/twin.png.png"} <= written
    info = stages.preprocess(manifest_dir=str(tmp_path / "manifest"), variant={"pixels": 32, "mask": True},
                             out_dir=str(tmp_path / "p32"), masks_dir=str(tmp_path / "masks"), workers=1,
                             acquisition_copies=0)
    assert sum(info["counts"].values()) == len(names)


# --- the same dataset on a folder and on gs:// -------------------------------------------------

PLAIN = {  # rel -> bytes: what an object store can hold too (no links, FIFOs or permissions)
    **{f"train/NORMAL/n{i}.png": ("image", 10 + i) for i in range(3)},
    **{f"train/PNEUMONIA/p{i}.jpeg": ("image", 20 + i) for i in range(3)},
    "test/NORMAL/t0.png": ("image", 30), "test/PNEUMONIA/t1.png": ("image", 31),
    "train/NORMAL/.DS_Store": ("bytes", b"\0\0\0\1Bud1"),
    "train/NORMAL/._n0.png": ("bytes", b"\0\5\26\7 AppleDouble"),
    "train/NORMAL/.hidden-but-valid.png": ("image", 40),
    "train/.PNEUMONIA/hidden-class.jpeg": ("image", 41),
    ".git/config": ("bytes", b"[core]\n"),
    "__MACOSX/train/NORMAL/._n1.png": ("bytes", b"\0\5\26\7"),
    "train/NORMAL/Thumbs.db": ("bytes", b"thumbs"),
    "train/NORMAL/n9.png.0123456789abcdef.neumo-tmp": ("image", 42),
    "train/NORMAL/notes.txt": ("bytes", b"notes"),
    "train/NORMAL/nested/deeper.png": ("image", 43),
    "train/COVID/c.png": ("image", 44),
    "train/NORMAL/same bytes.png": ("image", 10),
    "train/PNEUMONIA/twin.jpeg": ("image", 45), "train/PNEUMONIA/twin.png": ("image", 46),
    "train/NORMAL/neumonía niño.png": ("image", 47),
    "train/NORMAL/" + "l" * 246 + ".png": ("image", 48),
}


def _write_plain(base: str, masks: str) -> None:
    for rel, (kind, v) in PLAIN.items():
        storage.write_bytes(storage.join(base, rel), image(v, os.path.splitext(rel)[1] if rel.endswith("jpeg") else ".png")
                            if kind == "image" else v)
    for rel in ("train/NORMAL/n0.png", "train/PNEUMONIA/twin.png"):
        storage.write_bytes(storage.join(masks, rel), cv2.imencode(".png", np.full((40, 40), 255, np.uint8))[1].tobytes())


def test_a_folder_and_a_bucket_copy_give_the_same_report_and_manifest(tmp_path, gcs_bucket):
    results = {}
    for where, base in (("local", str(tmp_path)), ("gs", f"gs://{gcs_bucket}")):
        _write_plain(storage.join(base, "data"), storage.join(base, "masks"))
        manifest, report, summary = ingest.scan(ingest.IngestConfig(storage.join(base, "data"),
                                                                    masks_uri=storage.join(base, "masks")))
        rows = {rel: (r["status"], r["reason"], r["id"]) for rel, r in by_rel(report, storage.join(base, "data")).items()}
        results[where] = rows, sorted((r["id"], r["checksum"], bool(r["mask_uri"])) for r in manifest), \
            ingest.data_version(manifest), {k: v for k, v in summary.items() if k != "empty_class_folders"}
    local, gs = results["local"], results["gs"]
    assert set(local[0]) == set(PLAIN)
    assert local == gs
    rows = local[0]
    assert rows["train/NORMAL/.hidden-but-valid.png"][:2] == ("skipped", "hidden file (name starts with '.')")
    assert rows["train/.PNEUMONIA/hidden-class.jpeg"][0] == "skipped"
    assert rows["train/PNEUMONIA/twin.png"][1].startswith("mask ignored: ambiguous")
    assert local[3]["skipped"] == 8 and local[3]["files"] == len(PLAIN)


# --- reconciliation: several hundred mixed entries --------------------------------------------

def _generate_tree(root: Path, outside: Path, rng: np.random.Generator) -> None:
    """A dataset with every kind of entry, a few of each, in random proportions."""
    seed = iter(range(10_000, 20_000))
    folders = [f"{s}/{c}" for s in ("train", "val") for c in ("NORMAL", "PNEUMONIA")]
    folders += ["train/COVID", "val/normal ", "stray"]
    for folder in folders:
        for i in range(int(rng.integers(15, 30))):
            ext = ".png" if rng.random() < 0.5 else ".jpeg"
            put(root, f"{folder}/img{i:03d}{ext}", image(next(seed), ext, size=int(rng.integers(34, 48))))
        for i in range(int(rng.integers(2, 6))):
            put(root, f"{folder}/._img{i:03d}.png", b"\0\5\26\7")
            put(root, f"{folder}/.hidden{i}.png", image(next(seed)))
        put(root, f"{folder}/.DS_Store", b"\0\0\0\1Bud1")
        put(root, f"{folder}/readme.txt", b"text")
        put(root, f"{folder}/nested/deeper/x.png", image(next(seed)))
        put(root, f"{folder}/half.png.{int(rng.integers(1 << 30)):08x}.neumo-tmp", b"half")
        put(root, os.fsencode(folder) + b"/r\xf6ntgen-" + str(next(seed)).encode() + b".png", image(next(seed)))
    for i in range(10):
        put(root, f"__MACOSX/train/NORMAL/._img{i:03d}.png", b"\0\5\26\7")
        put(root, f".cache/{i}/blob", b"cache")
    put(root, "train/.PNEUMONIA/hidden-class.png", image(next(seed)))
    put(root, b"\xff\xfe-folder/NORMAL/x.png", image(next(seed)))
    for i in range(12):
        put(outside, f"NORMAL/o{i}.png", image(next(seed)))
    (root / "test").symlink_to(outside)  # a whole split linked out of the dataset: one rejected row
    (root / "train/NORMAL/outside-folder").symlink_to(outside / "NORMAL")
    (root / "val/extra").symlink_to("../train/COVID")  # inside: followed, listed under val/extra
    (root / "val/NORMAL/up").symlink_to("../..")  # a loop
    (root / "train/PNEUMONIA/ring").symlink_to("../../val/PNEUMONIA")  # inside, and val has no way back
    (root / "train/NORMAL/dangling.png").symlink_to(root / "nowhere.png")
    (root / "train/NORMAL/out.png").symlink_to(outside / "NORMAL/o0.png")
    (root / "train/NORMAL/self.png").symlink_to("self.png")
    os.mkfifo(root / "val/PNEUMONIA/fifo.png")
    for i in range(5):
        put(root, f"train/LOCKED/l{i}.png", image(next(seed)))
        put(root, f"val/DOOR/d{i}.png", image(next(seed)))
    put(root, "val/DOOR/inner/z.png", image(next(seed)))


def test_report_rows_reconcile_with_an_independent_walk(tmp_path, gcs_bucket, permissions):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    _generate_tree(root, outside, np.random.default_rng(7))
    permissions(root / "train/LOCKED", "unlistable")
    permissions(root / "val/DOOR", "unenterable")
    expected = independent_count(str(root))
    assert expected > 300

    manifest, report, summary = ingest.scan(ingest.IngestConfig(str(root)))
    assert summary["files"] == len(report) == expected
    assert summary["accepted"] + summary["rejected"] + summary["duplicate"] + summary["skipped"] == expected
    assert len(by_rel(report, str(root))) == expected  # one row per entry, none twice
    statuses = Counter(r["status"] for r in report)
    assert statuses["accepted"] == len(manifest) > 80 and statuses["skipped"] > 50
    assert all(r["reason"] for r in report if r["status"] != "accepted")
    reasons = " | ".join(r["reason"] for r in report)
    for piece in ("link outside the dataset", "symlink loop", "dangling link", "not a regular file",
                  "unreadable folder", "unreadable: Permission denied", "unknown class folder", "not an image file",
                  "not in the split/CLASS/file layout", "AppleDouble", "hidden file", "in a hidden folder",
                  "temp file", "macOS metadata folder"):
        assert piece in reasons, piece
    assert any("r\udcf6ntgen" in r["id"] for r in manifest)

    # the same files on gs:// (object stores hold no links, FIFOs, permissions or non-UTF-8 names)
    base = f"gs://{gcs_bucket}/data"
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path) or not os.path.isfile(path) or "\udc00" <= max(rel) <= "\udcff":
                continue
            with open(path, "rb") as f:
                storage.write_bytes(f"{base}/{rel}", f.read())
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    client = gcs.Client(project="neumo-local", credentials=AnonymousCredentials())
    objects = [b.name for b in client.list_blobs(gcs_bucket, prefix="data/")]
    assert len(objects) > 250
    gs_manifest, gs_report, gs_summary = ingest.scan(ingest.IngestConfig(base))
    assert gs_summary["files"] == len(gs_report) == len(objects)
    assert sorted(r["uri"] for r in gs_report) == sorted(f"gs://{gcs_bucket}/{name}" for name in objects)
    local_rows, gs_rows = by_rel(report, str(root)), by_rel(gs_report, base)
    for rel, row in gs_rows.items():  # hidden and system objects are skipped as their local twins are
        if row["status"] == "skipped" or local_rows[rel]["status"] == "skipped":
            assert (row["status"], row["reason"]) == (local_rows[rel]["status"], local_rows[rel]["reason"]), rel
