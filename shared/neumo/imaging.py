"""Pure array functions: decoding, the seed's preprocessing chain and the lung-mask helpers.

The research group's chain (the "seed"), reproduced here given the same decoded image::

    img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    img = cv2.resize(img, (pixels, pixels))          # INTER_LINEAR
    img = np.expand_dims(img, axis=-1)
    img = cv2.createCLAHE(clipLimit=...).apply(img)  # tile 8x8, default clip 40.0
    img = (img - np.mean(img)) / np.std(img)

The pipeline stores the uint8 image after CLAHE (:func:`prepare_uint8`) and applies the
z-score when the data is read (:func:`zscore` / :func:`zscore_tf`); :func:`prepare` is both
steps at once. Nothing here touches files: bytes in, arrays out.
"""

from __future__ import annotations

import numbers
import os
import tempfile
import threading

import cv2
import numpy as np

__all__ = [
    "CLAHE_CLIPS",
    "ImageError",
    "MAX_ASPECT",
    "MAX_PIXELS",
    "MIN_SIDE",
    "apply_mask",
    "clahe_limit",
    "check_dimensions",
    "decode",
    "decode_with_header",
    "image_size",
    "mask_input",
    "mask_qa",
    "postprocess_mask",
    "prepare",
    "prepare_uint8",
    "read_grey",
    "to_grey",
    "zscore",
    "zscore_tf",
]

#: The CLAHE clip limits the research group used: OpenCV's default (None), 2.0 and 20.0.
CLAHE_CLIPS = (None, 2.0, 20.0)
#: OpenCV's default CLAHE clip limit (``cv2.createCLAHE()``), used for ``clip=None``.
OPENCV_DEFAULT_CLIP = 40.0
#: CLAHE tile grid, OpenCV's default and the seed's.
CLAHE_TILES = (8, 8)

#: Mask QA thresholds on the lung fraction of the image.
MIN_LUNG_FRACTION = 0.05
MAX_LUNG_FRACTION = 0.7

#: Decompression-bomb guard: images declaring more pixels than this are refused from their header.
MAX_PIXELS = 50_000_000
#: The smallest side ingest accepts (a smaller image carries no usable chest anatomy).
MIN_SIDE = 32
#: The most elongated image ingest accepts, long side : short side. The widest real film in our data
#: is 2.96:1 (Kermany full resolution); a strip beyond 4:1 is no chest radiograph, and the seed's
#: square resize would squash it by more than 4x, so it is rejected rather than flagged.
MAX_ASPECT = 4.0
#: The bit depths a 16-bit PNG's data is assumed to have when it declares none (sBIT): detectors
#: digitise to 10, 12, 14 or 16 bits (8: 8-bit data stored in 16-bit samples).
_SAMPLE_DEPTHS = (8, 10, 12, 14, 16)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8, CC are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_PROCESS = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless",
                 0xC5: "differential", 0xC6: "differential progressive", 0xC7: "differential lossless",
                 0xC9: "extended arithmetic", 0xCA: "progressive arithmetic", 0xCB: "lossless arithmetic",
                 0xCD: "differential arithmetic", 0xCE: "differential progressive arithmetic",
                 0xCF: "differential lossless arithmetic"}
# What libjpeg prints (to stderr, as a warning) when the compressed data is damaged; OpenCV still
# returns an image then, with the damaged part filled grey.
_JPEG_DAMAGE = (b"Corrupt JPEG data", b"Premature end of JPEG file", b"Inconsistent progression sequence",
                b"Invalid SOS parameters")
# IMREAD_UNCHANGED keeps alpha and 16 bits but ignores the EXIF orientation that cv2.imread
# (IMREAD_COLOR) applies; ANYCOLOR|ANYDEPTH applies it and keeps grey/colour and depth.
_FLAGS_ORIENTED = cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH


class ImageError(ValueError):
    """The bytes or array are not an image this pipeline can use (the message says why)."""


# --------------------------------------------------------------------------- validation


def _check_pixels(pixels: object) -> int:
    """Return ``pixels`` as int: a positive integer (bool and non-integers rejected)."""
    if isinstance(pixels, bool) or not isinstance(pixels, numbers.Integral):
        raise ValueError(f"pixels must be a positive integer, got {pixels!r}")
    value = int(pixels)
    if value <= 0:
        raise ValueError(f"pixels must be a positive integer, got {value}")
    return value


def clahe_limit(clip: float | None) -> float:
    """OpenCV clip limit (float) for a seed CLAHE clip: None -> 40.0 (OpenCV's default), 2.0, 20.0."""
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real)):
        raise ValueError(f"CLAHE clip must be one of {CLAHE_CLIPS}, got {clip!r}")
    if clip not in CLAHE_CLIPS:
        raise ValueError(f"CLAHE clip must be one of {CLAHE_CLIPS} (None = OpenCV default "
                         f"{OPENCV_DEFAULT_CLIP}), got {clip!r}")
    return OPENCV_DEFAULT_CLIP if clip is None else float(clip)


# --------------------------------------------------------------------------- decoding


def _decode_flags(buf: bytes | bytearray | memoryview) -> int:
    """IMREAD_UNCHANGED for PNGs without EXIF (alpha and 16 bits kept), else orientation-aware."""
    head = bytes(buf[:8])
    if head == _PNG_SIGNATURE and b"eXIf" not in bytes(buf[:1 << 16]):
        return cv2.IMREAD_UNCHANGED
    return _FLAGS_ORIENTED


def _jpeg_frame(buf: bytes) -> tuple[int, int, int, int]:
    """(width, height, sample precision in bits, SOF marker) from the first frame header of a JPEG.

    The walk jumps from segment to segment by their lengths, so metadata of any size (EXIF, ICC
    profiles, many APPn segments) before the frame header costs a few steps, not a copy.
    """
    i, n = 2, len(buf)
    while i < n:
        if buf[i] != 0xFF:
            raise ImageError(f"corrupt JPEG: no marker at byte {i}")
        while i < n and buf[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = buf[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            raise ImageError("corrupt JPEG: no frame header before the image data")
        if i + 2 > n:
            break
        length = int.from_bytes(buf[i:i + 2], "big")
        if length < 2:
            raise ImageError(f"corrupt JPEG: segment length {length} at byte {i}")
        if marker in _JPEG_SOF:
            if i + 7 > n:
                break
            return (int.from_bytes(buf[i + 5:i + 7], "big"), int.from_bytes(buf[i + 3:i + 5], "big"),
                    buf[i + 2], marker)
        i += length
    raise ImageError(f"undecodable image data ({n} bytes): truncated JPEG, no frame header")


def _jpeg_size(buf: bytes) -> tuple[int, int]:
    """(width, height) from the first start-of-frame segment of a JPEG."""
    return _jpeg_frame(buf)[:2]


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) a PNG or JPEG declares in its header, read without decoding any pixel.

    Raises :class:`ImageError` for other formats (only PNG and JPEG are accepted) and for
    headers too short or malformed to say.
    """
    buf = _as_bytes(data)
    if buf.startswith(_PNG_SIGNATURE):
        if len(buf) < 24 or buf[12:16] != b"IHDR":
            raise ImageError(f"undecodable image data ({len(data)} bytes): truncated PNG, no IHDR header")
        return int.from_bytes(buf[16:20], "big"), int.from_bytes(buf[20:24], "big")
    if buf.startswith(b"\xff\xd8"):
        return _jpeg_size(buf)
    raise ImageError(f"unsupported or undecodable image data ({len(data)} bytes, starts with {buf[:8]!r}): "
                     "only PNG and JPEG images and DICOM files are accepted")


def check_dimensions(width: int, height: int, max_pixels: int = MAX_PIXELS, min_side: int = 0,
                     max_aspect: float = 0.0) -> None:
    """Refuse, from a header's width and height, images too large to decode safely ("too large"),
    too small ("too small") or too elongated ("extreme aspect ratio"; ``max_aspect`` 0: any shape)."""
    if width * height > max_pixels:
        raise ImageError(f"too large: the header declares {width}x{height} = {width * height / 1e6:.0f} megapixels, "
                         f"over the limit of {max_pixels / 1e6:g} (decompression-bomb guard); not decoded")
    if width < max(min_side, 1) or height < max(min_side, 1):
        raise ImageError(f"too small: {width}x{height} pixels (each side must be >= {max(min_side, 1)})")
    if max_aspect and max(width, height) > max_aspect * min(width, height):
        ratio = max(width, height) / min(width, height)
        raise ImageError(f"extreme aspect ratio {ratio:.3g}:1 ({width}x{height} pixels): over {max_aspect:g}:1, "
                         "not a chest radiograph, and the seed's square resize would squash it")


def _check_size(data: bytes, max_pixels: int, min_side: int, max_aspect: float = 0.0) -> None:
    """Refuse, from the header alone, images too large to decode safely, too small or too elongated
    to use (``max_aspect`` 0: any shape), and JPEGs of a sample precision OpenCV cannot decode."""
    buf = _as_bytes(data)
    width, height, precision, marker = _jpeg_frame(buf) if buf.startswith(b"\xff\xd8") else (*image_size(buf), 8, 0)
    check_dimensions(width, height, max_pixels, min_side, max_aspect)
    if precision != 8:  # libjpeg as OpenCV builds it decodes 8-bit samples only (12-bit: None, no reason)
        raise ImageError(f"{precision}-bit JPEG ({_JPEG_PROCESS[marker]}, SOF{marker - 0xC0}) is not supported by "
                         "OpenCV's decoder: convert it to an 8- or 16-bit PNG")


# libjpeg reports damaged compressed data only by printing a warning to stderr (fd 2), and OpenCV
# returns the image regardless; the only way to see it is to catch what is printed while decoding.
_capture_lock = threading.Lock()
_capture_files: dict[int, object] = {}  # pid -> the file fd 2 is pointed at while decoding


def _capture_fd() -> int:
    """This process's capture file (a forked child makes its own)."""
    pid = os.getpid()
    if pid not in _capture_files:
        if hasattr(os, "memfd_create"):
            _capture_files[pid] = os.fdopen(os.memfd_create("neumo-decoder-messages"), "w+b")
        else:
            _capture_files[pid] = tempfile.TemporaryFile()
    return _capture_files[pid].fileno()


def _imdecode_jpeg(buf: np.ndarray, flags: int) -> tuple[np.ndarray | None, str]:
    """cv2.imdecode of a JPEG, and libjpeg's first warning about damaged data ("" if none).

    fd 2 points at a capture file during the call: one decode at a time per process, five system
    calls (~5 us, against ~300 us to decode a 224x224 JPEG). Whatever else was printed meanwhile
    (another thread's log line) is passed on to stderr.
    """
    with _capture_lock:
        try:
            fd = _capture_fd()
            saved = os.dup(2)
        except OSError:  # no stderr to redirect (a daemon): decode without the check
            return cv2.imdecode(buf, flags), ""
        os.dup2(fd, 2)
        try:
            image = cv2.imdecode(buf, flags)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        size = os.lseek(fd, 0, os.SEEK_CUR)  # what was written: fd 2 shared this offset
        printed = b""
        if size:  # emptied, and the offset back to 0, for the next decode
            printed = os.pread(fd, size, 0)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
    if not printed:
        return image, ""
    lines = printed.splitlines(keepends=True)
    damage = [line for line in lines if line.startswith(_JPEG_DAMAGE)]
    other = b"".join(line for line in lines if not line.startswith(_JPEG_DAMAGE))
    if other:
        os.write(2, other)
    return image, damage[0].decode("ascii", "replace").strip() if damage else ""


def _png_significant_bits(buf: bytes) -> int:
    """The bit depth a PNG declares for its data in an sBIT chunk (before IDAT), 0 if none."""
    i, n = 8, len(buf)
    while i + 8 <= n:
        length, kind = int.from_bytes(buf[i:i + 4], "big"), buf[i + 4:i + 8]
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"sBIT" and 1 <= length <= 4 and i + 8 + length <= n:
            colour = buf[i + 8:i + 8 + length]
            channels = colour[:3] if length >= 3 else colour[:1]  # grey or RGB; not alpha
            bits = max(channels)
            return bits if 1 <= bits <= 16 else 0
        i += 12 + length
    return 0


def _to_8bit(image: np.ndarray, data: bytes) -> np.ndarray:
    """uint16 samples -> uint8 by their real range: v * 255 / (2**d - 1), rounded to nearest.

    d is the depth the PNG declares in sBIT if any, else the smallest of 8, 10, 12, 14 and 16
    bits that holds the image's largest value: 16-bit data is v / 257 as before, 12-bit data
    (max <= 4095) v * 255 / 4095 and keeps 256 grey levels instead of 16.
    """
    peak = int(image.max())
    depth = _png_significant_bits(data) or next(d for d in _SAMPLE_DEPTHS if peak < 1 << d)
    top = (1 << depth) - 1
    scaled = (image.astype(np.uint32) * 510 + top) // (2 * top)  # round(v * 255 / top), half up
    return np.minimum(scaled, 255).astype(np.uint8)


def decode(data: bytes, *, max_pixels: int = MAX_PIXELS, min_side: int = 0, max_aspect: float = 0.0,
           check_damage: bool = True) -> np.ndarray:
    """Image bytes -> uint8 (H,W) grey, (H,W,3) BGR or (H,W,4) BGRA, pixels as cv2.imread sees them.

    16-bit images become 8-bit by their real range (see :func:`_to_8bit`: 16-bit data as
    round(v / 257), 12-bit data as round(v * 255 / 4095)); palette PNGs are expanded to BGR(A).
    EXIF orientation is applied as ``cv2.imread`` does (for such files alpha is dropped,
    which does not change the grey image). PNG, JPEG and DICOM are read (DICOM told by its
    content, not its name, and converted as :mod:`neumo.dicom` says: Modality LUT, VOI LUT or
    window, MONOCHROME1 inverted), and their header is
    checked BEFORE any pixel is decoded: over ``max_pixels`` ("too large", a decompression
    bomb), a side under ``min_side`` ("too small"), a long side over ``max_aspect`` times the
    short one (0: no limit) or a JPEG sample precision other than 8 bits is refused. Raises
    :class:`ImageError` for empty, truncated, undecodable, unsupported (float, signed, other
    formats) images, and for JPEGs whose compressed data libjpeg reports damaged (OpenCV
    would return them with the damaged part grey). ``check_damage=False`` skips that watch
    (~10 us) for bytes already known good: verified against the sha256 of what ingest accepted.
    """
    return decode_with_header(data, max_pixels=max_pixels, min_side=min_side, max_aspect=max_aspect,
                              check_damage=check_damage)[0]


def decode_with_header(data: bytes, *, max_pixels: int = MAX_PIXELS, min_side: int = 0, max_aspect: float = 0.0,
                       check_damage: bool = True) -> tuple[np.ndarray, dict]:
    """(:func:`decode`'s image, what the file's header says beyond the pixels): for DICOM the dict of
    :func:`neumo.dicom.decode` (patient_id, modality, ...), for PNG and JPEG an empty dict."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("empty image data (0 bytes)")
    head = bytes(data[:8])
    if not (head.startswith(_PNG_SIGNATURE) or head.startswith(b"\xff\xd8")):
        from neumo import dicom  # imports pydicom: only for bytes that are neither PNG nor JPEG

        if dicom.is_dicom(data):
            return dicom.decode(data, max_pixels=max_pixels, min_side=min_side, max_aspect=max_aspect)
    return _decode_png_jpeg(data, max_pixels, min_side, max_aspect, check_damage), {}


def _decode_png_jpeg(data: bytes, max_pixels: int, min_side: int, max_aspect: float,
                     check_damage: bool) -> np.ndarray:
    """:func:`decode` for PNG and JPEG (anything else: ImageError from the header check)."""
    _check_size(data, max_pixels, min_side, max_aspect)
    buf = np.frombuffer(data, dtype=np.uint8)
    damage = ""
    try:
        if check_damage and bytes(data[:2]) == b"\xff\xd8":
            image, damage = _imdecode_jpeg(buf, _FLAGS_ORIENTED)
        else:
            image = cv2.imdecode(buf, _decode_flags(data))
    except cv2.error as exc:  # OpenCV raises for some malformed inputs instead of returning None
        raise ImageError(f"OpenCV could not decode {len(data)} bytes: {exc}") from exc
    if image is None or image.size == 0:
        said = f" (libjpeg: {damage})" if damage else ""
        raise ImageError(f"undecodable image data ({len(data)} bytes, starts with "
                         f"{bytes(data[:8])!r}): not an image OpenCV can read, or truncated{said}")
    if damage:
        raise ImageError(f"corrupt JPEG data: libjpeg reports {damage!r}; OpenCV would fill the damaged "
                         "part with grey, so the image is not used")
    if image.dtype == np.uint16:
        image = _to_8bit(image, _as_bytes(data))
    elif image.dtype != np.uint8:
        raise ImageError(f"unsupported pixel type {image.dtype} (only 8- and 16-bit unsigned "
                         "images are supported)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] not in (3, 4):
        raise ImageError(f"unsupported channel count {image.shape[2]}")
    return np.ascontiguousarray(image)


def to_grey(image: np.ndarray) -> np.ndarray:
    """uint8 (H,W), (H,W,1), (H,W,3) BGR or (H,W,4) BGRA -> uint8 (H,W) grey, via cv2.cvtColor."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"to_grey expects a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.size == 0:
        raise ImageError(f"empty image array, shape {image.shape}")
    if image.ndim == 2:
        return image
    if image.ndim != 3:
        raise ImageError(f"expected (H,W) or (H,W,C) image, got shape {image.shape}")
    channels = image.shape[2]
    if channels == 1:
        return image[:, :, 0]
    if channels == 2:  # grey + alpha
        return np.ascontiguousarray(image[:, :, 0])
    if channels == 3:
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2GRAY)
    if channels == 4:
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGRA2GRAY)
    raise ImageError(f"unsupported channel count {channels} (expected 1, 3 or 4)")


def read_grey(data: bytes) -> np.ndarray:
    """Image bytes -> uint8 (H,W) grey; equals cv2.cvtColor(cv2.imread(path), COLOR_BGR2GRAY) for 8-bit files."""
    return to_grey(decode(data))


# --------------------------------------------------------------------------- seed chain


def prepare_uint8(image: np.ndarray, pixels: int, clahe_clip: float | None = None) -> np.ndarray:
    """Decoded image (grey/BGR/BGRA uint8) -> uint8 (pixels,pixels): grey, resize (INTER_LINEAR), CLAHE 8x8."""
    size = _check_pixels(pixels)
    limit = clahe_limit(clahe_clip)
    grey = to_grey(image)
    resized = cv2.resize(grey, (size, size), interpolation=cv2.INTER_LINEAR)
    clahe = cv2.createCLAHE(clipLimit=limit, tileGridSize=CLAHE_TILES)
    return clahe.apply(resized)


def _zscore_one(image: np.ndarray) -> np.ndarray:
    """One image (any shape) -> float64 z-score exactly as the seed computes it; zeros if constant."""
    mean = np.mean(image)
    std = np.std(image)
    if not np.isfinite(std) or std <= 0:
        return np.zeros(image.shape, dtype=np.float64)
    return (image - mean) / std


def _as_image_stack(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """Normalise to (N,p,p); return the stack and whether the input was a single image."""
    if x.ndim == 2:
        return x[None], True
    if x.ndim == 3 and x.shape[-1] == 1:  # (p,p,1): one image with a channel axis
        return x[None, :, :, 0], True
    if x.ndim == 3:
        return x, False
    if x.ndim == 4 and x.shape[-1] == 1:
        return x[..., 0], False
    raise ValueError(f"expected (p,p), (p,p,1), (N,p,p) or (N,p,p,1), got shape {x.shape}")


def zscore(x: np.ndarray) -> np.ndarray:
    """uint8 (p,p) or (N,p,p) -> float32 (p,p,1) or (N,p,p,1), per-image (x-mean)/std in float64; constant -> 0.

    A (p,p,1) or (N,p,p,1) input is accepted too (the channel axis is not doubled).
    """
    arr = np.asarray(x)
    if arr.size == 0:
        raise ValueError(f"cannot z-score an empty array of shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"expected a numeric image array, got dtype {arr.dtype}")
    stack, single = _as_image_stack(arr)
    out = np.empty(stack.shape + (1,), dtype=np.float32)
    for i in range(stack.shape[0]):  # per image, exactly numpy's float64 computation
        out[i, :, :, 0] = _zscore_one(np.ascontiguousarray(stack[i]))
    return out[0] if single else out


def zscore_tf(x):
    """tf uint8 (p,p)/(N,p,p) (or with trailing 1) -> tf.float32 (p,p,1)/(N,p,p,1); tf ops only, matches zscore."""
    import tensorflow as tf  # lazy: the rest of this module does not need TensorFlow

    t = tf.convert_to_tensor(x)
    rank = t.shape.rank
    if rank is None:
        raise ValueError("zscore_tf needs a tensor of known rank (2, 3 or 4)")
    last = t.shape[-1] if rank else None
    if rank == 4 and last in (1, None) or rank == 3 and last == 1:
        t = tf.squeeze(t, axis=-1)  # drop the channel axis; it is added back at the end
    elif rank not in (2, 3):
        raise ValueError(f"expected (p,p), (p,p,1), (N,p,p) or (N,p,p,1), got shape {t.shape}")
    xf = tf.cast(t, tf.float64)
    mean = tf.reduce_mean(xf, axis=[-2, -1], keepdims=True)
    centred = xf - mean
    std = tf.sqrt(tf.reduce_mean(tf.square(centred), axis=[-2, -1], keepdims=True))
    ok = std > 0.0
    safe_std = tf.where(ok, std, tf.ones_like(std))
    out = tf.where(ok, centred / safe_std, tf.zeros_like(centred))
    return tf.expand_dims(tf.cast(out, tf.float32), axis=-1)


def prepare(image: np.ndarray, pixels: int, clahe_clip: float | None = None) -> np.ndarray:
    """Decoded image (grey/BGR/BGRA uint8) -> float32 (pixels,pixels,1): the seed chain, z-scored."""
    return zscore(prepare_uint8(image, pixels, clahe_clip))


# --------------------------------------------------------------------------- lung masks


def mask_input(image: np.ndarray, pixels: int = 256) -> np.ndarray:
    """Decoded image -> float32 (pixels,pixels,1) in [0,1]: grey, resize (INTER_LINEAR), /255 (mask model)."""
    size = _check_pixels(pixels)
    grey = to_grey(image)
    resized = cv2.resize(grey, (size, size), interpolation=cv2.INTER_LINEAR)
    return (resized.astype(np.float32) / np.float32(255.0))[:, :, None]


def _check_shape(shape: object) -> tuple[int, int]:
    """(height, width) of positive integers, else ValueError."""
    try:
        height, width = shape  # type: ignore[misc]
        return _check_pixels(height), _check_pixels(width)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (height, width) of positive integers, got {shape!r}") from None


def _components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components of a bool (H,W) mask (scikit-image's labelling): (count, labels,
    areas indexed by label-1)."""
    from skimage import measure

    labels, count = measure.label(mask, connectivity=2, return_num=True)
    return count, labels, np.bincount(labels.ravel(), minlength=count + 1)[1:]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """A bool (H,W) mask with its holes filled: background parts (4-connected) that do not touch
    the image border (scikit-image's labelling and border clearing)."""
    from skimage import measure, segmentation

    holes = segmentation.clear_border(measure.label(~mask, connectivity=1)) > 0
    return mask | holes


def postprocess_mask(prob: np.ndarray, shape: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """Probabilities (h,w)/(h,w,1) in [0,1] -> bool shape=(H,W): resized, > threshold, filled, 2 largest parts.

    The probabilities are resized with cv2.resize (INTER_LINEAR), thresholded (strictly
    greater), holes are filled (:func:`fill_holes`) and only the two largest 8-connected components
    (the lungs) are kept; fewer components are kept as they are: the seed's "remove holes and
    extra labels", with scikit-image.
    """
    height, width = _check_shape(shape)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) \
            or not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    arr = np.asarray(prob)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"prob must be (h,w) or (h,w,1), got shape {np.shape(prob)}")
    resized = cv2.resize(arr.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    binary = fill_holes(resized > threshold)
    count, labels, areas = _components(binary)
    if count <= 2:
        return binary
    keep = np.argsort(-areas, kind="stable")[:2] + 1  # labels of the two largest components
    lut = np.zeros(count + 1, dtype=bool)
    lut[keep] = True
    return lut[labels]


def apply_mask(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 (H,W) grey, (H,W) mask -> uint8 (H,W): the seed's (grey/255*mask)*255: 0 outside, same inside."""
    grey = np.asarray(grey)
    mask = np.asarray(mask)
    if grey.dtype != np.uint8 or grey.ndim != 2:
        raise ValueError(f"grey must be a uint8 (H,W) image, got {grey.dtype} {grey.shape}")
    if mask.shape != grey.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {grey.shape}")
    binary = mask if mask.dtype == np.bool_ else mask > 0
    # (grey/255 * m) * 255 rounded is exactly grey where m=1 and 0 where m=0.
    return np.where(binary, grey, np.uint8(0))


def mask_qa(mask: np.ndarray) -> dict:
    """(H,W) mask (bool or >0) -> {"lung_fraction": float, "components": int, "flags": list[str]}.

    Flags (every one that holds): "empty" (no lung pixel), "implausible_area" (fraction
    < 0.05 or > 0.7), "components" (8-connected components != 2).
    """
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise ValueError(f"mask must be (H,W), got shape {np.shape(mask)}")
    binary = arr if arr.dtype == np.bool_ else arr > 0
    total = binary.size
    lung = int(np.count_nonzero(binary))
    fraction = lung / total if total else 0.0
    count = _components(binary)[0] if lung else 0
    flags = []
    if lung == 0:
        flags.append("empty")
    if fraction < MIN_LUNG_FRACTION or fraction > MAX_LUNG_FRACTION:
        flags.append("implausible_area")
    if count != 2:
        flags.append("components")
    return {"lung_fraction": float(fraction), "components": int(count), "flags": flags}
