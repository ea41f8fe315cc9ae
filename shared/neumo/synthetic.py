"""Deterministic synthetic chest X-rays, so tests and the demo run without real data.

:func:`make_xray` draws one frontal (PA) radiograph and its lung mask from a seed: dark lung
fields, brighter mediastinum, heart and spine, rib arcs, clavicles, soft tissue, vignette,
noise and a random global gamma/contrast/brightness. With ``pneumonia=True`` one to three
patchy, blurred opacities (consolidation) are painted inside the lungs; the global
brightness jitter is much larger than the brightness they add, so the mean grey level alone
is a weak cue and a classifier has to look at the lungs.

:func:`write_kaggle` and :func:`write_nih` write whole data sets in the layouts the pipeline
ingests (Kaggle ``split/CLASS/file`` with Kermany-like patient names, NIH flat PNGs),
through :mod:`neumo.storage` so ``gs://`` works as well as a folder.
"""

from __future__ import annotations

import logging
import numbers
import re

import cv2
import numpy as np

from neumo import storage

__all__ = ["CLASSES", "make_xray", "write_demo", "write_kaggle", "write_nih"]

logger = logging.getLogger(__name__)

#: Class folder names, in label order (0 = NORMAL, 1 = PNEUMONIA).
CLASSES = ("NORMAL", "PNEUMONIA")
#: Default JPEG quality of written images.
JPEG_QUALITY = 95
#: Log a progress line every this many images.
_LOG_EVERY = 1000
#: Images per patient (1, 2 or 3) and their probabilities.
_IMAGES_PER_PATIENT = (1, 2, 3)
_IMAGES_PER_PATIENT_P = (0.6, 0.25, 0.15)
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_MIN_SIZE = 16


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates: u float32 (1,size) left->right, v float32 (size,1) top->bottom, in [-1,1]."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / np.float32(size / 2.0) - np.float32(1.0)
    return axis[None, :], axis[:, None]


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """0 below edge0, 1 above edge1 (or reversed when edge1 < edge0), smooth in between."""
    t = np.clip((x - np.float32(edge0)) * np.float32(1.0 / (edge1 - edge0)), 0.0, 1.0)
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Near-Gaussian blur of float32 ``img`` with std ``sigma`` px: two box filters (O(1) per pixel)."""
    k = int(round(np.sqrt(6.0 * sigma * sigma + 1.0)))
    if k < 2:
        return img
    k |= 1
    once = cv2.blur(img, (k, k), borderType=cv2.BORDER_REFLECT)
    return cv2.blur(once, (k, k), borderType=cv2.BORDER_REFLECT)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field float32 (size,size), roughly zero-mean, unit-ish amplitude."""
    coarse = rng.standard_normal((cells, cells), dtype=np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _lung_field(u: np.ndarray, v: np.ndarray, cx: float, cy: float, ax: float, ay: float,
                lateral: float) -> np.ndarray:
    """Bool mask of one lung: an ellipse narrowed towards the apex, flatter on the medial side."""
    t = (v - np.float32(cy)) * np.float32(1.0 / ay)          # -1 apex .. +1 base, (S,1)
    inv_width = 1.0 / (np.float32(ax) * (0.5 + 0.5 * _smoothstep(-1.0, 0.1, t)))
    offset = u - np.float32(cx)                                # (1,S)
    medial = offset * np.float32(lateral) < 0
    offset = np.where(medial, offset * np.float32(1.5), offset)  # medial border flatter
    du = offset * inv_width
    return du * du + t * t < 1.0


def make_xray(seed: int, size: int = 256, pneumonia: bool = False, *,
              anatomy_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic PA chest X-ray: (image uint8 (size,size), lung mask uint8 (size,size) in {0,255}).

    Fully determined by ``seed`` (and ``anatomy_seed``: when given, the anatomy comes from it
    and only the acquisition and the opacities from ``seed``, so several images of one patient
    look alike). ``pneumonia`` adds 1-3 patchy consolidations inside the lungs and changes
    nothing else: the same seed with and without pneumonia differs only inside the lungs.
    """
    seed = _check_int("seed", seed, 0)
    size = _check_int("size", size, _MIN_SIZE)
    rng = np.random.default_rng(seed)
    anat = rng if anatomy_seed is None else np.random.default_rng(
        [_check_int("anatomy_seed", anatomy_seed, 0), 0x5EED])
    u, v = _grid(size)
    px = size / 2.0                                     # pixels per unit of u/v

    # ---- anatomy (patient) ---------------------------------------------------------------
    mid = float(anat.normal(0.0, 0.02))                 # body midline
    body_w = float(anat.uniform(0.84, 0.98))
    lung_y = float(anat.uniform(-0.10, 0.02))
    lung_ay = float(anat.uniform(0.52, 0.64))
    lungs = []
    for side in (-1.0, 1.0):                            # image left = patient right
        lungs.append((mid + side * float(anat.uniform(0.36, 0.44)),
                      lung_y + float(anat.normal(0.0, 0.025)),
                      float(anat.uniform(0.27, 0.34)),
                      lung_ay * float(anat.uniform(0.93, 1.04)),
                      side))
    heart = (mid + float(anat.uniform(0.10, 0.18)), lung_y + lung_ay * float(anat.uniform(0.55, 0.75)),
             float(anat.uniform(0.26, 0.34)), float(anat.uniform(0.20, 0.27)))
    rib_period = float(anat.uniform(0.17, 0.22))
    rib_phase = float(anat.uniform(0.0, 1.0))
    rib_curve = float(anat.uniform(0.5, 0.9))
    clavicle_y = lung_y - lung_ay * float(anat.uniform(0.72, 0.85))
    tissue = float(anat.uniform(0.55, 0.65))
    heart_density = float(anat.uniform(0.06, 0.11))

    # ---- masks ---------------------------------------------------------------------------
    hx, hy, hax, hay = heart
    heart_r = np.sqrt(((u - np.float32(hx)) * np.float32(1 / hax)) ** 2
                      + ((v - np.float32(hy)) * np.float32(1 / hay)) ** 2)
    heart_mask = heart_r < 1.0
    lung_mask = np.zeros((size, size), dtype=bool)
    for cx, cy, ax, ay, side in lungs:
        lung_mask |= _lung_field(u, v, cx, cy, ax, ay, side)
    lung_mask &= ~heart_mask
    lung_soft = _blur(lung_mask.astype(np.float32), 0.025 * px)
    heart_soft = _smoothstep(1.25, 0.75, heart_r)

    # ---- densities -----------------------------------------------------------------------
    du = np.abs(u - np.float32(mid))                    # (1,S)
    shoulders = np.float32(body_w) * (0.72 + 0.28 * _smoothstep(-1.1, -0.55, v))  # (S,1)
    body = _smoothstep(0.0, 0.1, shoulders - du)        # (S,S)
    img = 0.05 + (tissue - 0.05) * body
    img += (0.08 * _smoothstep(0.2, 1.0, v)) * body     # abdomen below the diaphragm
    depth = float(rng.uniform(0.30, 0.40)) * (1.0 - 0.35 * _smoothstep(-0.6, 0.6, v))  # (S,1)
    img -= depth * lung_soft                            # air: darkest at the apices
    mediastinum = _smoothstep(0.02, -0.03, du - (0.08 + 0.04 * (v + 1.0)))
    img += 0.06 * mediastinum * (1.0 - lung_soft)
    img += heart_density * heart_soft
    spine = _smoothstep(0.08, 0.045, du) * (0.035 + 0.02 * np.cos((2.0 * np.pi / 0.09) * v))
    img += spine

    # rib arcs: periodic bright bands along curved lines, strongest over the lungs
    lateral = np.maximum(du - 0.06, 0.0)                # (1,S)
    w = v + (rib_curve * 0.6 * (lateral - 0.30) ** 2 - 0.25 * lateral)
    w = w + 0.08 * w * w
    ribs = np.cos(w * np.float32(2.0 * np.pi / rib_period) + np.float32(2.0 * np.pi * rib_phase))
    np.clip(ribs, 0.0, 1.0, out=ribs)
    ribs *= ribs
    ribs *= ribs * ribs                                  # ** 6: narrow bands
    rib_zone = _smoothstep(-0.95, -0.75, v) * _smoothstep(0.75, 0.45, v) * _smoothstep(0.04, 0.12, du) * body
    img += (float(rng.uniform(0.05, 0.09)) * rib_zone) * ribs * (0.3 + 0.7 * lung_soft)

    # clavicles: bright bars rising laterally from the top of the sternum
    clav_line = clavicle_y - 0.12 * np.minimum(du, 0.6)  # (1,S)
    clavicles = _smoothstep(0.035, 0.012, np.abs(v - clav_line)) \
        * (_smoothstep(0.05, 0.12, du) * _smoothstep(0.65, 0.5, du))
    img += 0.08 * clavicles

    # lung markings (vessels) and hila
    markings = _smooth_noise(rng, size, max(8, size // 10))
    hila = np.exp(-(((du - 0.15) * (1 / 0.07)) ** 2)) * np.exp(-(((v - (lung_y + 0.05)) * (1 / 0.15)) ** 2))
    img += (0.025 * markings + 0.07 * hila) * lung_soft

    # ---- pathology -----------------------------------------------------------------------
    if pneumonia:  # own stream: the same seed gives the same image apart from the opacities
        img += _opacities(np.random.default_rng([seed, 0xC0]), lung_mask, lung_soft, size)

    # ---- acquisition: pose, exposure, detector -------------------------------------------
    angle = float(rng.uniform(-4.0, 4.0))
    scale = float(rng.uniform(0.94, 1.06))
    shift = rng.normal(0.0, 0.025 * size, size=2)
    pose = cv2.getRotationMatrix2D((size / 2.0, size / 2.0), angle, scale)
    pose[:, 2] += shift
    img = cv2.warpAffine(img, pose, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpAffine(lung_mask.astype(np.uint8) * np.uint8(255), pose, (size, size),
                          flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    r2 = u * u + v * v
    img *= 1.0 - (float(rng.uniform(0.05, 0.25)) / 2.0) * r2                      # vignette
    contrast, brightness = float(rng.uniform(0.8, 1.25)), float(rng.uniform(-0.12, 0.12))
    img = (img - 0.45) * contrast + (0.45 + brightness)
    noise = np.frombuffer(rng.bytes(size * size), dtype=np.uint8).reshape(size, size)
    sigma = float(rng.uniform(0.004, 0.02))             # uniform noise with this std
    img += noise * np.float32(sigma / 73.9) - np.float32(sigma * 127.5 / 73.9)
    np.clip(img, 0.0, 1.0, out=img)
    image = cv2.convertScaleAbs(img, alpha=255.0)       # rounds to uint8
    gamma = float(np.exp(rng.uniform(-0.35, 0.35)))
    lut = np.rint(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
    image = cv2.LUT(image, lut)                         # global gamma
    return image, mask


def _opacities(rng: np.random.Generator, lung_mask: np.ndarray, lung_soft: np.ndarray,
               size: int) -> np.ndarray:
    """1-3 patchy, blurred consolidations (float32 (size,size) >= 0), confined to the lungs."""
    ys, xs = np.nonzero(lung_mask)
    out = np.zeros((size, size), dtype=np.float32)
    if ys.size == 0:
        return out
    rows = np.arange(size, dtype=np.float32)[:, None]
    cols = np.arange(size, dtype=np.float32)[None, :]
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(ys.size))
        radius = float(rng.uniform(0.05, 0.11)) * size
        ry = radius * float(rng.uniform(0.7, 1.4))
        cy, cx = float(ys[k]), float(xs[k])
        blob = np.exp(-0.5 * ((rows - cy) / ry) ** 2) * np.exp(-0.5 * ((cols - cx) / radius) ** 2)
        patches = _smooth_noise(rng, size, max(6, size // 12))
        patchy = np.clip(0.55 + 0.45 * patches, 0.0, 1.0)
        out += float(rng.uniform(0.2, 0.35)) * blob * patchy
    out = _blur(out, 0.008 * size)
    return np.minimum(out, 0.4) * lung_soft


# --------------------------------------------------------------------------- data sets


def _image_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def _encode(image: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} image as {ext}")
    return buf.tobytes()


def _check_counts(counts: object) -> dict[str, tuple[int, int]]:
    if not isinstance(counts, dict) or not counts:
        raise ValueError(f"counts must be a non-empty dict split -> (n_normal, n_pneumonia), got {counts!r}")
    out = {}
    for split, pair in counts.items():
        if not isinstance(split, str) or not _SPLIT_RE.match(split):
            raise ValueError(f"split names must be plain folder names, got {split!r}")
        try:
            n_normal, n_pneumonia = pair
        except (TypeError, ValueError):
            raise ValueError(f"counts[{split!r}] must be (n_normal, n_pneumonia), got {pair!r}") from None
        out[split] = (_check_int(f"counts[{split!r}][0]", n_normal, 0),
                      _check_int(f"counts[{split!r}][1]", n_pneumonia, 0))
    return out


def _patients(rng: np.random.Generator, n: int) -> list[int]:
    """Split ``n`` images into patients of 1-3 images; returns images per patient."""
    sizes = []
    while n > 0:
        k = min(int(rng.choice(_IMAGES_PER_PATIENT, p=_IMAGES_PER_PATIENT_P)), n)
        sizes.append(k)
        n -= k
    return sizes


def write_kaggle(root_uri: str, counts: dict[str, tuple[int, int]], size: int = 256, seed: int = 0,
                 masks_uri: str | None = None, *, jpeg_quality: int = JPEG_QUALITY) -> int:
    """Write a Kaggle-layout set ``root/<split>/<CLASS>/<name>.jpeg``; returns the number of images.

    ``counts`` maps split -> (n_normal, n_pneumonia). Names follow Kermany: NORMAL
    ``IM-<patient:04d>-<image:04d>.jpeg``, PNEUMONIA ``person<patient>_<bacteria|virus>_<n>.jpeg``
    (n runs over the class, as in the original). Patients have 1-3 images, never span splits,
    and their images share anatomy. Lung masks go to ``masks_uri/<split>/<CLASS>/<stem>.png``.
    """
    plan = _check_counts(counts)
    size = _check_int("size", size, _MIN_SIZE)
    seed = _check_int("seed", seed, 0)
    quality = _check_int("jpeg_quality", jpeg_quality, 0)
    if quality > 100:
        raise ValueError(f"jpeg_quality must be 0..100, got {quality}")
    total = sum(a + b for a, b in plan.values())
    rng = np.random.default_rng([seed, 0x4B41])
    next_patient = {"NORMAL": 1, "PNEUMONIA": 1}
    pneumonia_image = 1
    written = 0
    logger.info("writing %d synthetic Kaggle-layout images (%d px) to %s", total, size, root_uri)
    for split, pair in plan.items():
        for label, (cls, n) in enumerate(zip(CLASSES, pair)):
            for n_images in _patients(rng, n):
                patient = next_patient[cls]
                next_patient[cls] += 1
                kind = "bacteria" if rng.random() < 0.65 else "virus"
                for j in range(n_images):
                    if cls == "NORMAL":
                        stem = f"IM-{patient:04d}-{j + 1:04d}"
                    else:
                        stem = f"person{patient}_{kind}_{pneumonia_image}"
                        pneumonia_image += 1
                    image, mask = make_xray(_image_seed(seed, label, patient, j), size,
                                            pneumonia=bool(label),
                                            anatomy_seed=_image_seed(seed, label, patient))
                    storage.write_bytes(storage.join(root_uri, split, cls, stem + ".jpeg"),
                                        _encode(image, ".jpeg", [cv2.IMWRITE_JPEG_QUALITY, quality]))
                    if masks_uri is not None:
                        storage.write_bytes(storage.join(masks_uri, split, cls, stem + ".png"),
                                            _encode(mask, ".png"))
                    written += 1
                    if written % _LOG_EVERY == 0:
                        logger.info("synthetic Kaggle set: %d/%d images written", written, total)
    logger.info("synthetic Kaggle set: %d images written to %s", written, root_uri)
    return written


def write_nih(root_uri: str, n: int, size: int = 256, seed: int = 0) -> int:
    """Write ``n`` unlabelled NIH-style PNGs ``root/<patient:08d>_<index:03d>.png``; returns ``n``.

    Patients have 1-4 images (indices from 000) sharing anatomy; about 30% show pneumonia.
    """
    n = _check_int("n", n, 0)
    size = _check_int("size", size, _MIN_SIZE)
    seed = _check_int("seed", seed, 0)
    rng = np.random.default_rng([seed, 0x4E49])
    written = 0
    patient = 0
    logger.info("writing %d synthetic NIH-style images (%d px) to %s", n, size, root_uri)
    while written < n:
        patient += 1
        for index in range(min(int(rng.integers(1, 5)), n - written)):
            pneumonia = bool(rng.random() < 0.3)
            image, _ = make_xray(_image_seed(seed, 2, patient, index), size, pneumonia=pneumonia,
                                 anatomy_seed=_image_seed(seed, 2, patient))
            storage.write_bytes(storage.join(root_uri, f"{patient:08d}_{index:03d}.png"),
                                _encode(image, ".png"))
            written += 1
            if written % _LOG_EVERY == 0:
                logger.info("synthetic NIH set: %d/%d images written", written, n)
    logger.info("synthetic NIH set: %d images written to %s", written, root_uri)
    return written


def write_demo(out_uri: str, per_class: int = 50, size: int = 256, seed: int = 0) -> dict:
    """A small complete data set under out_uri: Kaggle layout with lung masks (`images/`, `masks/`;
    `per_class` train images per class, 8 val, a quarter as many test) and `per_class` unlabelled
    NIH-style images (`nih/`). Returns the counts and where they are."""
    images = write_kaggle(storage.join(out_uri, "images"), {"train": (per_class, per_class), "val": (8, 8),
                                                           "test": (per_class // 4, per_class // 4)},
                          size=size, seed=seed, masks_uri=storage.join(out_uri, "masks"))
    images += write_nih(storage.join(out_uri, "nih"), per_class, size=size, seed=seed + 1)
    return {"images": images, "out": out_uri}
