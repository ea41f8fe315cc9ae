"""Acquisition shifts that mimic another hospital's X-rays: fixed ones for robustness checks and
the shift-aware selection score (SHIFTS, the suite), random ones for training data
(`acquisition`: ACQUISITIONS "tight" and "varied").

Each shift maps a grey uint8 image (H, W) to a grey uint8 image, and is applied to the raw image
BEFORE the seed's preprocessing, as a different scanner would. That order matters: CLAHE's tiles
and clip follow the framing and the grain, so the same zoom applied after CLAHE (as batch
augmentation does) is a different, milder change (benchmarks/science.py measured it).
"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np

#: Random training acquisitions: each side of the field of view keeps this fraction (uniform) ...
ACQ_KEEP = (0.75, 1.0)
#: ... and this share of the copies get sensor noise of a std drawn uniformly up to ACQ_NOISE_STD.
ACQ_NOISE_SHARE = 0.5
ACQ_NOISE_STD = 15.0
#: "varied" acquisitions: each side of the field of view spans this fraction of the original (below
#: 1: tighter, above: wider, padded with the film's border grey), drawn per axis so the aspect
#: ratio changes too (the classes' originals differ in aspect ratio: README Science) ...
ACQ_VIEW = (0.8, 1.25)
#: ... a gamma drawn log-uniformly in this range, a contrast factor uniformly in this one ...
ACQ_GAMMA = (0.6, 1.6)
ACQ_CONTRAST = (0.6, 1.4)
#: ... and on this share of the copies a blur (sigma up to ACQ_BLUR of the longer side).
ACQ_BLUR_SHARE = 0.3
ACQ_BLUR = 0.006
#: The kinds of acquisition copy (the `acquisition` parameter's choices).
ACQUISITIONS = ("tight", "varied")
#: Marks the id of a shifted copy of a valid image in a variant's "shifted" fold: "<id>~shift:<name>".
SHIFT_MARK = "~shift:"


def gamma(image: np.ndarray, g: float) -> np.ndarray:
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** g, 0, 255).astype(np.uint8)
    return cv2.LUT(image, lut)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    mean = float(image.mean())
    return np.clip(mean + factor * (image.astype(np.float32) - mean), 0, 255).astype(np.uint8)


def blur(image: np.ndarray, sigma_fraction: float = 0.004) -> np.ndarray:
    sigma = max(0.5, sigma_fraction * max(image.shape))
    return cv2.GaussianBlur(image, (0, 0), sigma)


def noise(image: np.ndarray, std: float = 12.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0, std, image.shape), 0, 255).astype(np.uint8)


def zoom(image: np.ndarray, keep: float = 0.85) -> np.ndarray:
    """A tighter field of view: the central `keep` fraction, scaled back to the original size."""
    h, w = image.shape
    dh, dw = int(h * (1 - keep) / 2), int(w * (1 - keep) / 2)
    return cv2.resize(image[dh:h - dh, dw:w - dw], (w, h))


def border_grey(image: np.ndarray) -> int:
    """The median grey of the outermost rows and columns: what a wider field of view would show there."""
    h, w = image.shape
    e = max(1, min(h, w) // 50)
    edge = np.concatenate([image[:e].ravel(), image[-e:].ravel(), image[:, :e].ravel(), image[:, -e:].ravel()])
    return int(np.median(edge))


def view(image: np.ndarray, span_y: float, span_x: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Another field of view: each axis spans `span` of the original (below 1: cropped, above 1:
    padded with the border grey), centred, or at a random place when `rng` is given."""
    out = image
    for axis, span in ((0, span_y), (1, span_x)):
        n = out.shape[axis]
        if span < 1:
            keep = max(1, int(round(n * span)))
            start = int(rng.integers(0, n - keep + 1)) if rng is not None else (n - keep) // 2
            out = out[start:start + keep] if axis == 0 else out[:, start:start + keep]
        elif span > 1:
            extra = int(round(n * (span - 1)))
            before = int(rng.integers(0, extra + 1)) if rng is not None else extra // 2
            pads = [(0, 0), (0, 0)]
            pads[axis] = (before, extra - before)
            out = np.pad(out, pads, constant_values=border_grey(image))
    return np.ascontiguousarray(out)


def marker(image: np.ndarray, text: str = "L PORTABLE") -> np.ndarray:
    """A burnt-in white text marker in the top-left corner, as many portable X-rays carry."""
    out = image.copy()
    scale = max(image.shape) / 600
    cv2.putText(out, text, (int(0.04 * image.shape[1]), int(0.09 * image.shape[0])), cv2.FONT_HERSHEY_SIMPLEX,
                scale, 255, max(1, int(2 * scale)), cv2.LINE_AA)
    return out


SHIFTS = {
    "gamma 0.7": lambda im: gamma(im, 0.7),
    "gamma 1.4": lambda im: gamma(im, 1.4),
    "contrast 0.6": lambda im: contrast(im, 0.6),
    "blur": blur,
    "noise": noise,
    "zoom 0.85": zoom,
    "wide view 1.2": lambda im: view(im, 1.2, 1.2),
    "aspect 0.8": lambda im: view(im, 1.0, 0.8),
    "text marker": marker,
}


def shifted_id(image_id: str, name: str) -> str:
    return f"{image_id}{SHIFT_MARK}{name}"


def shift_of(image_id: str) -> str:
    """The shift name of a shifted copy's id ("" for an image as acquired)."""
    return str(image_id).partition(SHIFT_MARK)[2]


def acquisition_rng(image_id: str, copy: int) -> np.random.Generator:
    """The generator for copy `copy` of an image: fixed by (copy, id), whatever the worker."""
    digest = hashlib.sha256(f"{copy}:{image_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def acquisition(image: np.ndarray, rng: np.random.Generator, kind: str = "tight") -> np.ndarray:
    """A random other acquisition of the same chest, for training. "tight": a tighter field of view
    at a random position (each side keeps ACQ_KEEP of the frame) and, on ACQ_NOISE_SHARE of the
    calls, sensor noise. "varied": a tighter or wider field of view per axis (ACQ_VIEW, so another
    aspect ratio), gamma, contrast, sometimes blur, then the same noise. Grey uint8 (H, W) in,
    grey uint8 (h, w) out (the seed's resize follows)."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"need a grey uint8 (H, W) image, got {image.dtype} {image.shape}")
    if kind == "varied":
        return _varied(image, rng)
    if kind != "tight":
        raise ValueError(f"acquisition must be one of {ACQUISITIONS}, got {kind!r}")
    h, w = image.shape
    keep = rng.uniform(*ACQ_KEEP, size=2)
    ch, cw = max(1, int(round(h * keep[0]))), max(1, int(round(w * keep[1])))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = image[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < ACQ_NOISE_SHARE:
        std = rng.uniform(0.0, ACQ_NOISE_STD)
        out = np.clip(out + rng.normal(0.0, std, out.shape), 0, 255).astype(np.uint8)
    return out


def _varied(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    spans = np.exp(rng.uniform(np.log(ACQ_VIEW[0]), np.log(ACQ_VIEW[1]), size=2))
    out = view(image, float(spans[0]), float(spans[1]), rng)
    out = gamma(out, float(np.exp(rng.uniform(np.log(ACQ_GAMMA[0]), np.log(ACQ_GAMMA[1])))))
    out = contrast(out, float(rng.uniform(*ACQ_CONTRAST)))
    if rng.random() < ACQ_BLUR_SHARE:
        out = blur(out, float(rng.uniform(0.0, ACQ_BLUR)))
    if rng.random() < ACQ_NOISE_SHARE:
        std = rng.uniform(0.0, ACQ_NOISE_STD)
        out = np.clip(out + rng.normal(0.0, std, out.shape), 0, 255).astype(np.uint8)
    return out
