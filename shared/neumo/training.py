"""Training: the pretraining autoencoder and one classifier trial.

Both train with :func:`neumo.fitting.fit`: seeded, one log line per epoch, the best epoch kept
(early stopping with best weights restored) and the curve written as CSV beside the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import keras
import numpy as np

from neumo import data as nd
from neumo import distribute, evaluation, models, parameters, shifts
from neumo.fitting import fit, set_seed
from neumo.trial import TrialConfig


# --- pretraining -------------------------------------------------------------------------------

PRETRAIN_TASKS = parameters.BY_NAME["pretrain_task"].choices
PRETRAIN_DATA = parameters.BY_NAME["pretrain_data"].choices


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of the U-Net autoencoder pretraining.

    `task`: "restore" (ours: the input corrupted, the clean image the target, the top skip
    dropped so the encoder must learn anatomy instead of copying pixels through it), "identity"
    (the seed's plain autoencoder: input = output, every skip) or "none" (no training: the
    randomly initialised U-Net, the control). `data`: "unlabelled+train" or "unlabelled" (the
    seed's: NIH only)."""

    depth: int = parameters.default("depth")
    filters: int = parameters.default("filters")
    epochs: int = parameters.default("pretrain_epochs")
    batch_size: int = 8
    learning_rate: float = 1e-3
    task: str = parameters.default("pretrain_task")
    data: str = parameters.default("pretrain_data")
    seed: int = parameters.default("seed")

    def __post_init__(self):
        for name in ("depth", "filters", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"pretrain {name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"pretrain learning_rate must be > 0, got {self.learning_rate}")
        if self.task not in PRETRAIN_TASKS:
            raise ValueError(f"pretrain_task must be one of {PRETRAIN_TASKS}, got {self.task!r}")
        if self.data not in PRETRAIN_DATA:
            raise ValueError(f"pretrain_data must be one of {PRETRAIN_DATA}, got {self.data!r}")

    @property
    def skip_levels(self) -> int:
        """Top skip connections dropped: one for restoration, none for the seed's autoencoder."""
        return 1 if self.task == "restore" else 0


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


#: One image in this many is held out of pretraining to watch the validation loss (early stopping):
#: enough to see overfitting, little taken from the images the backbone learns from.
PRETRAIN_HELD_OUT = 10
_HASH_RANGE = 2**64


def image_hashes(ids, seed: int) -> np.ndarray:
    """A uint64 per image id, fixed by (seed, id) alone: the held-out rule reads it image by image."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{int(seed)}:{i}".encode(), digest_size=8).digest(), "big")
                     for i in ids], np.uint64)


def held_out_cutoff(hashes: np.ndarray) -> int:
    """The hash below which an image is held out: about one in PRETRAIN_HELD_OUT of them, at least one
    (the smallest hash) and never all (the largest stays in the fit) when there are two or more."""
    cutoff = _HASH_RANGE // PRETRAIN_HELD_OUT
    if len(hashes) and not (hashes < cutoff).any():
        cutoff = int(hashes.min()) + 1
    if len(hashes) > 1 and (hashes < cutoff).all():
        cutoff = int(hashes.max())
    return cutoff


@dataclass(frozen=True)
class PretrainPick:
    """The shard reader's per-image rule (picklable, for tf.numpy_function): the originals (no
    acquisition copy) whose hash of (seed, id) is below `cutoff` when `held`, at or above it when not."""

    seed: int
    cutoff: int
    held: bool

    def __call__(self, ids) -> np.ndarray:
        from neumo.preprocess import COPY_MARK

        original = np.array([COPY_MARK not in str(i) for i in ids], bool)
        return original & ((image_hashes(ids, self.seed) < self.cutoff) == self.held)


@dataclass(frozen=True)
class PretrainData:
    """What a backbone pretrains on, as shards read in a stream (never the whole set in memory):
    `uris`, the unlabelled shards and (pretrain_data "unlabelled+train") the train shards; `unlabelled`
    and `train` count the images used (train: its originals), `held` those held out for the validation
    loss by the rule `cutoff` and `seed` define (PretrainPick)."""

    info: dict
    uris: tuple[str, ...]
    unlabelled: int
    train: int
    held: int
    cutoff: int
    seed: int

    @property
    def pixels(self) -> int:
        return int(self.info["pixels"])

    @property
    def images(self) -> int:
        """Images the autoencoder trains on (the held-out ones excluded)."""
        return self.unlabelled + self.train - self.held

    @property
    def source(self) -> str:
        return f"{self.unlabelled} unlabelled + {self.train} train"

    def pick(self, held: bool) -> PretrainPick:
        return PretrainPick(self.seed, self.cutoff, held)


def pretraining_data(variant_dir: str, seed: int, data: str = parameters.default("pretrain_data")) -> PretrainData:
    """What a backbone pretrains on: the variant's unlabelled images and, when `data` is
    "unlabelled+train", the originals of its train fold (labels unused; acquisition copies are for
    classifiers; valid, val and test judge the classifiers), about one in PRETRAIN_HELD_OUT (at least
    one) held out for the validation loss by a hash of (seed, id). Reads only the shards' ids."""
    from neumo.preprocess import COPY_MARK

    if data not in PRETRAIN_DATA:
        raise ValueError(f"pretrain_data must be one of {PRETRAIN_DATA}, got {data!r}")
    info = nd.read_variant(variant_dir)
    folds = ("unlabelled", "train") if data == "unlabelled+train" else ("unlabelled",)
    counts, uris, hashes = {"unlabelled": 0, "train": 0}, [], []
    for fold in folds:
        for uri in nd.shard_uris(variant_dir, fold, info):
            ids = [i for i in nd.shard_ids(uri) if COPY_MARK not in str(i)]
            counts[fold] += len(ids)
            hashes.append(image_hashes(ids, seed))
            uris.append(uri)
    source = f"{counts['unlabelled']} unlabelled + {counts['train']} train"
    if sum(counts.values()) < 2:
        raise ValueError(f"pretraining needs at least 2 images; variant {variant_dir} has {sum(counts.values())} "
                         f"({source}, pretrain_data={data}): give a pretrain_uri with unlabelled images")
    hashes = np.concatenate(hashes)
    cutoff = held_out_cutoff(hashes)
    return PretrainData(info, tuple(uris), counts["unlabelled"], counts["train"], int((hashes < cutoff).sum()),
                        cutoff, int(seed))


def pretrain_datasets(data: PretrainData, batch_size: int, task: str, seed: int, cache_bytes: int = nd.CACHE_BYTES,
                      shuffle_bytes: int = nd.SHUFFLE_BYTES, strategy=None):
    """(training, held-out) tf.data of (input, clean z-scored image) batches streamed from the shards:
    the input corrupted (corrupt_tf) for task "restore", the image itself for "identity". `batch_size`
    is per replica of `strategy`."""
    def pairs(held: bool):
        count = data.held if held else data.images
        ds = nd.stream_shards(list(data.uris), data.pixels, count, distribute.global_batch(batch_size, strategy),
                              shuffle=not held, seed=seed, targets_as_images=True, cache_bytes=cache_bytes,
                              shuffle_bytes=shuffle_bytes, select=data.pick(held))
        if task == "restore":
            ds = ds.map(lambda x, y: (corrupt_tf(x, seed), y))  # one call at a time: the draws keep their order
        return distribute.shardable(ds, strategy)

    return pairs(False), pairs(True)


def pretrain(data: PretrainData, config: PretrainConfig, out_dir: str, strategy=None):
    """Train the U-Net autoencoder on the streamed images of `data` by `config.task`; save
    `autoencoder.keras` in out_dir. Returns (model, curve dict, seconds); task "none" saves the seeded
    random initialisation untrained (an empty curve). Under a tf.distribute `strategy` the model is
    built in its scope with synchronized batch norms, each step trains on config.batch_size per
    replica at the learning rate distribute.learning_rate scales."""
    if data.images == 0:
        raise ValueError("pretraining needs at least one unlabelled image")
    set_seed(config.seed)
    with distribute.scope(strategy):
        unet = models.build_unet(data.pixels, config.depth, config.filters, "linear", config.skip_levels,
                                 name="autoencoder", synchronized=strategy is not None)
        if config.task != "none":
            unet.compile(optimizer=keras.optimizers.Adam(distribute.learning_rate(config.learning_rate, strategy)),
                         loss="mse")
            distribute.prepare(unet, strategy)
    curve, seconds = {"loss": [], "val_loss": []}, 0.0
    if config.task != "none":
        train, held = pretrain_datasets(data, config.batch_size, config.task, config.seed, strategy=strategy)
        curve, seconds = fit(unet, train, held, config.epochs, "val_loss", "min", max(2, config.epochs // 3),
                             out_dir, "pretrain")
    os.makedirs(out_dir, exist_ok=True)
    distribute.unsynchronized(unet, strategy).save(os.path.join(out_dir, "autoencoder.keras"))
    return unet, curve, seconds


# --- one classifier trial ----------------------------------------------------------------------

@dataclass(frozen=True)
class TrainSettings:
    """Fixed settings of every trial (the seed's: Adam, batch 8)."""

    epochs: int = parameters.default("epochs")
    batch_size: int = parameters.default("batch_size")
    patience: int = parameters.default("patience")
    seed: int = parameters.default("seed")
    precision: str = "auto"
    frozen_layers_count: str = parameters.default("frozen_layers_count")
    threshold_policy: str = parameters.default("threshold_policy")
    selection: str = parameters.default("selection")

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError(f"epochs, batch_size and patience must be >= 1: {self}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("frozen_layers_count", "threshold_policy", "selection"):
            parameters.parse(name, getattr(self, name))  # one of the declared choices, or a clear error


PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


def resolve_precision(precision: str) -> str:
    """"auto" -> mixed_float16 where a GPU is present, else float32 (mixed is slower on CPUs)."""
    return nd.default_precision() if precision == "auto" else precision


def loss_function(name: str):
    """The Keras loss of a trial's `loss` ("weighted_bce" is cross-entropy; its class weights are
    added in fit)."""
    if name == "focal":
        return keras.losses.BinaryFocalCrossentropy(gamma=2.0)
    return keras.losses.BinaryCrossentropy()


def trial_loss(name: str, targets, probs) -> float:
    """A trial's own loss over images, as `model.evaluate` reports it (unweighted mean)."""
    if len(targets) == 0:
        return float("nan")
    y = np.asarray(targets, np.float32).reshape(-1, 1)
    p = np.asarray(probs, np.float32).reshape(-1, 1)
    return float(loss_function(name)(y, p))


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
    threshold_policy: str = parameters.default("threshold_policy")
    frozen_layers_count: str = parameters.default("frozen_layers_count")
    metrics: dict = field(default_factory=dict)
    shift_score: float = float("nan")
    worst_shift: str = ""
    selection: str = parameters.default("selection")
    score: float = float("nan")
    temperature: float = 1.0
    shift_balanced_accuracy: dict = field(default_factory=dict)


def by_shift(fold: nd.Fold) -> dict[str, nd.Fold]:
    """A variant's "shifted" fold split by shift name (in the order of shifts.SHIFTS)."""
    names = np.array([shifts.shift_of(i) for i in fold.ids])
    return {n: nd.Fold(fold.images[names == n], fold.targets[names == n], fold.ids[names == n])
            for n in shifts.SHIFTS if (names == n).any()}


@dataclass(frozen=True)
class Selection:
    """What one model scores on the valid fold and its shifted copies, at the threshold `policy`
    chooses: the threshold, the valid metrics and the shift score (evaluation.shift_score)."""

    threshold: float
    metrics: dict
    shift: dict

    @classmethod
    def of(cls, valid_targets, valid_probs, shifted: dict, policy: str) -> "Selection":
        """`shifted`: shift name -> (targets, probabilities)."""
        pooled_t = np.concatenate([t for t, _ in shifted.values()]) if shifted else np.zeros(0)
        pooled_p = np.concatenate([p for _, p in shifted.values()]) if shifted else np.zeros(0)
        threshold = evaluation.choose_threshold(valid_targets, valid_probs, policy, pooled_t, pooled_p)
        return cls(threshold, evaluation.metrics(valid_targets, valid_probs, threshold),
                   evaluation.shift_score(valid_targets, valid_probs, threshold, shifted))

    def score(self, selection: str) -> float:
        return self.shift["shift_score"] if selection == "shift" else self.metrics["auc"]


#: Per epoch, the shift score reads every valid image as acquired and this many of them (the same
#: fixed draw under every shift): a third of the cost at the valid fold's size; the score recorded
#: with the model reads them all.
SHIFTED_PER_EPOCH = 300


class SelectionScore(keras.callbacks.Callback):
    """Adds `val_shift_score` (the worst balanced accuracy over the valid fold and its shifted
    copies, at the threshold the policy picks this epoch) to each epoch's logs, before early
    stopping and the best checkpoint read them. The shifted copies are SHIFTED_PER_EPOCH of the
    valid images (a fixed draw, the same under every shift)."""

    def __init__(self, valid: nd.Fold, shifted: dict[str, nd.Fold], policy: str, batch_size: int,
                 per_shift: int = SHIFTED_PER_EPOCH):
        super().__init__()
        n = len(valid)
        keep = np.sort(np.random.default_rng(0).permutation(n)[:per_shift]) if n > per_shift else np.arange(n)
        shifted = {name: nd.Fold(f.images[keep], f.targets[keep], f.ids[keep]) for name, f in shifted.items()}
        self.valid, self.shifted, self.policy, self.batch_size = valid, shifted, policy, batch_size

    def on_epoch_end(self, epoch, logs=None):
        chosen = Selection.of(self.valid.targets, predict(self.model, self.valid, self.batch_size),
                              {n: (f.targets, predict(self.model, f, self.batch_size)) for n, f in self.shifted.items()},
                              self.policy)
        if logs is not None:
            logs["val_shift_score"] = chosen.shift["shift_score"]


def _classifier(cfg: TrialConfig, settings: TrainSettings, backbone_path: str, strategy) -> keras.Model:
    """The trial's compiled classifier on the pretrained backbone, in `settings.precision`; under a
    tf.distribute strategy built in its scope, batch norms synchronized, the learning rate scaled
    for the global batch (distribute.learning_rate)."""
    policy = resolve_precision(settings.precision)
    keras.mixed_precision.set_global_policy(policy)
    try:
        with distribute.scope(strategy):
            unet = keras.saving.load_model(backbone_path, compile=False, safe_mode=True)
            if policy != "float32" or strategy is not None:
                unet = models.rebuild(unet, recast=policy != "float32", synchronized=True if strategy is not None else None)
            backbone = models.build_backbone(unet)
            models.freeze(backbone, cfg.frozen_layers, settings.frozen_layers_count)
            clf = models.build_classifier(backbone, cfg.model)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    with distribute.scope(strategy):
        clf.compile(optimizer=keras.optimizers.Adam(distribute.learning_rate(cfg.learning_rate, strategy)),
                    loss=loss_function(cfg.loss), metrics=["accuracy", keras.metrics.AUC(name="auc")])
    return distribute.prepare(clf, strategy)


def train_trial(cfg: TrialConfig, settings: TrainSettings, variant_uri: str, backbone_path: str, out_dir: str,
                checkpoint_uri: str = "") -> TrialResult:
    """Train one classifier on the prepared variant; save `model.keras` + `model.json` in out_dir.

    The decision threshold is chosen on the validation fold by `settings.threshold_policy` and
    stored in model.json with the configuration and the policy, so evaluation applies the same rule; `curve.png` beside
    `history.csv` shows the losses and the selection score by epoch, the best epoch marked. The best
    epoch is the one with the best `settings.selection` score: "shift" (evaluation.shift_score on the
    variant's shifted valid copies; every epoch pays for their predictions) or "auc" (the valid AUC).
    model.json also records the temperature that calibrates the probabilities (fitted on the valid fold).
    """
    from neumo import figures

    set_seed(settings.seed)
    # Training streams its shards (memory stays flat however large the fold); only the targets
    # (for class weights) and the validation fold (for the threshold) are held.
    targets = np.concatenate([nd.read_shard(u).targets for u in nd.shard_uris(variant_uri, "train")] or [[]])
    valid = nd.load_fold(variant_uri, "valid")
    if len(targets) == 0 or len(valid) == 0:
        raise ValueError(f"variant {variant_uri} has {len(targets)} train and {len(valid)} valid images; both are needed")
    shifted = by_shift(nd.load_fold(variant_uri, "shifted"))
    if not shifted and (settings.selection == "shift" or settings.threshold_policy == "pooled_shifts"):
        raise ValueError(f"variant {variant_uri} has no shifted valid copies (prepared by an older neumo), which "
                         "selection=shift and threshold_policy=pooled_shifts need: prepare it again, or set "
                         "selection=auc")
    strategy = distribute.strategy()
    clf = _classifier(cfg, settings, backbone_path, strategy)
    weighted = cfg.class_weight or cfg.loss == "weighted_bce"
    batch = distribute.global_batch(settings.batch_size, strategy)
    train_ds = nd.stream_dataset(variant_uri, "train", batch, cfg.augmentation, True, settings.seed,
                                 class_weights=nd.class_weights(targets) if weighted else None)
    valid_ds = nd.stream_dataset(variant_uri, "valid", batch)
    train_ds, valid_ds = distribute.shardable(train_ds, strategy), distribute.shardable(valid_ds, strategy)
    monitor = "val_shift_score" if settings.selection == "shift" else "val_auc"
    extra = [SelectionScore(valid, shifted, settings.threshold_policy, settings.batch_size)] if shifted else []
    curve, seconds = fit(clf, train_ds, valid_ds, settings.epochs, monitor, "max", settings.patience, out_dir, "trial",
                          checkpoint_uri, extra)
    figures.curve_png(curve, os.path.join(out_dir, "curve.png"), ylabel=f"loss ({cfg.loss})",
                      metric="shift_score" if settings.selection == "shift" else "auc", best_by=monitor, mode="max",
                      title=f"classifier: model {cfg.model}, {cfg.pixels} px, mask={cfg.mask}, lr {cfg.learning_rate:g}")
    best = int(np.argmax(curve[monitor]))
    probs = predict(clf, valid, settings.batch_size)
    chosen = Selection.of(valid.targets, probs, {n: (f.targets, predict(clf, f, settings.batch_size))
                                                 for n, f in shifted.items()}, settings.threshold_policy)
    metrics = chosen.metrics
    distribute.unsynchronized(clf, strategy).save(os.path.join(out_dir, "model.keras"))
    temperature = evaluation.fit_temperature(valid.targets, probs)
    result = TrialResult(
        config=asdict(cfg), epochs=len(curve["loss"]), best_epoch=best + 1,
        train_loss=float(curve["loss"][best]), val_loss=float(curve["val_loss"][best]),
        val_accuracy=metrics["accuracy"], val_auc=metrics["auc"], threshold=chosen.threshold,
        duration_s=round(seconds, 2), threshold_policy=settings.threshold_policy,
        frozen_layers_count=settings.frozen_layers_count, metrics=metrics,
        shift_score=chosen.shift["shift_score"] if shifted else float("nan"),
        worst_shift=chosen.shift["worst_shift"] if shifted else "", selection=settings.selection,
        score=chosen.score(settings.selection), temperature=temperature,
        shift_balanced_accuracy=chosen.shift["balanced_accuracy"] if shifted else {},
    )
    with open(os.path.join(out_dir, "model.json"), "w") as fh:
        json.dump(asdict(result), fh, indent=2)
    return result


def predict(model, fold: nd.Fold, batch_size: int = 32) -> np.ndarray:
    """Pneumonia probabilities (N,) for a fold."""
    if len(fold) == 0:
        return np.zeros((0,), np.float32)
    return model.predict(nd.make_dataset(fold, batch_size), verbose=0)[:, 0]
