"""The lung-mask model: training from image + mask pairs, loading (ours or the group's legacy
Keras 2 `.h5`), and masking every image with the seed's post-processing and per-image QA."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import cv2
import keras
import numpy as np

from neumo import distribute, imaging, ingest, models, parameters, storage
from neumo.fitting import fit, set_seed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskModelConfig:
    """Settings of the lung-mask U-Net (the seed's model sees 256 px)."""

    pixels: int = parameters.default("mask_pixels")
    depth: int = 4
    filters: int = parameters.default("filters")
    epochs: int = parameters.default("mask_epochs")
    batch_size: int = 8
    learning_rate: float = 1e-3
    max_images: int = parameters.default("mask_max_images")
    seed: int = parameters.default("seed")

    def __post_init__(self):
        models.check_pixels(self.pixels, self.depth)
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0 or self.max_images < 0:
            raise ValueError(f"invalid mask model settings: {self}")


def _pairs(rows: list[dict], pixels: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for r in rows:
        image = imaging.decode(ingest.read_verified(r), check_damage=False)  # the bytes ingest accepted
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


#: With a capped training sample (max_images), Dice is scored on a quarter as many held-out pairs
#: (at least 8): enough for a stable mean, a fraction of the time training took.
HELD_OUT_SHARE, MIN_HELD_OUT = 4, 8


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
    held = held[: max(MIN_HELD_OUT, config.max_images // HELD_OUT_SHARE)] if config.max_images else held
    logger.info("mask model: %d training pairs, %d held-out", len(fit_rows), len(held))
    set_seed(config.seed)
    x, y = _pairs(fit_rows, config.pixels)
    xv, yv = _pairs(held, config.pixels)
    import tensorflow as tf

    strategy = distribute.strategy()
    batch = distribute.global_batch(config.batch_size, strategy)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=config.seed).batch(batch)
    vds = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(batch)
    with distribute.scope(strategy):  # every GPU of the node (tf.distribute), when there are several
        model = models.build_unet(config.pixels, config.depth, config.filters, "sigmoid", name="lung_mask",
                                  synchronized=strategy is not None)
        model.compile(optimizer=keras.optimizers.Adam(distribute.learning_rate(config.learning_rate, strategy)),
                      loss=bce_dice)
        distribute.prepare(model, strategy)
    curve, seconds = fit(model, distribute.shardable(ds, strategy), distribute.shardable(vds, strategy),
                         config.epochs, "val_loss", "min", 3, out_dir, "mask model")
    distribute.unsynchronized(model, strategy).save(os.path.join(out_dir, "lung_mask.keras"))
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


def contact_sheet(images: list[np.ndarray], masks: list[np.ndarray], titles: list[str], cell: int = 160,
                  cols: int = 6) -> np.ndarray:
    """A BGR grid of images with their lung outline drawn in green, for QA at a glance: a caption row
    says what the green line is; each title (lines split on newlines) sits on a band under its image,
    shortened in the middle so the start and the end of a long name both stay readable."""
    if not images:
        raise ValueError("a contact sheet needs at least one image")
    lines = max(len(t.split("\n")) for t in titles)
    tiles = [_sheet_tile(im, m, t, cell, lines) for im, m, t in zip(images, masks, titles)]
    tiles += [np.full_like(tiles[0], 40)] * (-len(tiles) % cols)
    grid = np.vstack([np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)])
    return np.vstack([_sheet_caption(grid.shape[1]), grid])


SHEET_FONT, SHEET_SCALE, SHEET_LINE = cv2.FONT_HERSHEY_SIMPLEX, 0.38, 13
OUTLINE_BGR = (0, 220, 0)


def sheet_text(text: str, width: int, scale: float = SHEET_SCALE) -> str:
    """`text` as the ASCII the sheet's font can draw, shortened in the middle ("start...end") to fit
    `width` pixels."""
    import unicodedata

    def ascii_char(c: str) -> str:
        if " " <= c <= "~":
            return c
        return unicodedata.normalize("NFKD", c).encode("ascii", "ignore").decode().strip() or "?"

    text = "".join(ascii_char(c) for c in text)
    for keep in range(len(text), -1, -1):
        head, tail = (keep + 1) // 2, keep // 2
        short = text if keep == len(text) else text[:head] + "..." + (text[len(text) - tail:] if tail else "")
        if cv2.getTextSize(short, SHEET_FONT, scale, 1)[0][0] <= width:
            return short
    return ""


def _sheet_tile(image: np.ndarray, mask: np.ndarray, title: str, cell: int, lines: int) -> np.ndarray:
    """One image at cell x cell with its outline in green, over a black band holding its title."""
    grey = cv2.resize(imaging.to_grey(image), (cell, cell))
    small = cv2.resize(mask.astype(np.uint8), (cell, cell), interpolation=cv2.INTER_NEAREST)
    bgr = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(bgr, contours, -1, OUTLINE_BGR, 1)
    band = np.zeros((SHEET_LINE * lines + 6, cell, 3), np.uint8)
    for k, line in enumerate(title.split("\n")):
        cv2.putText(band, sheet_text(line, cell - 6), (3, SHEET_LINE * (k + 1)), SHEET_FONT, SHEET_SCALE,
                    (255, 255, 255), 1, cv2.LINE_AA)
    tile = np.vstack([bgr, band])
    tile[:, -1] = 40  # a thin grey rule between tiles
    return tile


def _sheet_caption(width: int) -> np.ndarray:
    """The legend row: what the green line is and what the tile titles say."""
    row = np.zeros((24, width, 3), np.uint8)
    legend = "green line = predicted lung outline"
    cv2.putText(row, sheet_text(legend, width - 6), (4, 16), SHEET_FONT, 0.45, OUTLINE_BGR, 1, cv2.LINE_AA)
    x = 10 + cv2.getTextSize(legend, SHEET_FONT, 0.45, 1)[0][0]
    if x < width - 60:
        note = sheet_text("   tiles: class / fold, then the file name", width - x - 6, 0.45)
        cv2.putText(row, note, (x, 16), SHEET_FONT, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return row


def sheet_rows(rows: list[dict], size: int) -> list[dict]:
    """A deterministic contact-sheet sample: an even share of every (fold, class) present, spread
    through each group, so QA sees both classes of every fold and not only the manifest's first rows."""
    from collections import defaultdict

    from neumo.data import FOLDS

    groups = defaultdict(list)
    for r in rows:
        groups[(r["fold"], r["label"] or "unlabelled")].append(r)
    keys = sorted(groups, key=lambda k: (FOLDS.index(k[0]) if k[0] in FOLDS else len(FOLDS), k))
    take = dict.fromkeys(keys, 0)
    left = min(size, len(rows))
    while left:
        for k in keys:
            if left and take[k] < len(groups[k]):
                take[k], left = take[k] + 1, left - 1
    return [groups[k][i * len(groups[k]) // take[k]] for k in keys for i in range(take[k])]
