"""Bad images in, nothing lost and nothing let in: every odd file is converted correctly or
rejected with a reason, the counts reconcile, and preprocessing runs on what was accepted."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from neumo import data as nd
from neumo import imaging, ingest, preprocess, synthetic
from neumo.imaging import ImageError


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking PNG of a few hundred bytes whose header declares width x height grey pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)  # far too little data: a decoder would allocate first, then fail
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """SOI + a baseline frame header declaring width x height + EOI."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def _pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _xray(seed: int, size: int = 64) -> np.ndarray:
    return synthetic.make_xray(seed, size)[0] if hasattr(synthetic, "make_xray") else \
        np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


# name -> (expected status, a piece of the reason); None: accepted without remark
EXPECTED = {
    "train/NORMAL/zero.jpeg": ("rejected", "empty image data"),
    "train/NORMAL/truncated.jpeg": ("rejected", "undecodable"),
    "train/PNEUMONIA/truncated.png": ("rejected", "undecodable"),
    "train/NORMAL/text.jpeg": ("rejected", "only PNG and JPEG"),
    "train/NORMAL/bitmap.png": ("rejected", "only PNG and JPEG"),
    "train/NORMAL/one-pixel.png": ("rejected", "too small"),
    "train/NORMAL/thin.png": ("rejected", "too small"),
    "train/PNEUMONIA/bomb.png": ("rejected", "too large"),
    "train/PNEUMONIA/bomb.jpeg": ("rejected", "too large"),
    "train/NORMAL/sixteen-bit.png": ("accepted", None),
    "train/NORMAL/rgba.png": ("accepted", None),
    "train/PNEUMONIA/palette.png": ("accepted", None),
    "train/PNEUMONIA/cmyk.jpeg": ("accepted", None),
    "train/PNEUMONIA/exif-rotated.jpeg": ("accepted", None),
    "train/NORMAL/neumonía niño 1.jpeg": ("accepted", None),
    "train/NORMAL/nested/deeper.jpeg": ("rejected", "layout"),
    "train/NORMAL/same bytes.jpeg": ("duplicate", "same bytes as"),
    "train/PNEUMONIA/link-inside.jpeg": ("duplicate", "same bytes as"),
    "train/NORMAL/link-outside.jpeg": ("rejected", "link outside the dataset"),
    "train/NORMAL/dangling-link.jpeg": ("rejected", "link outside the dataset"),
    "train/NORMAL/fifo.jpeg": ("rejected", "not a regular file"),
    "train/COVID/unknown-class.jpeg": ("rejected", "unknown class folder 'COVID'"),
    "train/NORMAL/notes.txt": ("rejected", "not an image file"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A Kaggle-layout folder: a small clean synthetic set plus one file per kind of bad input."""
    base = tmp_path_factory.mktemp("bad-inputs")
    root, masks = base / "data", base / "masks"
    synthetic.write_kaggle(str(root), {"train": (4, 4), "test": (2, 2)}, size=64, seed=11, masks_uri=str(masks))
    clean = sorted(p for p in root.rglob("*.jpeg"))
    good = cv2.imencode(".jpeg", _xray(1))[1].tobytes()
    rng = np.random.default_rng(0)
    expected_grey = {}

    def put(rel: str, data: bytes) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    put("train/NORMAL/zero.jpeg", b"")
    put("train/NORMAL/truncated.jpeg", good[: len(good) // 2])
    png = cv2.imencode(".png", _xray(2))[1].tobytes()
    put("train/PNEUMONIA/truncated.png", png[: len(png) // 2])
    put("train/NORMAL/text.jpeg", b"this is a text file, not a chest X-ray\n")
    put("train/NORMAL/bitmap.png", cv2.imencode(".bmp", _xray(3))[1].tobytes())
    put("train/NORMAL/one-pixel.png", cv2.imencode(".png", np.full((1, 1), 128, np.uint8))[1].tobytes())
    put("train/NORMAL/thin.png", cv2.imencode(".png", np.full((400, 16), 128, np.uint8))[1].tobytes())
    put("train/PNEUMONIA/bomb.png", png_bomb())
    put("train/PNEUMONIA/bomb.jpeg", jpeg_bomb())

    sixteen = rng.integers(0, 65536, (64, 48), dtype=np.uint16)
    put("train/NORMAL/sixteen-bit.png", cv2.imencode(".png", sixteen)[1].tobytes())
    expected_grey["train/NORMAL/sixteen-bit.png"] = ((sixteen.astype(np.uint32) + 128) // 257).astype(np.uint8)
    bgra = rng.integers(0, 256, (50, 60, 4), dtype=np.uint8)
    put("train/NORMAL/rgba.png", cv2.imencode(".png", bgra)[1].tobytes())
    expected_grey["train/NORMAL/rgba.png"] = cv2.cvtColor(bgra, cv2.COLOR_BGRA2GRAY)
    pal = Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).convert("P")
    put("train/PNEUMONIA/palette.png", _pil_bytes(pal, "PNG"))
    expected_grey["train/PNEUMONIA/palette.png"] = cv2.cvtColor(np.asarray(pal.convert("RGB")), cv2.COLOR_RGB2GRAY)
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    put("train/PNEUMONIA/cmyk.jpeg", _pil_bytes(Image.fromarray(np.dstack([ramp] * 3)).convert("CMYK"), "JPEG",
                                                quality=95))
    expected_grey["train/PNEUMONIA/cmyk.jpeg"] = ramp  # up to JPEG error
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    put("train/PNEUMONIA/exif-rotated.jpeg", _pil_bytes(Image.fromarray(_xray(4)[:40]), "JPEG", exif=exif, quality=95))
    put("train/NORMAL/neumonía niño 1.jpeg", cv2.imencode(".jpeg", _xray(5))[1].tobytes())
    put("train/NORMAL/nested/deeper.jpeg", cv2.imencode(".jpeg", _xray(6))[1].tobytes())
    put("train/NORMAL/same bytes.jpeg", clean[0].read_bytes())
    # a link to an image of the dataset is read like it: the same bytes, so a duplicate of it
    (root / "train/PNEUMONIA/link-inside.jpeg").symlink_to([p for p in clean if "train/NORMAL" in p.as_posix()][-1])
    outside = put("../outside.jpeg", cv2.imencode(".jpeg", _xray(7))[1].tobytes())
    (root / "train/NORMAL/link-outside.jpeg").symlink_to(outside)
    (root / "train/NORMAL/dangling-link.jpeg").symlink_to(base / "nowhere.jpeg")
    os.mkfifo(root / "train/NORMAL/fifo.jpeg")  # reading it would block forever
    put("train/COVID/unknown-class.jpeg", cv2.imencode(".jpeg", _xray(8))[1].tobytes())
    put("train/NORMAL/notes.txt", b"radiologist notes")
    (root / "val" / "NORMAL").mkdir(parents=True)  # an empty class folder

    # masks: one of the wrong size, one corrupt; the rest fine
    mask_files = sorted(masks.rglob("*.png"))
    mask_files[0].write_bytes(cv2.imencode(".png", np.zeros((32, 32), np.uint8))[1].tobytes())
    mask_files[1].write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return {"root": root, "masks": masks, "grey": expected_grey, "clean": clean,
            "bad_masks": [m.relative_to(masks).with_suffix("").as_posix() for m in mask_files[:2]]}


@pytest.fixture(scope="module")
def scanned(corpus):
    started = time.monotonic()
    result = ingest.scan(ingest.IngestConfig(str(corpus["root"]), masks_uri=str(corpus["masks"])))
    return (*result, time.monotonic() - started)


def _rel(row, root) -> str:
    return os.path.relpath(row["uri"], root).replace(os.sep, "/")


def test_every_bad_file_is_accounted_for_with_a_reason(corpus, scanned):
    manifest, report, summary, seconds = scanned
    root = corpus["root"]
    by_rel = {_rel(r, root): r for r in report}
    for rel, (status, reason) in EXPECTED.items():
        row = by_rel[rel]
        assert row["status"] == status, (rel, row)
        if reason:
            assert reason in row["reason"], (rel, row["reason"])
    # every other file is a clean synthetic image or its accepted mate
    others = {k: v for k, v in by_rel.items() if k not in EXPECTED}
    assert {v["status"] for v in others.values()} == {"accepted"}
    # files in = accepted + rejected + duplicate + skipped, and every directory entry that is a file is there
    entries = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    assert summary["files"] == len(report) == len(entries) == len(by_rel)
    assert summary["accepted"] + summary["rejected"] + summary["duplicate"] + summary["skipped"] == len(entries)
    assert summary["accepted"] == len(manifest) == len(others) + sum(s == "accepted" for s, _ in EXPECTED.values())
    assert summary["empty_class_folders"] == ["val/NORMAL"]
    assert seconds < 10  # the bombs were refused from their headers, not decoded


def test_accepted_odd_images_are_converted_correctly(corpus, scanned):
    manifest = {_rel(r, corpus["root"]): r for r in scanned[0]}
    for rel, grey in corpus["grey"].items():
        decoded = imaging.read_grey((corpus["root"] / rel).read_bytes())
        assert decoded.shape == grey.shape and (manifest[rel]["height"], manifest[rel]["width"]) == grey.shape
        tolerance = 3 if rel.endswith(".jpeg") else 0
        assert np.abs(decoded.astype(int) - grey.astype(int)).max() <= tolerance, rel
    rotated = manifest["train/PNEUMONIA/exif-rotated.jpeg"]
    assert (rotated["width"], rotated["height"]) == (40, 64)  # stored 64 wide x 40 high, shown rotated
    assert manifest["train/NORMAL/neumonía niño 1.jpeg"]["label"] == "NORMAL"


def test_bad_masks_are_ignored_with_a_reason(corpus, scanned):
    manifest, report, _, _ = scanned
    reasons = {r["id"]: r["reason"] for r in report if r["status"] == "accepted" and r["reason"]}
    wrong, corrupt = (f"data/{stem}" for stem in corpus["bad_masks"])
    by_stem = {os.path.splitext(k)[0]: v for k, v in reasons.items()}
    assert "mask ignored: size (32, 32) differs" in by_stem[wrong]
    assert "mask ignored: undecodable" in by_stem[corrupt]
    rows = {os.path.splitext(r["id"])[0]: r for r in manifest}
    assert rows[wrong]["mask_uri"] == rows[corrupt]["mask_uri"] == ""
    assert sum(1 for r in manifest if r["mask_uri"]) == len(corpus["clean"]) - 2


def test_preprocess_runs_on_exactly_the_accepted_images(scanned, tmp_path):
    manifest = scanned[0]
    out = str(tmp_path / "p64")
    info = preprocess.prepare_variant(manifest, preprocess.PreprocessConfig(acquisition_copies=0, pixels=64, workers=1), out)
    folds = Counter(r["fold"] for r in manifest)
    assert {k: v for k, v in info["counts"].items() if v} == dict(folds)
    total = 0
    for fold, n in folds.items():
        loaded = nd.load_fold(out, fold)
        assert len(loaded) == n and loaded.images.shape[1:] == (64, 64) and loaded.images.dtype == np.uint8
        assert sorted(loaded.ids) == sorted(r["id"] for r in manifest if r["fold"] == fold)
        total += n
    assert total == len(manifest)


def test_decompression_bomb_is_refused_before_decoding(monkeypatch):
    calls = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a: calls.append(a) or real(*a))
    for bomb in (png_bomb(), jpeg_bomb(), png_bomb(8000, 7000)):
        started = time.monotonic()
        with pytest.raises(ImageError, match="too large.*decompression-bomb guard"):
            imaging.decode(bomb)
        assert time.monotonic() - started < 0.05
    assert calls == []  # OpenCV never saw the bytes, so it never allocated the image
    assert imaging.image_size(png_bomb(123, 45)) == (123, 45)
    assert imaging.image_size(jpeg_bomb(640, 480)) == (640, 480)


@pytest.mark.parametrize("data,match", [
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0", "truncated PNG"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "truncated JPEG"),
    (b"\xff\xd8\xff\xda\x00\x08", "no frame header"),
    (b"GIF89a" + b"\0" * 20, "only PNG and JPEG"),
])
def test_malformed_headers_are_image_errors(data, match):
    with pytest.raises(ImageError, match=match):
        imaging.decode(data)


def test_size_limits_are_parameters():
    small = cv2.imencode(".png", np.full((20, 40), 7, np.uint8))[1].tobytes()
    assert imaging.decode(small).shape == (20, 40)  # decode alone has no minimum side
    with pytest.raises(ImageError, match=r"too small: 40x20 pixels \(each side must be >= 32\)"):
        imaging.decode(small, min_side=imaging.MIN_SIDE)
    with pytest.raises(ImageError, match="too large"):
        imaging.decode(small, max_pixels=799)
    assert imaging.decode(small, max_pixels=800).shape == (20, 40)
