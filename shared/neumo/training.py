"""Training: the pretraining autoencoder, the lung-mask U-Net and one classifier trial.

Every function is seeded, logs one line per epoch, keeps the best epoch (early stopping with
best weights restored) and writes its curve as CSV beside the model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import keras
import numpy as np

from neumo import data as nd
from neumo import evaluation, models, storage
from neumo.tuning import ALLOWED_PIXELS, AUGMENTATIONS, LOSSES

logger = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    keras.utils.set_random_seed(int(seed))


class EpochLog(keras.callbacks.Callback):
    """Logs one line per epoch, so long runs show progress."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def on_epoch_end(self, epoch, logs=None):
        figures = " ".join(f"{k}={v:.4f}" for k, v in sorted((logs or {}).items()))
        logger.info("%s epoch %d: %s", self.label, epoch + 1, figures)


class SyncToStorage(keras.callbacks.Callback):
    """Copies a local folder (Keras' backup of the training state) to object storage after each
    epoch, so a pod that is preempted and restarted resumes where it stopped."""

    def __init__(self, local_dir: str, uri: str):
        super().__init__()
        self.local_dir, self.uri = local_dir, uri

    def on_epoch_end(self, epoch, logs=None):
        for root, _, files in os.walk(self.local_dir):
            for name in files:
                path = os.path.join(root, name)
                storage.upload(path, storage.join(self.uri, os.path.relpath(path, self.local_dir).replace(os.sep, "/")))


def _restore(uri: str, local_dir: str) -> int:
    """Fetch a training-state backup from object storage; returns how many files came back."""
    files = storage.list_files(uri)
    for f in files:
        storage.download(f, os.path.join(local_dir, *storage.relative(f, uri).split("/")))
    return len(files)


def _fit(model, train_ds, valid_ds, epochs: int, monitor: str, mode: str, patience: int, workdir: str, label: str,
         checkpoint_uri: str = ""):
    """fit with best-weights early stopping, a per-epoch CSV log and a best checkpoint; with a
    checkpoint_uri the training state is backed up there every epoch and resumed from it."""
    os.makedirs(workdir, exist_ok=True)
    resume = []
    if checkpoint_uri:
        backup = os.path.join(workdir, "backup")
        if _restore(checkpoint_uri, backup):
            logger.info("%s: resuming from the training state at %s", label, checkpoint_uri)
        resume = [keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False),
                  SyncToStorage(backup, checkpoint_uri)]
    callbacks = resume + [
        keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(os.path.join(workdir, "best.weights.h5"), monitor=monitor, mode=mode,
                                        save_best_only=True, save_weights_only=True),
        keras.callbacks.CSVLogger(os.path.join(workdir, "history.csv"), append=bool(resume)),
        keras.callbacks.TerminateOnNaN(),
        EpochLog(label),
    ]
    start = time.monotonic()
    hist = model.fit(train_ds, validation_data=valid_ds, epochs=epochs, callbacks=callbacks, verbose=0,
                     shuffle=False)  # the tf.data pipeline shuffles
    if resume and not hist.history:  # restarted after the last epoch's backup: nothing left to train
        train_m = model.evaluate(train_ds, verbose=0, return_dict=True)
        valid_m = model.evaluate(valid_ds, verbose=0, return_dict=True)
        hist.history = {**{k: [v] for k, v in train_m.items()}, **{f"val_{k}": [v] for k, v in valid_m.items()}}
    losses = hist.history.get("loss", [])
    if not losses or not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"{label}: the training loss became NaN or infinite (epoch {len(losses)}); "
                                 "try a lower learning rate")
    return hist.history, time.monotonic() - start


# --- pretraining -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PretrainConfig:
    """Settings of the U-Net autoencoder pretraining (restoration of corrupted inputs)."""

    depth: int = 4
    filters: int = 16
    epochs: int = 10
    batch_size: int = 8
    learning_rate: float = 1e-3
    skip_levels: int = 1
    corruption: str = "restore"
    seed: int = 0

    def __post_init__(self):
        for name in ("depth", "filters", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"pretrain {name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"pretrain learning_rate must be > 0, got {self.learning_rate}")
        if self.corruption not in ("none", "restore"):
            raise ValueError(f"pretrain corruption must be 'none' or 'restore', got {self.corruption!r}")


def corrupt_tf(x, seed: int):
    """Models-Genesis style corruption of z-scored (B, p, p, 1) images: a non-linear intensity
    change, then in-painting (random boxes replaced by noise) or out-painting (all but one box)."""
    import tensorflow as tf

    shape = tf.shape(x)
    b, p = shape[0], shape[1]
    gamma = tf.exp(tf.random.uniform((b, 1, 1, 1), -0.5, 0.5, seed=seed))
    x = tf.sign(x) * tf.pow(tf.abs(x), gamma)
    coords = tf.cast(tf.range(p), tf.float32)[None, :] / tf.cast(p, tf.float32)
    boxes = tf.zeros((b, p, p), tf.bool)
    for k in range(3):
        c = tf.random.uniform((b, 2, 1), 0.1, 0.9, seed=seed + k)
        half = tf.random.uniform((b, 2, 1), 0.05, 0.2, seed=seed + 10 + k)
        rows = tf.abs(coords - c[:, 0]) < half[:, 0]
        cols = tf.abs(coords - c[:, 1]) < half[:, 1]
        boxes = tf.logical_or(boxes, tf.logical_and(rows[:, :, None], cols[:, None, :]))
    outpaint = tf.random.uniform((b, 1, 1), seed=seed + 20) < 0.3
    hide = tf.where(outpaint, tf.logical_not(boxes), boxes)[..., None]
    noise = tf.random.normal(tf.shape(x), seed=seed + 30)
    return tf.where(hide, noise, x)


def pretrain(fold: nd.Fold, valid: nd.Fold, pixels: int, config: PretrainConfig, out_dir: str):
    """Train the U-Net autoencoder on unlabelled images; save `autoencoder.keras` in out_dir.

    Returns (model, curve dict, seconds). With corruption "restore" the input is corrupted and
    the target is the clean image, and `skip_levels` top skips are dropped, so the encoder must
    learn anatomy instead of copying pixels through the shallow skip connections.
    """
    if len(fold) == 0:
        raise ValueError("pretraining needs at least one unlabelled image")
    set_seed(config.seed)
    unet = models.build_unet(pixels, config.depth, config.filters, "linear", config.skip_levels, name="autoencoder")
    unet.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss="mse")

    def pairs(f, shuffle):
        ds = nd.make_dataset(f, config.batch_size, shuffle=shuffle, seed=config.seed, targets_as_images=True)
        if config.corruption == "restore":
            ds = ds.map(lambda x, y: (corrupt_tf(x, config.seed), y))
        return ds

    valid = valid if len(valid) else fold
    curve, seconds = _fit(unet, pairs(fold, True), pairs(valid, False), config.epochs, "val_loss", "min",
                          max(2, config.epochs // 3), out_dir, "pretrain")
    unet.save(os.path.join(out_dir, "autoencoder.keras"))
    return unet, curve, seconds


# --- one classifier trial ----------------------------------------------------------------------

@dataclass(frozen=True)
class TrialConfig:
    """One trial: the tuned hyperparameters of the seed plus class weighting."""

    pixels: int
    mask: bool
    model: int
    frozen_layers: int
    learning_rate: float
    loss: str
    augmentation: str
    class_weight: bool

    @classmethod
    def from_dict(cls, d: dict) -> "TrialConfig":
        """Validated at the edge; ints that arrive as floats (KFP's local runner) are accepted."""
        try:
            cfg = cls(
                pixels=_as_int(d["pixels"], "pixels"), mask=bool(d["mask"]), model=_as_int(d["model"], "model"),
                frozen_layers=_as_int(d["frozen_layers"], "frozen_layers"),
                learning_rate=float(d["learning_rate"]), loss=str(d["loss"]),
                augmentation=str(d["augmentation"]), class_weight=bool(d["class_weight"]),
            )
        except KeyError as err:
            raise ValueError(f"trial configuration lacks {err.args[0]!r}") from err
        if cfg.model not in (1, 2):
            raise ValueError(f"model must be 1 or 2, got {cfg.model}")
        if cfg.pixels not in ALLOWED_PIXELS:
            raise ValueError(f"pixels must be one of {ALLOWED_PIXELS}, got {cfg.pixels}")
        if not cfg.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {cfg.learning_rate}")
        if cfg.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
        if cfg.augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {cfg.augmentation!r}")
        if cfg.frozen_layers < 0:
            raise ValueError(f"frozen_layers must be >= 0, got {cfg.frozen_layers}")
        return cfg


def _as_int(v, name: str) -> int:
    if isinstance(v, bool) or float(v) != int(float(v)):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    return int(float(v))


@dataclass(frozen=True)
class TrainSettings:
    """Fixed settings of every trial (the seed's: Adam, batch 8)."""

    epochs: int = 10
    batch_size: int = 8
    patience: int = 3
    seed: int = 0
    precision: str = "auto"

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError(f"epochs, batch_size and patience must be >= 1: {self}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


def resolve_precision(precision: str) -> str:
    """"auto" -> mixed_float16 where a GPU is present, else float32 (mixed is slower on CPUs)."""
    return nd.default_precision() if precision == "auto" else precision


def _recast(model: keras.Model) -> keras.Model:
    """A copy of a loaded model whose layers follow the current global dtype policy (a saved
    model keeps the float32 policy it was saved with), with the same weights."""
    def clone(layer):
        config = layer.get_config()
        config.pop("dtype", None)
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def _loss(name: str):
    if name == "focal":
        return keras.losses.BinaryFocalCrossentropy(gamma=2.0)
    return keras.losses.BinaryCrossentropy()  # "weighted_bce" adds class weights in fit


@dataclass
class TrialResult:
    """What a finished trial reports: its curve summary, threshold and validation metrics."""

    config: dict
    epochs: int
    best_epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_auc: float
    threshold: float
    duration_s: float
    metrics: dict = field(default_factory=dict)


def train_trial(cfg: TrialConfig, settings: TrainSettings, variant_uri: str, backbone_path: str, out_dir: str,
                checkpoint_uri: str = "") -> TrialResult:
    """Train one classifier on the prepared variant; save `model.keras` + `model.json` in out_dir.

    The decision threshold is chosen on the validation fold (Youden's J) and stored in
    model.json with the configuration, so evaluation applies the same rule.
    """
    set_seed(settings.seed)
    # Training streams its shards (memory stays flat however large the fold); only the targets
    # (for class weights) and the validation fold (for the threshold) are held.
    targets = np.concatenate([nd.read_shard(u).targets for u in nd.shard_uris(variant_uri, "train")] or [[]])
    valid = nd.load_fold(variant_uri, "valid")
    if len(targets) == 0 or len(valid) == 0:
        raise ValueError(f"variant {variant_uri} has {len(targets)} train and {len(valid)} valid images; both are needed")
    policy = resolve_precision(settings.precision)
    keras.mixed_precision.set_global_policy(policy)
    try:
        unet = keras.saving.load_model(backbone_path, compile=False, safe_mode=True)
        backbone = models.build_backbone(unet if policy == "float32" else _recast(unet))
        models.freeze(backbone, cfg.frozen_layers)
        clf = models.build_classifier(backbone, cfg.model)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    clf.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss=_loss(cfg.loss),
                metrics=["accuracy", keras.metrics.AUC(name="auc")])
    weighted = cfg.class_weight or cfg.loss == "weighted_bce"
    train_ds = nd.stream_dataset(variant_uri, "train", settings.batch_size, cfg.augmentation, True, settings.seed,
                                 class_weights=nd.class_weights(targets) if weighted else None)
    valid_ds = nd.stream_dataset(variant_uri, "valid", settings.batch_size)
    curve, seconds = _fit(clf, train_ds, valid_ds, settings.epochs, "val_auc", "max", settings.patience, out_dir, "trial",
                          checkpoint_uri)
    best = int(np.argmax(curve["val_auc"]))
    probs = predict(clf, valid, settings.batch_size)
    threshold = evaluation.youden_threshold(valid.targets, probs)
    metrics = evaluation.metrics(valid.targets, probs, threshold)
    clf.save(os.path.join(out_dir, "model.keras"))
    result = TrialResult(
        config=asdict(cfg), epochs=len(curve["loss"]), best_epoch=best + 1,
        train_loss=float(curve["loss"][best]), val_loss=float(curve["val_loss"][best]),
        val_accuracy=metrics["accuracy"], val_auc=metrics["auc"], threshold=threshold,
        duration_s=round(seconds, 2), metrics=metrics,
    )
    with open(os.path.join(out_dir, "model.json"), "w") as fh:
        json.dump(asdict(result), fh, indent=2)
    return result


def predict(model, fold: nd.Fold, batch_size: int = 32) -> np.ndarray:
    """Pneumonia probabilities (N,) for a fold."""
    if len(fold) == 0:
        return np.zeros((0,), np.float32)
    return model.predict(nd.make_dataset(fold, batch_size), verbose=0)[:, 0]
