"""Awkward files, made here in tmp_path: decoding that is neither too trusting nor too strict
(big metadata, damaged JPEG data, 12-bit data, 12-bit JPEGs, 2 GiB files, strips), and files
that are never trusted after ingest (replaced, rewritten at the same size, truncated, deleted)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from neumo import cli, imaging, ingest, preprocess, stages, storage, synthetic
from neumo.imaging import ImageError

# --------------------------------------------------------------------------- the corpus


def _xray(seed: int, size: int = 128) -> np.ndarray:
    return synthetic.make_xray(seed, size)[0]


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpeg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def big_metadata_jpeg(image: np.ndarray, segments: int = 20) -> bytes:
    """A valid JPEG with `segments` full APP15 segments (64 KiB each, 1.25 MiB for 20) before its frame header."""
    plain = _jpeg(image)
    app = b"\xff\xef" + struct.pack(">H", 0xFFFF) + bytes(range(256)) * 255 + b"\0" * 253
    assert len(app) == 2 + 0xFFFF
    return plain[:2] + app * segments + plain[2:]


def damaged_jpeg(image: np.ndarray, seed: int = 0, run: int = 200) -> bytes:
    """A JPEG whose compressed data has `run` random bytes a third of the way into the scan."""
    data = bytearray(_jpeg(image))
    sos = data.index(b"\xff\xda")
    start = sos + (len(data) - sos) // 3
    data[start:start + run] = np.random.default_rng(seed).integers(0, 256, run, dtype=np.uint8).tobytes()
    return bytes(data)


def jpeg_with_precision(image: np.ndarray, precision: int, marker: int) -> bytes:
    """An 8-bit JPEG whose frame header is rewritten to SOF `marker` with `precision`-bit samples,
    as a 12-bit (SOF1) or lossless 16-bit (SOF3) JPEG declares (Pillow cannot write them)."""
    data = bytearray(_jpeg(image))
    sof = data.index(b"\xff\xc0")
    data[sof + 1] = marker
    data[sof + 4] = precision
    return bytes(data)


def png_16bit(values: np.ndarray, significant_bits: int = 0) -> bytes:
    """A 16-bit PNG of `values`, with an sBIT chunk declaring `significant_bits` when given."""
    data = _png(values.astype(np.uint16))
    if not significant_bits:
        return data
    end_of_ihdr = 8 + 12 + 13
    return data[:end_of_ihdr] + _png_chunk(b"sBIT", bytes([significant_bits])) + data[end_of_ihdr:]


def _count_imdecode(monkeypatch) -> list:
    calls = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a: calls.append(a) or real(*a))
    return calls


# --------------------------------------------------------------------------- decoding


def test_jpeg_with_over_a_mebibyte_of_metadata_is_read():
    image = _xray(1)
    data = big_metadata_jpeg(image)
    assert data.index(b"\xff\xc0") > 2**20  # the frame header lies past the first MiB
    assert imaging.image_size(data) == (128, 128)
    assert np.array_equal(imaging.decode(data), imaging.decode(_jpeg(image)))  # the metadata changes nothing


def test_damaged_jpeg_data_is_refused_with_libjpeg_reason(capfd):
    data = damaged_jpeg(_xray(2, 256))
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert decoded is not None and decoded.shape == (256, 256)  # OpenCV alone returns it, part of it grey
    capfd.readouterr()
    with pytest.raises(ImageError, match=r"corrupt JPEG data: libjpeg reports 'Corrupt JPEG data: .*not used"):
        imaging.decode(data)
    os.write(2, b"stderr still works\n")  # fd 2 is restored after the capture
    assert capfd.readouterr().err == "stderr still works\n"
    assert imaging.decode(_jpeg(_xray(2, 256))).shape == (256, 256)  # a clean JPEG prints nothing, passes


def test_capture_passes_other_output_on(monkeypatch, capfd):
    """Only libjpeg's damage warnings are taken; anything else printed meanwhile reaches stderr."""
    real = cv2.imdecode

    def noisy(buf, flags):
        os.write(2, b"another thread's log line\n")
        return real(buf, flags)

    monkeypatch.setattr(cv2, "imdecode", noisy)
    assert imaging.decode(_jpeg(_xray(3))).shape == (128, 128)
    assert capfd.readouterr().err == "another thread's log line\n"


@pytest.mark.parametrize("peak, depth", [(4095, 12), (3000, 12), (1023, 10), (900, 10), (16383, 14),
                                         (65535, 16), (255, 8)])
def test_16bit_png_is_scaled_by_its_real_range(peak, depth):
    values = np.linspace(0, peak, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    out = imaging.decode(png_16bit(values))
    top = 2**depth - 1
    assert np.array_equal(out, np.floor(values.astype(float) * 255 / top + 0.5).astype(np.uint8))
    if depth == 12 and peak == 4095:
        assert len(np.unique(out)) == 256  # not the 17 levels of v / 257
        assert len(np.unique(np.rint(values / 257))) == 17


def test_16bit_png_declared_depth_wins():
    values = np.linspace(0, 600, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    out = imaging.decode(png_16bit(values, significant_bits=12))  # sBIT: 12-bit data, however dark
    assert np.array_equal(out, np.floor(values.astype(float) * 255 / 4095 + 0.5).astype(np.uint8))
    assert out.max() == 37


@pytest.mark.parametrize("precision, marker, words", [
    (12, 0xC1, "12-bit JPEG (extended, SOF1)"),
    (16, 0xC3, "16-bit JPEG (lossless, SOF3)"),
])
def test_high_precision_jpeg_is_refused_with_the_reason(monkeypatch, precision, marker, words):
    data = jpeg_with_precision(_xray(4), precision, marker)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH) is None  # OpenCV: no reason
    calls = _count_imdecode(monkeypatch)
    with pytest.raises(ImageError, match=rf"^{re.escape(words)} is not supported by OpenCV's decoder: "
                                         r"convert it to an 8- or 16-bit PNG$"):
        imaging.decode(data)
    assert calls == []  # refused from the header


def test_strips_are_refused_from_the_header_by_ingest(monkeypatch):
    strip = _png(np.full((50, 4000), 128, np.uint8))
    assert imaging.decode(strip).shape == (50, 4000)  # decode alone has no shape limit
    calls = _count_imdecode(monkeypatch)
    with pytest.raises(ImageError, match=r"extreme aspect ratio 80:1 \(4000x50 pixels\): over 4:1"):
        imaging.decode(strip, max_aspect=imaging.MAX_ASPECT)
    with pytest.raises(ImageError, match=r"aspect ratio 4.02:1 \(50x201"):
        imaging.decode(_png(np.zeros((201, 50), np.uint8)), max_aspect=imaging.MAX_ASPECT)
    assert calls == []
    assert imaging.decode(_png(np.zeros((200, 50), np.uint8)), max_aspect=imaging.MAX_ASPECT).shape == (200, 50)


# --------------------------------------------------------------------------- ingest of the corpus


EXPECTED = {
    "train/NORMAL/big-metadata.jpeg": ("accepted", None),
    "train/NORMAL/twelve-in-sixteen.png": ("accepted", None),
    "train/NORMAL/damaged.jpeg": ("rejected", "corrupt JPEG data: libjpeg reports 'Corrupt JPEG data"),
    "train/PNEUMONIA/twelve-bit.jpeg": ("rejected", "12-bit JPEG (extended, SOF1) is not supported"),
    "train/PNEUMONIA/strip.png": ("rejected", "extreme aspect ratio 80:1 (4000x50 pixels)"),
    "train/PNEUMONIA/two-gib.png": ("rejected", "file too large: 2147483648 bytes (2048 MiB), over the limit of 256 MiB"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("awkward") / "data"
    synthetic.write_kaggle(str(root), {"train": (3, 3)}, size=64, seed=5)
    put = {
        "train/NORMAL/big-metadata.jpeg": big_metadata_jpeg(_xray(10)),
        "train/NORMAL/twelve-in-sixteen.png": png_16bit(np.linspace(0, 4095, 96 * 96).astype(np.uint16).reshape(96, 96)),
        "train/NORMAL/damaged.jpeg": damaged_jpeg(_xray(11, 256)),
        "train/PNEUMONIA/twelve-bit.jpeg": jpeg_with_precision(_xray(12), 12, 0xC1),
        "train/PNEUMONIA/strip.png": _png(np.full((50, 4000), 100, np.uint8)),
        "train/PNEUMONIA/two-gib.png": _png(_xray(13)),
    }
    for rel, data in put.items():
        (root / rel).write_bytes(data)
    os.truncate(root / "train/PNEUMONIA/two-gib.png", 2 * 2**30)  # sparse: no disk used
    return root


@pytest.fixture(scope="module")
def scanned(corpus):
    read = []
    real = storage.read_bytes
    mp = pytest.MonkeyPatch()
    mp.setattr(storage, "read_bytes", lambda uri: read.append(uri) or real(uri))
    try:
        started = time.monotonic()
        manifest, report, summary = ingest.scan(ingest.IngestConfig(str(corpus)))
        seconds = time.monotonic() - started
    finally:
        mp.undo()
    return manifest, report, summary, read, seconds


def test_corpus_statuses_and_reasons(corpus, scanned):
    manifest, report, summary, read, seconds = scanned
    by_rel = {os.path.relpath(r["uri"], corpus): r for r in report}
    for rel, (status, reason) in EXPECTED.items():
        assert by_rel[rel]["status"] == status, (rel, by_rel[rel])
        if reason:
            assert reason in by_rel[rel]["reason"], (rel, by_rel[rel]["reason"])
    assert summary["accepted"] == len(manifest) == 6 + 2
    assert not [u for u in read if u.endswith("two-gib.png")]  # refused from its size: never read
    assert seconds < 10
    rows = {os.path.relpath(r["uri"], corpus): r for r in manifest}
    assert (rows["train/NORMAL/big-metadata.jpeg"]["width"], rows["train/NORMAL/big-metadata.jpeg"]["height"]) == (128, 128)


def test_size_cap_uses_the_listing_size_when_given(tmp_path, monkeypatch):
    small = tmp_path / "x.png"
    small.write_bytes(_png(_xray(14, 64)))
    monkeypatch.setattr(storage, "read_bytes", lambda uri: pytest.fail(f"read {uri}"))
    with pytest.raises(ingest.FileTooLarge, match="over the limit of 256 MiB"):
        ingest._read_capped(str(small), size=ingest.MAX_FILE_BYTES + 1)  # as a gs:// listing would say
    row, status, reason = ingest._read_one(str(small), "data/x.png", "", "", {}, "", size=3 * 2**30)
    assert (row, status) == (None, "rejected") and reason.startswith("file too large: 3221225472 bytes")


# --------------------------------------------------------------------------- files changed after ingest


@pytest.fixture
def ingested(tmp_path):
    """A small ingested dataset: (root, manifest rows, manifest folder)."""
    root = tmp_path / "data"
    synthetic.write_kaggle(str(root), {"train": (4, 4), "val": (1, 1)}, size=64, seed=7)
    out = tmp_path / "manifest"
    stages.ingest(dataset_uri=str(root), out_dir=str(out))
    return root, stages.load_manifest(str(out)), out


def _same_size_rewrite(path: Path) -> None:
    """Change a JPEG's bytes but not its size or validity (its JFIF pixel density), keeping its mtime."""
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    assert data[6:11] == b"JFIF\0"
    data[15] ^= 0x55
    with open(path, "r+b") as f:  # in place, as an editor or a sync tool might
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # cp -p, rsync -t, tar x keep the old time


def _prepare(manifest, out, workers=1):
    return preprocess.prepare_variant(manifest, preprocess.PreprocessConfig(pixels=32, acquisition_copies=0,
                                                                            workers=workers), str(out))


@pytest.mark.parametrize("workers", [1, 2])
def test_replaced_file_is_refused_by_name_in_preprocess(ingested, tmp_path, workers):
    root, manifest, _ = ingested
    victim = next(r for r in manifest if r["label"] == "NORMAL" and r["fold"] == "train")
    other = next(r for r in manifest if r["label"] == "PNEUMONIA")
    shutil.copyfile(other["uri"], victim["uri"])  # a pneumonia image under the NORMAL label
    with pytest.raises(ValueError, match=rf"image {re.escape(victim['id'])} \({re.escape(victim['uri'])}\) "
                                         r"changed since ingest: .*: rerun ingest"):
        _prepare(manifest, tmp_path / "v", workers)
    assert not (tmp_path / "v" / "variant.json").exists()


def test_same_size_rewrite_is_refused_by_its_checksum(ingested, tmp_path):
    _, manifest, _ = ingested
    victim = manifest[3]
    _same_size_rewrite(Path(victim["uri"]))
    assert os.path.getsize(victim["uri"]) == victim["bytes"]
    with pytest.raises(ValueError, match=rf"image {re.escape(victim['id'])} .* sha256 .* \(same size\): rerun ingest"):
        _prepare(manifest, tmp_path / "v")


def test_truncated_and_deleted_files_are_named(ingested, tmp_path):
    _, manifest, _ = ingested
    truncated, deleted = manifest[1], manifest[2]
    data = Path(truncated["uri"]).read_bytes()
    Path(truncated["uri"]).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"image {re.escape(truncated['id'])} .* {len(data) // 2} bytes, "
                                         rf"the manifest says {len(data)}: rerun ingest"):
        _prepare(manifest, tmp_path / "a")
    Path(truncated["uri"]).write_bytes(data)
    os.unlink(deleted["uri"])
    with pytest.raises(FileNotFoundError, match=rf"image {re.escape(deleted['id'])} .* gone since ingest"):
        _prepare(manifest, tmp_path / "b")


def test_decode_error_in_preprocess_names_the_file(tmp_path):
    """A file that matches its row but does not decode (a hand-made row) is named in the error."""
    path = tmp_path / "x.jpeg"
    data = _jpeg(_xray(15, 64))[:300]
    path.write_bytes(data)
    row = {"id": "data/train/NORMAL/x.jpeg", "uri": str(path), "fold": "train", "target": 0,
           "bytes": len(data), "checksum": hashlib.sha256(data).hexdigest()}
    with pytest.raises(ImageError, match=rf"^image data/train/NORMAL/x.jpeg \({re.escape(str(path))}\): undecodable"):
        _prepare([row], tmp_path / "v")


def test_cli_preprocess_exits_non_zero_naming_the_file(ingested, tmp_path, caplog):
    root, manifest, out = ingested
    victim = manifest[0]
    shutil.copyfile(manifest[-1]["uri"], victim["uri"])
    code = cli.main(["preprocess", "--manifest", str(out), "--pixels", "32", "--workers", "1",
                     "--out", str(tmp_path / "v")])
    assert code == 2
    assert f"image {victim['id']} ({victim['uri']}) changed since ingest" in caplog.text


def test_read_verified(ingested):
    _, manifest, _ = ingested
    row = manifest[0]
    assert ingest.read_verified(row) == Path(row["uri"]).read_bytes()
    _same_size_rewrite(Path(row["uri"]))
    with pytest.raises(ValueError, match=rf"^image {re.escape(row['id'])} \({re.escape(row['uri'])}\) changed "
                                         "since ingest: sha256"):
        ingest.read_verified(row)
    Path(row["uri"]).write_bytes(b"\xff\xd8 shorter")
    with pytest.raises(ValueError, match=r"changed since ingest: 10 bytes, the manifest says \d+: rerun ingest"):
        ingest.read_verified(row)
    with pytest.raises(ValueError, match="no bytes/checksum"):
        ingest.read_verified({"id": "x", "uri": row["uri"]})


def test_same_size_rewrite_changes_the_fingerprint(ingested):
    root, manifest, _ = ingested
    before = stages.fingerprint(dataset_uri=str(root))
    for r in manifest:  # reading (ingest, preprocess) leaves the fingerprint as it is
        Path(r["uri"]).read_bytes()
    assert stages.fingerprint(dataset_uri=str(root)) == before
    time.sleep(0.05)  # past the coarsest file-time granularity (a 10 ms jiffy) of older kernels
    path = Path(manifest[0]["uri"])
    size, mtime = os.path.getsize(path), os.stat(path).st_mtime_ns
    _same_size_rewrite(path)
    assert (os.path.getsize(path), os.stat(path).st_mtime_ns) == (size, mtime)  # what the old fingerprint saw
    after = stages.fingerprint(dataset_uri=str(root))
    assert after != before
    time.sleep(0.05)
    replacement = path.with_name(".tmp-replacement")  # an atomic replace with the old time kept
    shutil.copy2(path, replacement)
    os.replace(replacement, path)
    assert stages.fingerprint(dataset_uri=str(root)) != after
