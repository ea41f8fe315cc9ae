"""Training on every GPU of a node, and on several nodes: tf.distribute.

:func:`strategy` picks how a model trains: MultiWorkerMirroredStrategy when ``TF_CONFIG`` names
more than one worker (a Kubeflow Trainer job, one process per node), MirroredStrategy when this
process sees more than one GPU (or when devices are named: ``NEUMO_DEVICES``, for tests on
logical CPU devices), else None: the plain single-device path, unchanged.

Under a strategy the batch a step trains on is the global batch, the per-replica batch times the
replicas (:func:`global_batch`), split between the replicas; the learning rate grows with the
square root of the replicas (:func:`learning_rate`); batch normalisation is synchronized across
replicas (models.build_unet's `synchronized`), so one step equals one step of the plain model on
the same global batch. Only the chief writes outputs (:func:`output_dir`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator

from neumo import storage

logger = logging.getLogger(__name__)

#: Comma-separated TF device names to mirror over (e.g. "/cpu:0,/cpu:1"): MirroredStrategy on
#: exactly these. For tests, which split the CPU into logical devices; empty: decide by the GPUs.
DEVICES_ENV = "NEUMO_DEVICES"

_made: dict[tuple, object] = {}  # one strategy per (TF_CONFIG, devices): MWMS may be created only once


def _tf_config() -> dict:
    """TF_CONFIG as a dict ({} when unset); a clear error when it is not JSON with a cluster."""
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
        if not isinstance(config.get("cluster"), dict) or not isinstance(config.get("task", {}), dict):
            raise ValueError("no cluster object")
        return config
    except (ValueError, AttributeError) as err:
        raise ValueError(f"TF_CONFIG must be JSON with a cluster and a task, got {raw[:200]!r} ({err})") from None


def workers() -> int:
    """Processes TF_CONFIG's cluster trains on (its chief and workers); 1 without TF_CONFIG."""
    spec = _tf_config().get("cluster", {})
    return max(1, sum(len(spec.get(kind, [])) for kind in ("chief", "worker")))


def is_chief() -> bool:
    """Whether this process writes the outputs: the "chief" task, or worker 0 of a cluster without
    one (TensorFlow's rule), or the only process."""
    config = _tf_config()
    task = config.get("task", {})
    kind, index = str(task.get("type", "worker")), int(task.get("index", 0))
    return kind == "chief" or (kind == "worker" and index == 0 and not config.get("cluster", {}).get("chief"))


def strategy(devices: list[str] | None = None):
    """The tf.distribute strategy to train under, or None for the plain single-device path.

    MultiWorkerMirroredStrategy when TF_CONFIG names more than one worker; MirroredStrategy over
    `devices` (or NEUMO_DEVICES) when named, else over the GPUs when more than one is visible.
    The same strategy is returned on every call in a process (MultiWorkerMirroredStrategy must be
    created once, before any other TensorFlow operation: call this first)."""
    import tensorflow as tf

    if devices is None:
        devices = [d.strip() for d in os.environ.get(DEVICES_ENV, "").split(",") if d.strip()]
    key = (os.environ.get("TF_CONFIG", ""), tuple(devices))
    if key not in _made:
        if workers() > 1:
            made = tf.distribute.MultiWorkerMirroredStrategy()
            _reduce_scalar_logs_across_workers()
        elif devices:
            made = tf.distribute.MirroredStrategy(devices)
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            made = tf.distribute.MirroredStrategy()
        else:
            made = None
        if made is not None:
            logger.info("training with %s: %d replicas", type(made).__name__, made.num_replicas_in_sync)
        _made[key] = made
    return _made[key]


def _reduce_scalar_logs_across_workers() -> None:
    """Let Keras 3.15 fit under MultiWorkerMirroredStrategy: it averages each step's logs (scalars:
    the loss and the metrics) across workers along axis 0, which a scalar lacks ("Invalid reduction
    dimension 0", tensorflow/tensorflow#72388). Scalars are averaged whole instead; everything else
    goes to Keras' own reduction unchanged. Installed once, when a multi-worker strategy is made."""
    from keras import tree
    from keras.src.backend.tensorflow import trainer

    keras_reduce = trainer.reduce_per_replica
    if getattr(keras_reduce, "scalars_whole", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not trainer._collective_all_reduce_multi_worker(strategy):
            return keras_reduce(values, strategy, reduction)

        def mean(v):
            return strategy.reduce("MEAN", v, axis=None if v.shape.rank == 0 else 0)
        return tree.map_structure(mean, values)

    reduce_per_replica.scalars_whole = True
    trainer.reduce_per_replica = reduce_per_replica


def replicas(strat) -> int:
    """Replicas a step is split across (1 without a strategy)."""
    return 1 if strat is None else int(strat.num_replicas_in_sync)


def scope(strat):
    """strat.scope() (models and optimizers built in it are mirrored), or a no-op without a strategy."""
    return contextlib.nullcontext() if strat is None else strat.scope()


def global_batch(per_replica: int, strat) -> int:
    """The batch one step trains on: `per_replica` on each replica, times the replicas."""
    if int(per_replica) < 1:
        raise ValueError(f"per_replica batch must be >= 1, got {per_replica}")
    return int(per_replica) * replicas(strat)


def learning_rate(base: float, strat) -> float:
    """The learning rate for `base` (tuned at the per-replica batch on one device) at the global batch.

    Square-root scaling, base x sqrt(replicas): for adaptive optimisers such as our Adam, whose
    step size is normalised by the gradient's second moment, sqrt(k) is the rule that keeps the
    training dynamics of a k-times larger batch (Malladi et al. 2022, "On the SDEs and scaling rules
    for adaptive gradient algorithms"); the linear rule of SGD (Goyal et al. 2017) overshoots with
    Adam at small batches like ours (8 per replica). One replica: `base` unchanged."""
    if not base > 0:
        raise ValueError(f"learning_rate must be > 0, got {base}")
    return float(base) * math.sqrt(replicas(strat))


def prepare(model, strat):
    """`model` (built and compiled in `strat`'s scope) made ready to fit and evaluate under `strat`.

    Keras 3.15 builds a distributed model's loss and metrics from the first batch of each fit or
    evaluate, averaged across replicas element by element (TensorFlowTrainer._maybe_symbolic_build):
    that fails when the batch splits unevenly (a partial batch) and, under MultiWorkerMirroredStrategy,
    always (its reduce takes no nested batch). Only the batch's shapes and dtypes are needed, so this
    model reads them from the first local replica's share instead. Without a strategy, `model` untouched."""
    if strat is None:
        return model
    import tensorflow as tf
    from keras import tree

    def local(value):
        return strat.experimental_local_results(value)[0] if isinstance(value, tf.distribute.DistributedValues) else value

    def symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tree.map_structure(local, next(batches))
                break
        with strat.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = symbolic_build
    return model


def unsynchronized(model, strat):
    """The model to save: under a strategy a copy whose batch norms are plain (not synchronized) with
    the same weights, so a saved model is the same whichever way it was trained and runs on one
    device as every other; without a strategy, `model` itself."""
    if strat is None:
        return model
    from neumo import models

    return models.rebuild(model, synchronized=False)


def shardable(dataset, strat):
    """`dataset` as it should be distributed: under a strategy, auto-sharded by DATA (each global batch
    is split between the workers, so the union of a step's batches is the global batch; FILE sharding
    cannot see through our numpy_function shard reader). Without a strategy, `dataset` untouched."""
    if strat is None:
        return dataset
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


@contextlib.contextmanager
def output_dir(out_dir: str) -> Iterator[str]:
    """A local folder to write a training's outputs in, for `out_dir` (a path, file:// or gs:// URI).

    The chief writes into `out_dir` itself when it is local, else into a temporary folder whose
    files are uploaded to `out_dir` (neumo.storage) when the block ends without an error. Other
    workers of a multi-worker job train alongside but write into a temporary folder that is then
    deleted (TensorFlow's rule for saving under MultiWorkerMirroredStrategy)."""
    chief = is_chief()
    local = storage.local_path(out_dir) if chief else None
    if local is not None:
        os.makedirs(local, exist_ok=True)
        yield local
        return
    temp = tempfile.mkdtemp(prefix="neumo-out-")
    try:
        yield temp
        if chief:
            _upload_folder(temp, out_dir)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _upload_folder(local: str, uri: str) -> None:
    """Every file under `local` to the same relative path under `uri`."""
    for root, _, files in os.walk(local):
        for name in sorted(files):
            path = os.path.join(root, name)
            storage.upload(path, storage.join(uri, os.path.relpath(path, local).replace(os.sep, "/")))
