"""Acquisition shifts that mimic another hospital's X-rays: fixed ones for robustness checks
(SHIFTS), random ones for training data (`acquisition`).

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
    "text marker": marker,
}


def acquisition_rng(image_id: str, copy: int) -> np.random.Generator:
    """The generator for copy `copy` of an image: fixed by (copy, id), whatever the worker."""
    digest = hashlib.sha256(f"{copy}:{image_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def acquisition(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random other acquisition of the same chest, for training: a tighter field of view at a
    random position (each side keeps ACQ_KEEP of the frame) and, on ACQ_NOISE_SHARE of the calls,
    sensor noise. Grey uint8 (H, W) in, grey uint8 (h, w) out (the seed's resize follows)."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"need a grey uint8 (H, W) image, got {image.dtype} {image.shape}")
    h, w = image.shape
    keep = rng.uniform(*ACQ_KEEP, size=2)
    ch, cw = max(1, int(round(h * keep[0]))), max(1, int(round(w * keep[1])))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = image[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < ACQ_NOISE_SHARE:
        std = rng.uniform(0.0, ACQ_NOISE_STD)
        out = np.clip(out + rng.normal(0.0, std, out.shape), 0, 255).astype(np.uint8)
    return out
