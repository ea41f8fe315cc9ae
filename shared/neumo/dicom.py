"""DICOM files -> the 8-bit image the rest of the pipeline reads, with pydicom.

What a radiologist's viewer shows, in the DICOM order (PS3.4 N.2, the grayscale pipeline): stored
values -> Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence) -> VOI LUT (a VOI LUT
Sequence, else the first Window Center/Width) -> MONOCHROME1 inverted -> uint8 by the output's real
range: the range the VOI stage maps onto, which without a window is the stored range (2**BitsStored
values, signed or not) through the Modality LUT, so 12-bit data becomes round(v * 255 / 4095) and
16-bit data round(v / 257), as 12- and 16-bit PNGs do (:func:`neumo.imaging._to_8bit`). RGB and YBR
are returned as BGR, as cv2.imread returns colour. Compressed transfer syntaxes are decoded by the
pinned plugins pydicom finds (pylibjpeg with libjpeg, openjpeg and rle: JPEG baseline, extended and
lossless, JPEG-LS, JPEG 2000, RLE). Multi-frame objects, objects without pixel data (structured
reports, RT structure sets, waveforms) and pixel data no plugin decodes are refused with a one-line
:class:`~neumo.imaging.ImageError`, before any pixel is decoded where the header says enough.

Bytes in, arrays out; pydicom is imported only here, and this module only when a file is DICOM.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from neumo.imaging import MAX_PIXELS, ImageError, check_dimensions

__all__ = ["decode", "has_preamble", "is_dicom"]

#: Where a DICOM file (PS3.10) puts b"DICM": after a 128-byte preamble.
_MAGIC_OFFSET = 128
_MAGIC = b"DICM"
# What pydicom raises on damaged or unexpected data, in parsing or in decoding pixels: its own
# InvalidDicomError, struct and numpy errors on short data, NotImplementedError/RuntimeError when no
# plugin decodes a transfer syntax, AttributeError/KeyError for a required element missing.
_PYDICOM_ERRORS = (InvalidDicomError, ValueError, TypeError, KeyError, IndexError, AttributeError, EOFError,
                   OverflowError, struct.error, NotImplementedError, RuntimeError, UnicodeError)
_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


def has_preamble(data: bytes | bytearray | memoryview) -> bool:
    """Whether the bytes carry the DICOM file marker b"DICM" at offset 128 (a PS3.10 file)."""
    return bytes(data[_MAGIC_OFFSET:_MAGIC_OFFSET + 4]) == _MAGIC


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (pydicom's span several), with its type when empty."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _parse(data: bytes | bytearray | memoryview, force: bool) -> pydicom.Dataset:
    # pydicom reports what it reads leniently (an invalid value) with its logger and a warning.
    return pydicom.dcmread(io.BytesIO(bytes(data)), force=force)


def _read(data: bytes | bytearray | memoryview) -> pydicom.Dataset | None:
    """The dataset in `data`; None when the bytes are not DICOM at all.

    A file with the "DICM" marker is DICOM: a parse failure is an ImageError ("damaged DICOM").
    Without it (older files, a bare dataset) the bytes count as DICOM only when pydicom parses
    them and finds pixel data with Rows and Columns (an image to decode) or a SOP Class UID (an
    object to refuse by what it is, say an RT structure set), so a text file or a BMP is never
    taken for one.
    """
    if has_preamble(data):
        try:
            ds = _parse(data, force=False)
        except _PYDICOM_ERRORS as err:
            raise ImageError(f"damaged DICOM file ({len(data)} bytes): pydicom cannot parse it: "
                             f"{_one_line(err)}") from err
        if not len(ds):
            raise ImageError(f"damaged DICOM file ({len(data)} bytes): no data elements after the 'DICM' marker")
        return _with_syntax(ds)
    if not _bare_dataset_start(data):
        return None
    try:
        ds = _parse(data, force=True)
        found = ("PixelData" in ds and "Rows" in ds and "Columns" in ds) or "SOPClassUID" in ds
    except _PYDICOM_ERRORS:
        return None
    return _with_syntax(ds) if found else None


def _bare_dataset_start(data: bytes | bytearray | memoryview) -> bool:
    """Whether the bytes open like a DICOM dataset without preamble: a first tag in group 0002
    (file meta) or 0008 (identification), either byte order. Spares pydicom the parse of any other
    file (a GIF, a BMP, text) that reaches the decoder."""
    head = bytes(data[:2])
    return len(head) == 2 and (int.from_bytes(head, "little") in (0x0002, 0x0008)
                               or int.from_bytes(head, "big") in (0x0002, 0x0008))


def _with_syntax(ds: pydicom.Dataset) -> pydicom.Dataset:
    """`ds` with a Transfer Syntax UID in its file meta: a bare dataset (no meta) or one whose meta
    lacks it is uncompressed in the encoding pydicom read it with (compressed data would say)."""
    meta = ds.file_meta if getattr(ds, "file_meta", None) is not None else FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if implicit is not None and little is not None:
            meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit and little else
                                      uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
            ds.file_meta = meta
    return ds


def is_dicom(data: bytes | bytearray | memoryview) -> bool:
    """Whether `data` is a DICOM file: the "DICM" marker at offset 128, or (no preamble) bytes
    pydicom parses into a dataset with pixel data or a SOP Class UID."""
    if has_preamble(data):
        return True
    return _read(data) is not None


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else " ".join(str(value).replace("\0", " ").split())


def _header(ds: pydicom.Dataset) -> dict:
    """What the header says that ingest and a report use: patient id ("" when absent), modality, ..."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    sop = ds.get("SOPClassUID")
    return {
        "format": "DICOM",
        "patient_id": _text(ds, "PatientID"),
        "modality": _text(ds, "Modality"),
        "sop_class": getattr(sop, "name", "") or str(sop or ""),
        "transfer_syntax": getattr(syntax, "name", "") or str(syntax or "an unknown transfer syntax"),
        "photometric": _text(ds, "PhotometricInterpretation"),
        "bits_stored": int(ds.get("BitsStored") or 0),
        "rows": int(ds.get("Rows") or 0),
        "columns": int(ds.get("Columns") or 0),
    }


def _what(info: dict) -> str:
    """'CT, CT Image Storage' for a reason: what the object is."""
    return ", ".join(x for x in (info["modality"], info["sop_class"]) if x) or "no modality or SOP class"


def _check_header(ds: pydicom.Dataset, info: dict, max_pixels: int, min_side: int, max_aspect: float) -> None:
    """Refuse, before decoding any pixel, what the pipeline cannot use, with the reason."""
    if "PixelData" not in ds:
        other = next((k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds), "")
        if other:
            raise ImageError(f"DICOM {other} ({_what(info)}): floating-point pixel data is not supported")
        raise ImageError(f"DICOM object without pixel data ({_what(info)}): not an image")
    frames = ds.get("NumberOfFrames")
    try:
        frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        raise ImageError(f"DICOM NumberOfFrames {frames!r} is not a number") from None
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames, {_what(info)}): one radiograph per file is "
                         "expected; export the frame to use as its own file")
    if not info["rows"] or not info["columns"]:
        raise ImageError(f"DICOM image without Rows/Columns ({_what(info)}): its size is unknown")
    check_dimensions(info["columns"], info["rows"], max_pixels, min_side, max_aspect)
    photometric, samples = info["photometric"], int(ds.get("SamplesPerPixel") or 1)
    if not (photometric in _GREY and samples == 1) and not (photometric in _COLOUR and samples == 3):
        raise ImageError(f"DICOM photometric interpretation {photometric or 'missing'!r} with {samples} "
                         "sample(s) per pixel is not supported (MONOCHROME1/2, RGB or YBR only)")
    if not 1 <= info["bits_stored"] <= 16:
        raise ImageError(f"DICOM BitsStored {info['bits_stored']} is not supported (1 to 16 bits)")


def _pixels(ds: pydicom.Dataset, info: dict) -> np.ndarray:
    """The stored values (colour as RGB), decoded by whichever pinned plugin handles the syntax."""
    try:
        arr = ds.pixel_array
    except _PYDICOM_ERRORS as err:
        raise ImageError(f"DICOM pixel data in {info['transfer_syntax']} could not be decoded: "
                         f"{_one_line(err)}") from err
    except MemoryError:
        raise ImageError(f"DICOM pixel data in {info['transfer_syntax']} too large to decode in memory") from None
    expected = (info["rows"], info["columns"]) + ((3,) if info["photometric"] in _COLOUR else ())
    if arr.shape != expected:
        raise ImageError(f"DICOM pixel data decoded to shape {arr.shape}, the header says {expected}")
    return arr


def _stored_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """(lowest, highest) value the stored bits can hold, signed or not (PixelRepresentation)."""
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation") or 0) == 0:
        return 0.0, float(2 ** bits - 1)
    return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)


def _output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The range the Modality LUT maps the stored range onto; pydicom's windowing maps onto the same
    (pydicom.pixels.apply_windowing: y_min, y_max), so one range serves both."""
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2 ** bits - 1)
    low, high = _stored_range(ds)
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = low * slope + intercept, high * slope + intercept
    return low, high


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """values in [low, high] -> uint8, round((v - low) * 255 / (high - low)) half up, clipped."""
    if high == low:
        raise ImageError(f"DICOM output range is a single value ({low:g}): no contrast to scale")
    scaled = np.floor((values.astype(np.float64) - low) * 255.0 / (high - low) + 0.5)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _grey(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Stored grey values -> uint8 as displayed: Modality LUT, VOI LUT or window, MONOCHROME1 inverted."""
    values = apply_modality_lut(arr, ds)
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        values = apply_voi(values, ds)
        low, high = 0.0, float(2 ** int(item.LUTDescriptor[2]) - 1)
    else:
        low, high = _output_range(ds)
        if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            values = apply_windowing(values, ds)  # the first window, onto [low, high]
    if high < low:  # a negative Rescale Slope
        values, low, high = low + high - values, high, low
    grey = _scale(values, low, high)
    return 255 - grey if ds.PhotometricInterpretation == "MONOCHROME1" else grey


def _colour(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """RGB values (pydicom converts YBR) -> uint8 BGR, as cv2.imread returns colour."""
    rgb = arr if arr.dtype == np.uint8 and int(ds.BitsStored) == 8 else _scale(arr, 0.0, float(2 ** int(ds.BitsStored) - 1))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def decode(data: bytes | bytearray | memoryview, *, max_pixels: int = MAX_PIXELS, min_side: int = 0,
           max_aspect: float = 0.0) -> tuple[np.ndarray, dict]:
    """DICOM bytes -> (uint8 (H,W) grey or (H,W,3) BGR as displayed, header dict).

    The header dict: patient_id ("" when absent), modality, sop_class, transfer_syntax,
    photometric, bits_stored, rows, columns. Size limits as :func:`neumo.imaging.decode`, from
    Rows/Columns before decoding. Raises :class:`~neumo.imaging.ImageError` (one line) for bytes that
    are not DICOM, damaged files, multi-frame and non-image objects, unsupported photometric
    interpretations or bit depths, and pixel data no installed plugin decodes.
    """
    ds = _read(data)
    if ds is None:
        raise ImageError(f"not a DICOM file ({len(data)} bytes): no 'DICM' marker and pydicom finds no image in it")
    try:
        info = _header(ds)
    except _PYDICOM_ERRORS as err:
        raise ImageError(f"damaged DICOM header: {_one_line(err)}") from err
    _check_header(ds, info, max_pixels, min_side, max_aspect)
    arr = _pixels(ds, info)
    try:
        image = _grey(arr, ds) if info["photometric"] in _GREY else _colour(arr, ds)
    except ImageError:
        raise
    except _PYDICOM_ERRORS as err:
        raise ImageError(f"DICOM {info['photometric']} values could not be converted for display: "
                         f"{_one_line(err)}") from err
    return np.ascontiguousarray(image), info
