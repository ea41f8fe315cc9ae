"""DICOM through imaging.decode and ingest: files pydicom ships, and files written here from real
chest X-rays (../shared/data) with pydicom: MONOCHROME1, 12/16 bits with rescale, a window, a VOI
LUT, compressed transfer syntaxes, the header's patient id; non-image and multi-frame objects and
undecodable pixel data rejected with a one-line reason."""

import io
import shutil

import cv2
import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from neumo import dicom, imaging, ingest

# Real images: a NORMAL and a PNEUMONIA film of the Kermany train split (224x224, R=G=B JPEGs).
_REAL = ("kermany_224/train/NORMAL/IM-0115-0001.jpeg", "kermany_224/train/PNEUMONIA/person1000_bacteria_2931.jpeg")


@pytest.fixture(scope="module")
def xray(shared_data):
    """uint8 (224,224) grey of a real chest X-ray, as the pipeline reads the JPEG."""
    path = shared_data / _REAL[0]
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return imaging.read_grey(path.read_bytes())


def _shipped(name: str) -> bytes:
    """A test file that pydicom ships in its wheel (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path, f"pydicom {pydicom.__version__} no longer ships {name}"
    with open(path, "rb") as f:
        return f.read()


def _dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 8, **elements) -> Dataset:
    """A digital X-ray (for presentation) dataset holding `pixels`, plus the given elements."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID = uid.DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = uid.generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric, bits_stored)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _bytes(ds: Dataset, syntax=None, preamble: bool = True) -> bytes:
    """The dataset as a DICOM file (compressed to `syntax` first), or a bare dataset without the
    preamble and file meta when `preamble` is False."""
    if syntax is not None:
        ds.compress(syntax)
    buf = io.BytesIO()
    if preamble:
        ds.save_as(buf, enforce_file_format=True)
    else:
        ds.preamble, ds.file_meta = None, FileMetaDataset()
        ds.save_as(buf, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def _window_linear(y: np.ndarray, centre: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (the LINEAR VOI function) onto 0..255, rounded half up: the expectation."""
    c, w = centre - 0.5, width - 1
    out = np.where(y <= c - w / 2, 0.0, np.where(y > c + w / 2, 255.0, ((y - c) / w + 0.5) * 255))
    return np.floor(out + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- files pydicom ships


def test_shipped_mr_is_windowed_by_its_header_and_carries_its_patient_id():
    data = _shipped("MR_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    image, header = imaging.decode_with_header(data)
    expected = _window_linear(ds.pixel_array.astype(np.float64), float(ds.WindowCenter), float(ds.WindowWidth))
    assert image.dtype == np.uint8 and image.shape == (64, 64)
    assert np.array_equal(image, expected)
    assert header["patient_id"] == "4MR1" and header["modality"] == "MR"
    assert np.array_equal(imaging.decode(data), image)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_implicit.dcm", "MR_small_bigendian.dcm"])
def test_shipped_compressed_and_other_syntaxes_decode_to_the_uncompressed_image(name):
    image, header = dicom.decode(_shipped(name))
    assert np.array_equal(image, imaging.decode(_shipped("MR_small.dcm"))), header["transfer_syntax"]


def test_shipped_ct_applies_rescale_and_12_bit_jpeg_extended_decodes():
    ct, header = dicom.decode(_shipped("CT_small.dcm"))  # 16-bit signed, intercept -1024, no window
    ds = pydicom.dcmread(io.BytesIO(_shipped("CT_small.dcm")))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    low = -(2 ** 15) + float(ds.RescaleIntercept)  # the stored range through the rescale
    assert np.array_equal(ct, np.floor((hu - low) * 255 / 65535 + 0.5).astype(np.uint8))
    assert header["bits_stored"] == 16 and header["patient_id"] == "1CT1"
    nm, header = dicom.decode(_shipped("JPGExtended.dcm"))  # a 12-bit JPEG OpenCV cannot read
    assert nm.shape == (1024, 256) and "JPEG Extended" in header["transfer_syntax"]


def test_shipped_rgb_is_bgr_like_cv2_in_rle_jpeg_lossless_j2k_and_jpeg_baseline():
    image, header = dicom.decode(_shipped("SC_rgb_rle.dcm"))
    rgb = pydicom.dcmread(io.BytesIO(_shipped("SC_rgb_rle.dcm"))).pixel_array
    assert image.shape == (100, 100, 3) and np.array_equal(image, rgb[:, :, ::-1])
    assert imaging.read_grey(_shipped("SC_rgb_rle.dcm")).shape == (100, 100)
    for lossless in ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_gdcm_KY.dcm"):  # JPEG lossless (process 14), JPEG 2000
        assert np.array_equal(dicom.decode(_shipped(lossless))[0], image), lossless
    baseline, header = dicom.decode(_shipped("SC_rgb_jpeg_dcmtk.dcm"))  # lossy: YBR converted, close
    assert header["transfer_syntax"] == "JPEG Baseline (Process 1)"
    assert np.abs(baseline.astype(int) - image).mean() < 1.5


@pytest.mark.parametrize("name, reason", [
    ("rtstruct.dcm", "without pixel data (RTSTRUCT, RT Structure Set Storage): not an image"),  # no preamble
    ("test-SR.dcm", "without pixel data (SR, Comprehensive SR Storage)"),
    ("waveform_ecg.dcm", "without pixel data (ECG, 12-lead ECG Waveform Storage)"),
    ("SC_rgb_rle_2frame.dcm", "multi-frame DICOM (2 frames"),
    ("examples_ybr_color.dcm", "multi-frame DICOM (30 frames, US"),
    ("examples_palette.dcm", "'PALETTE COLOR'"),
    ("MR_truncated.dcm", "could not be decoded: The number of bytes of pixel data is less than expected"),
])
def test_shipped_non_images_multi_frame_and_damaged_are_refused_in_one_line(name, reason):
    with pytest.raises(imaging.ImageError) as err:
        imaging.decode(_shipped(name))
    assert reason in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- written from real X-rays


@pytest.mark.parametrize("syntax", [None, uid.RLELossless, uid.JPEG2000Lossless])
def test_real_xray_round_trips_uncompressed_and_compressed(xray, syntax):
    data = _bytes(_dataset(xray), syntax)
    image, header = imaging.decode_with_header(data)
    assert np.array_equal(image, xray), header["transfer_syntax"]
    assert header["transfer_syntax"] == (syntax or uid.ExplicitVRLittleEndian).name


def test_monochrome1_inverted_equals_the_monochrome2_original(xray):
    data = _bytes(_dataset(255 - xray, "MONOCHROME1"))
    assert np.array_equal(imaging.decode(data), xray)
    assert np.array_equal(imaging.read_grey(data), xray)


@pytest.mark.parametrize("bits, stored", [
    (12, lambda x: np.round(x.astype(np.float64) * 4095 / 255).astype(np.uint16)),
    (16, lambda x: x.astype(np.uint16) * 257),
])
@pytest.mark.parametrize("slope, intercept", [(None, None), (0.5, -1024.0), (3.0, 100.0)])
def test_12_and_16_bit_are_scaled_by_their_real_range_through_the_rescale(xray, bits, stored, slope, intercept):
    extra = {} if slope is None else {"RescaleSlope": slope, "RescaleIntercept": intercept}
    data = _bytes(_dataset(stored(xray), bits_stored=bits, **extra))
    image, header = dicom.decode(data)
    assert header["bits_stored"] == bits and image.dtype == np.uint8
    assert np.array_equal(image, xray)  # 256 grey levels kept, whatever the stored depth and rescale


def test_window_centre_and_width_in_rescaled_units(xray):
    stored = xray.astype(np.uint16) * 257
    slope, intercept = 2.0, -1000.0
    y = stored * slope + intercept
    centre, width = 128 * 257 * slope + intercept, 128 * 257 * slope  # grey 64..192 of the original
    data = _bytes(_dataset(stored, bits_stored=16, RescaleSlope=slope, RescaleIntercept=intercept,
                           WindowCenter=centre, WindowWidth=width))
    image = imaging.decode(data)
    expected = _window_linear(y, centre, width)
    assert np.array_equal(image, expected)
    assert (image[xray <= 63] == 0).all() and (image[xray >= 193] == 255).all()
    assert not np.array_equal(image, xray)


def test_voi_lut_sequence_is_applied(xray):
    lut = np.floor(255 * (np.arange(256) / 255) ** 0.5 + 0.5).astype(np.uint16)  # a gamma curve
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [256, 0, 8])
    item.add_new("LUTData", "US", lut.tolist())
    data = _bytes(_dataset(xray, VOILUTSequence=Sequence([item])))
    assert np.array_equal(imaging.decode(data), lut[xray].astype(np.uint8))


def test_without_preamble_dicom_is_told_by_content(xray):
    data = _bytes(_dataset(xray), preamble=False)
    assert not dicom.has_preamble(data) and dicom.is_dicom(data)
    assert np.array_equal(imaging.decode(data), xray)
    png = cv2.imencode(".png", xray)[1].tobytes()
    assert not dicom.is_dicom(png) and imaging.decode_with_header(png)[1] == {}


def test_header_limits_refuse_before_decoding(xray):
    big = _dataset(xray)
    big.Rows = big.Columns = 10_000  # the pixel data is 224x224: refused from the header, not decoded
    with pytest.raises(imaging.ImageError, match="too large: the header declares 10000x10000"):
        imaging.decode(_bytes(big), max_pixels=50_000_000)
    with pytest.raises(imaging.ImageError, match="too small: 16x16"):
        imaging.decode(_bytes(_dataset(xray[:16, :16])), min_side=imaging.MIN_SIDE)


def _multi_frame(xray) -> bytes:
    return _bytes(_dataset(np.stack([xray, 255 - xray]), NumberOfFrames=2))


def _undecodable(xray) -> bytes:
    ds = _dataset(xray)
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML  # video: no pinned plugin decodes it
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])
    return _bytes(ds)


def _no_pixels(xray) -> bytes:
    ds = _dataset(xray)
    del ds.PixelData
    return _bytes(ds)


@pytest.mark.parametrize("make, reason", [
    (_multi_frame, "multi-frame DICOM (2 frames, DX"),
    (_undecodable, "DICOM pixel data in MPEG2 Main Profile / Main Level could not be decoded"),
    (_no_pixels, "DICOM object without pixel data (DX, Digital X-Ray Image Storage - For Presentation)"),
    (lambda x: _bytes(_dataset(x))[:2000], "could not be decoded"),
    (lambda x: bytes(128) + b"DICM" + b"\xff" * 40, "damaged DICOM file"),
])
def test_written_bad_dicom_is_refused_with_one_line(xray, make, reason):
    with pytest.raises(imaging.ImageError) as err:
        imaging.decode(make(xray))
    assert reason in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- ingest


def test_ingest_mixes_png_and_dicom_with_header_patient_ids(shared_data, tmp_path):
    root = tmp_path / "data"
    images = {}
    for split, label, rel in [("train", "NORMAL", _REAL[0]), ("train", "PNEUMONIA", _REAL[1])]:
        folder = root / split / label
        folder.mkdir(parents=True)
        grey = imaging.read_grey((shared_data / rel).read_bytes())
        images[label] = grey
        for k in range(3):  # PNGs named by the Kermany rule
            shifted = np.roll(grey, k, axis=1)
            name = f"IM-000{k}-0001.png" if label == "NORMAL" else f"person{k}_bacteria_1.png"
            (folder / name).write_bytes(cv2.imencode(".png", shifted)[1].tobytes())
    normal, pneumonia = root / "train" / "NORMAL", root / "train" / "PNEUMONIA"
    # Two files of one patient under names the file-name rule would give two patients; one without PatientID.
    (normal / "IM-0100-0001.dcm").write_bytes(_bytes(_dataset(np.roll(images["NORMAL"], 5, 0), PatientID="PAT-A")))
    (normal / "IM-0101-0001.dcm").write_bytes(_bytes(_dataset(np.roll(images["NORMAL"], 6, 0), PatientID="PAT-A"),
                                                     uid.RLELossless))
    (normal / "IM-0102-0001.dicom").write_bytes(_bytes(_dataset(np.roll(images["NORMAL"], 7, 0))))
    (pneumonia / "person50_virus_1.dcm").write_bytes(
        _bytes(_dataset(255 - images["PNEUMONIA"], "MONOCHROME1", PatientID="PAT-B")))
    # Bad DICOM files, each a report row with its reason.
    shutil.copyfile(get_testdata_file("rtstruct.dcm", download=False), normal / "structures.dcm")
    (normal / "cine.dcm").write_bytes(_multi_frame(images["NORMAL"]))
    (pneumonia / "cut.dcm").write_bytes(_bytes(_dataset(images["PNEUMONIA"], PatientID="PAT-C"))[:3000])
    (pneumonia / "notes.dcm").write_text("not DICOM")

    manifest, report, summary = ingest.scan(ingest.IngestConfig(str(root), valid_fraction=0.5))
    rows = {r["id"].rsplit("/", 1)[-1]: r for r in manifest}
    reasons = {r["uri"].rsplit("/", 1)[-1]: r for r in report if r["status"] != "accepted"}
    assert summary["files"] == 14 and summary["accepted"] == 10 and summary["rejected"] == 4
    assert rows["IM-0100-0001.dcm"]["patient_id"] == rows["IM-0101-0001.dcm"]["patient_id"] == "PAT-A"
    assert rows["IM-0100-0001.dcm"]["fold"] == rows["IM-0101-0001.dcm"]["fold"]  # one patient, one fold
    assert rows["IM-0102-0001.dicom"]["patient_id"] == "IM-0102"  # no PatientID: the file-name rule
    assert rows["person50_virus_1.dcm"]["patient_id"] == "PAT-B"
    assert rows["IM-0001-0001.png"]["patient_id"] == "IM-0001" and rows["person1_bacteria_1.png"]["patient_id"] == "person1"
    assert (rows["person50_virus_1.dcm"]["width"], rows["person50_virus_1.dcm"]["height"]) == (224, 224)
    assert "without pixel data (RTSTRUCT" in reasons["structures.dcm"]["reason"]
    assert "multi-frame DICOM (2 frames" in reasons["cine.dcm"]["reason"]
    assert "could not be decoded" in reasons["cut.dcm"]["reason"]
    assert "only PNG and JPEG" in reasons["notes.dcm"]["reason"]
    assert all(r["status"] == "rejected" and "\n" not in r["reason"] for r in reasons.values())
