"""The fit loop every model of the project trains with (lung mask, autoencoder, classifier):
seeded, one log line per epoch, best-weights early stopping, a CSV curve and a best checkpoint
beside the model, and a training state that survives a preempted pod."""

from __future__ import annotations

import logging
import os
import time

import keras
import numpy as np

from neumo import storage

logger = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    keras.utils.set_random_seed(int(seed))


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class EpochLog(keras.callbacks.Callback):
    """Logs one line per epoch (its figures, its time, the time the epochs left may take) and, within
    an epoch longer than `every` seconds, a progress line at most every `every` seconds of wall
    time: the step, the steps per epoch (Keras' count, else the last epoch's) and the epoch's ETA."""

    async_safe = True  # reads only the clock and the step: Keras need not wait for each step to call it

    def __init__(self, label: str, every: float = 30.0):
        super().__init__()
        self.label, self.every = label, every
        self.last_steps = None  # steps of the last whole epoch: the estimate when Keras has no count

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.steps = epoch, 0
        self.began = self.reported = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        self.steps = max(self.steps, batch + 1)
        now = time.monotonic()
        if now - self.reported < self.every:
            return
        self.reported = now
        rate = self.steps / max(now - self.began, 1e-9)
        known = (self.params or {}).get("steps")
        total = known or self.last_steps
        where = f"step {self.steps}"
        if total and total > self.steps:
            where += f"/{total}" if known else f"/~{total}"
            where += f" ({100 * self.steps / total:.0f}%), {rate:.1f} steps/s, epoch ETA {_duration((total - self.steps) / rate)}"
        else:
            where += f", {rate:.1f} steps/s"
        logger.info("%s epoch %d: %s", self.label, self.epoch + 1, where)

    def on_epoch_end(self, epoch, logs=None):
        took = time.monotonic() - self.began
        self.last_steps = self.steps or self.last_steps
        figures = " ".join(f"{k}={v:.4f}" for k, v in sorted((logs or {}).items()))
        epochs = (self.params or {}).get("epochs") or epoch + 1
        left = epochs - (epoch + 1)
        more = f"; at most {left} more, ~{_duration(left * took)}" if left > 0 else ""
        logger.info("%s epoch %d: %s (%d of %d, %s%s)", self.label, epoch + 1, figures, epoch + 1, epochs,
                    _duration(took), more)


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


def fit(model, train_ds, valid_ds, epochs: int, monitor: str, mode: str, patience: int, workdir: str, label: str,
        checkpoint_uri: str = "", scorers: list | None = None):
    """fit with best-weights early stopping, a per-epoch CSV log and a best checkpoint; with a
    checkpoint_uri the training state is backed up there every epoch and resumed from it.
    `scorers`: callbacks that add figures to each epoch's logs (run before early stopping reads `monitor`).

    Returns (the Keras history dict, seconds); a NaN or infinite training loss is a FloatingPointError."""
    os.makedirs(workdir, exist_ok=True)
    resume = []
    if checkpoint_uri:
        backup = os.path.join(workdir, "backup")
        if _restore(checkpoint_uri, backup):
            logger.info("%s: resuming from the training state at %s", label, checkpoint_uri)
        resume = [keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False),
                  SyncToStorage(backup, checkpoint_uri)]
    callbacks = resume + list(scorers or []) + [
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
