"""The lung-mask model: training from image + mask pairs, loading (ours or the group's legacy
Keras 2 `.h5`), and masking every image with the seed's post-processing and per-image QA."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import cv2
import keras
import numpy as np

from neumo import imaging, models, storage
from neumo.fitting import fit, set_seed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskModelConfig:
    """Settings of the lung-mask U-Net (the seed's model sees 256 px)."""

    pixels: int = 256
    depth: int = 4
    filters: int = 16
    epochs: int = 10
    batch_size: int = 8
    learning_rate: float = 1e-3
    max_images: int = 0
    seed: int = 0

    def __post_init__(self):
        models.check_pixels(self.pixels, self.depth)
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0 or self.max_images < 0:
            raise ValueError(f"invalid mask model settings: {self}")


def _pairs(rows: list[dict], pixels: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for r in rows:
        image = imaging.decode(storage.read_bytes(r["uri"]))
        mask = imaging.read_grey(storage.read_bytes(r["mask_uri"]))
        xs.append(imaging.mask_input(image, pixels))
        ys.append(cv2.resize(mask, (pixels, pixels), interpolation=cv2.INTER_NEAREST)[..., None] > 127)
    return np.stack(xs), np.stack(ys).astype(np.float32)


def dice_loss(y_true, y_pred):
    inter = keras.ops.sum(y_true * y_pred, axis=(1, 2, 3))
    total = keras.ops.sum(y_true + y_pred, axis=(1, 2, 3))
    return 1.0 - (2.0 * inter + 1.0) / (total + 1.0)


def bce_dice(y_true, y_pred):
    """Binary cross-entropy plus soft Dice: pixel accuracy and overlap both count."""
    bce = keras.ops.mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=(1, 2))
    return bce + dice_loss(y_true, y_pred)


def dice_iou(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks (1.0, 1.0 when both are empty)."""
    t, p = truth.astype(bool), pred.astype(bool)
    inter, union, total = np.sum(t & p), np.sum(t | p), t.sum() + p.sum()
    if total == 0:
        return 1.0, 1.0
    return float(2 * inter / total), float(inter / union)


def train(rows: list[dict], config: MaskModelConfig, out_dir: str) -> tuple[keras.Model, dict]:
    """Train the lung-mask U-Net on manifest rows that have masks; held-out patients (fold valid)
    are scored at their ORIGINAL size after the seed's post-processing. Saves lung_mask.keras."""
    pairs = [r for r in rows if r.get("mask_uri")]
    if not pairs:
        raise ValueError("no image has a lung mask: give masks_uri, or a mask model (mask_model_uri)")
    rng = np.random.default_rng(config.seed)
    fit_rows = [r for r in pairs if r["fold"] == "train"]
    held = [r for r in pairs if r["fold"] != "train"] or fit_rows[-max(1, len(fit_rows) // 5):]
    if config.max_images and len(fit_rows) > config.max_images:
        fit_rows = [fit_rows[i] for i in sorted(rng.choice(len(fit_rows), config.max_images, replace=False))]
    held = held[: max(8, config.max_images // 4)] if config.max_images else held
    logger.info("mask model: %d training pairs, %d held-out", len(fit_rows), len(held))
    set_seed(config.seed)
    x, y = _pairs(fit_rows, config.pixels)
    xv, yv = _pairs(held, config.pixels)
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=config.seed).batch(config.batch_size)
    vds = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(config.batch_size)
    model = models.build_unet(config.pixels, config.depth, config.filters, "sigmoid", name="lung_mask")
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss=bce_dice)
    curve, seconds = fit(model, ds, vds, config.epochs, "val_loss", "min", 3, out_dir, "mask model")
    model.save(os.path.join(out_dir, "lung_mask.keras"))
    scores = [dice_iou(*_mask_vs_truth(model, r, config.pixels)) for r in held]
    result = {
        "dice": float(np.mean([s[0] for s in scores])), "iou": float(np.mean([s[1] for s in scores])),
        "held_out": len(held), "trained_on": len(fit_rows), "epochs": len(curve["loss"]),
        "seconds": round(seconds, 1), "pixels": config.pixels,
    }
    logger.info("mask model: held-out Dice %.4f IoU %.4f", result["dice"], result["iou"])
    return model, result


def _mask_vs_truth(model, row, pixels):
    image = imaging.decode(storage.read_bytes(row["uri"]))
    truth = imaging.read_grey(storage.read_bytes(row["mask_uri"])) > 127
    return truth, predict_masks(model, [image], pixels)[0]


class LegacyConv2DTranspose(keras.layers.Conv2DTranspose):
    """Keras 2 `.h5` files store a `groups` argument Keras 3's Conv2DTranspose rejects."""

    def __init__(self, *args, groups=1, **kwargs):
        if groups != 1:
            raise ValueError(f"grouped transposed convolutions are not supported (groups={groups})")
        super().__init__(*args, **kwargs)


#: Layer classes a legacy `.h5` lung-mask model may contain: standard Keras layers with no code in
#: their configuration. Anything else (Lambda, custom or unknown classes) is refused before loading.
H5_ALLOWED_LAYERS = frozenset({
    "Functional", "Model", "Sequential", "InputLayer",
    "Conv2D", "Conv2DTranspose", "SeparableConv2D", "DepthwiseConv2D", "Dense",
    "MaxPooling2D", "AveragePooling2D", "GlobalMaxPooling2D", "GlobalAveragePooling2D", "UpSampling2D",
    "Cropping2D", "ZeroPadding2D", "Concatenate", "Add", "Subtract", "Multiply", "Average", "Maximum",
    "Minimum", "BatchNormalization", "LayerNormalization", "Activation", "ReLU", "LeakyReLU", "PReLU",
    "ELU", "Softmax", "Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "Reshape",
    "Flatten", "Permute", "Rescaling",
})
_H5_SUFFIXES = (".h5", ".hdf5")


def _h5_layer_classes(config) -> list[tuple[str, str]]:
    """(class_name, module) of every layer in a Keras model config, nested models included."""
    found = []
    if isinstance(config, dict):
        if "class_name" in config and isinstance(config.get("config"), dict):
            inner = config["config"]
            if "layers" in inner or "name" in inner:
                found.append((str(config["class_name"]), str(config.get("module") or "")))
            for layer in inner.get("layers", []) or []:
                found += _h5_layer_classes(layer)
    return found


def check_h5(path: str) -> None:
    """Refuse a legacy `.h5` model whose layers are not all standard Keras layers (ValueError).

    Keras 2 `.h5` files keep a Lambda layer's Python bytecode in their configuration and run it
    when the model is built; the allow-list (:data:`H5_ALLOWED_LAYERS`) is checked on the stored
    configuration before Keras reads anything else.
    """
    import json

    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
    except OSError as err:
        raise ValueError(f"cannot load the mask model {path}: not an HDF5 file ({err})") from err
    if raw is None:
        raise ValueError(f"cannot load the mask model {path}: no model_config (a weights-only file?)")
    try:
        config = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot load the mask model {path}: unreadable model_config ({err})") from err
    layers = _h5_layer_classes(config)
    bad = sorted({name for name, module in layers
                  if name not in H5_ALLOWED_LAYERS or (module and not module.startswith("keras"))})
    if not layers or bad:
        raise ValueError(f"refusing the mask model {path}: layer classes {bad or ['(none found)']} are not "
                         f"standard Keras layers; allowed: {sorted(H5_ALLOWED_LAYERS)}")


def load(path: str) -> keras.Model:
    """Load a lung-mask model: `.keras` in safe mode, or the group's legacy Keras 2 `.h5`.

    Safe mode refuses Lambda layers and other code in `.keras` files; a legacy `.h5` must pass
    :func:`check_h5` (standard layers only) and only our `Conv2DTranspose` shim is substituted.
    Every failure is a ValueError naming the file (FileNotFoundError when absent).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask model file not found: {path}")
    legacy = path.lower().endswith(_H5_SUFFIXES)
    if not legacy and not path.endswith(".keras"):
        raise ValueError(f"cannot load the mask model {path}: expected a .keras file or a legacy "
                         f"Keras 2 {' or '.join(_H5_SUFFIXES)} file")
    if legacy:
        check_h5(path)
    try:
        if legacy:
            return keras.saving.load_model(path, compile=False, safe_mode=True,
                                           custom_objects={"Conv2DTranspose": LegacyConv2DTranspose})
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except (ValueError, OSError, TypeError, KeyError) as err:
        raise ValueError(f"cannot load the mask model {path}: {err}") from err


def model_pixels(model: keras.Model) -> int:
    shape = model.input_shape
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 1 or model.output_shape[-1] != 1:
        raise ValueError(f"a lung-mask model takes (p, p, 1) and returns (p, p, 1); this one {shape} -> {model.output_shape}")
    return int(shape[1])


def predict_masks(model: keras.Model, images: list[np.ndarray], pixels: int) -> list[np.ndarray]:
    """Post-processed boolean masks at each image's original size."""
    x = np.stack([imaging.mask_input(im, pixels) for im in images])
    probs = model.predict(x, verbose=0, batch_size=8)
    return [imaging.postprocess_mask(p[..., 0], im.shape[:2]) for p, im in zip(probs, images)]


def contact_sheet(images: list[np.ndarray], masks: list[np.ndarray], titles: list[str], cell: int = 160) -> np.ndarray:
    """A BGR grid of images with their lung outline drawn in green, for QA at a glance."""
    cells = []
    for im, m, title in zip(images, masks, titles):
        grey = cv2.resize(imaging.to_grey(im), (cell, cell))
        small = cv2.resize(m.astype(np.uint8), (cell, cell), interpolation=cv2.INTER_NEAREST)
        bgr = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(bgr, contours, -1, (0, 220, 0), 1)
        cv2.putText(bgr, title[-22:], (2, cell - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.3, (0, 255, 255), 1)
        cells.append(bgr)
    cols = 6
    while len(cells) % cols:
        cells.append(np.zeros_like(cells[0]))
    rows = [np.hstack(cells[i:i + cols]) for i in range(0, len(cells), cols)]
    return np.vstack(rows)
