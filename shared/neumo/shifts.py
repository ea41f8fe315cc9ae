"""Acquisition shifts that mimic another hospital's X-rays, for robustness checks.

Each shift maps a grey uint8 image (H, W) to a grey uint8 image of the same shape, and is
applied to the raw image BEFORE the seed's preprocessing, as a different scanner would.
"""

from __future__ import annotations

import cv2
import numpy as np


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
