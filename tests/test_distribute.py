"""Training under tf.distribute (neumo.distribute): two logical CPU devices stand in for two GPUs,
two local processes with TF_CONFIG for two nodes. TensorFlow's devices are fixed when it starts,
so each of these runs in a fresh interpreter."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from neumo import data as nd
from neumo import distribute, models
from neumo.preprocess import COPY_MARK

REPO_ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger(__name__)  # the measured figures: pytest -o log_cli=true --log-cli-level=INFO

#: The preamble of every child: two logical CPU devices, set before TensorFlow starts.
TWO_CPUS = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
"""


def run_child(code: str, env: dict | None = None, timeout: int = 240) -> subprocess.Popen:
    """Start `code` in a fresh interpreter with the repository's `shared` on its path."""
    full = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "shared"), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    for name in ("TF_CONFIG", distribute.DEVICES_ENV):
        if name not in (env or {}):
            full.pop(name, None)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: int = 240) -> str:
    """The child's stdout; fails the test with its stderr when it fails."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def write_variant(root: Path, unlabelled: int, train: int, pixels: int = 32, per_shard: int = 8,
                  copies: int = 1, seed: int = 0) -> Path:
    """A prepared variant written directly (no preprocessing): random images in shards of
    `per_shard`; each train original followed by `copies` acquisition copies."""
    rng = np.random.default_rng(seed)
    folds = {"unlabelled": [f"nih/{i:05d}" for i in range(unlabelled)],
             "train": [f"t/{i:05d}{suffix}" for i in range(train) for suffix in ["", *[f"{COPY_MARK}{k}" for k in
                                                                                     range(1, copies + 1)]]],
             "valid": [f"v/{i:05d}" for i in range(4)]}
    shards = {}
    for fold, ids in folds.items():
        shards[fold] = []
        for k in range(0, len(ids), per_shard):
            chunk = ids[k:k + per_shard]
            name = f"shard-{k // per_shard:05d}.npz"
            images = rng.integers(0, 256, (len(chunk), pixels, pixels), dtype=np.uint8)
            targets = np.full(len(chunk), -1, np.int8) if fold == "unlabelled" else np.arange(k, k + len(chunk)) % 2
            nd.write_shard(str(root / fold / name), images, targets, chunk)
            shards[fold].append(name)
    info = {"pixels": pixels, "mask": False, "counts": {f: len(i) for f, i in folds.items()}, "shards": shards,
            "data_version": "test"}
    (root / "variant.json").write_text(json.dumps(info))
    return root


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --- the plain path ---------------------------------------------------------------------------

def test_one_device_has_no_strategy_and_the_plain_models(monkeypatch):
    """No TF_CONFIG, no NEUMO_DEVICES, no second GPU: no strategy, and the models are built exactly
    as before (every batch norm unsynchronized, configurations equal to the plain builder's)."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv(distribute.DEVICES_ENV, raising=False)
    assert distribute.strategy() is None
    assert distribute.global_batch(8, None) == 8 and distribute.learning_rate(1e-3, None) == 1e-3
    assert distribute.scope(None).__enter__() is None
    sentinel = object()
    assert distribute.shardable(sentinel, None) is sentinel  # the dataset untouched
    plain, explicit = models.build_unet(32, 2, 4), models.build_unet(32, 2, 4, synchronized=False)
    assert plain.get_config() == explicit.get_config()
    norms = [layer for layer in plain.layers if "_bn" in layer.name]
    assert norms and all(not layer.synchronized for layer in norms)
    import keras

    assert norms[0].get_config() == {**keras.layers.BatchNormalization(momentum=0.9).get_config(),
                                      "name": norms[0].name}
    synced = models.rebuild(plain, synchronized=True)
    assert all(synced.get_layer(layer.name).synchronized for layer in norms)
    assert all(np.array_equal(a, b) for a, b in zip(plain.get_weights(), synced.get_weights()))


@pytest.mark.parametrize("config,match", [
    ('{"cluster": [1]}', "TF_CONFIG"), ("not json", "TF_CONFIG"),
])
def test_a_bad_tf_config_is_one_clear_error(monkeypatch, config, match):
    monkeypatch.setenv("TF_CONFIG", config)
    with pytest.raises(ValueError, match=match):
        distribute.workers()


def test_the_chief_and_the_learning_rate_rule(monkeypatch):
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    for index, chief in ((0, True), (1, False)):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        assert distribute.workers() == 2 and distribute.is_chief() is chief
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {**cluster, "chief": ["127.0.0.1:3"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert distribute.workers() == 3 and not distribute.is_chief()

    class Four:
        num_replicas_in_sync = 4

    assert distribute.global_batch(8, Four()) == 32 and distribute.learning_rate(1e-3, Four()) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="per_replica"):
        distribute.global_batch(0, Four())


# --- two replicas: the same step as the plain model --------------------------------------------

STEP = TWO_CPUS + """
import json, sys
import keras, numpy as np
from neumo import distribute, models

strategy = distribute.strategy()  # NEUMO_DEVICES: MirroredStrategy over the two logical CPUs
assert type(strategy).__name__ == "MirroredStrategy" and strategy.num_replicas_in_sync == 2

def build(kind, synchronized):
    unet = models.build_unet(32, 2, 4, synchronized=synchronized, name="autoencoder")
    if kind == "unet":
        return unet, "mse"
    clf = models.build_classifier(models.build_backbone(unet), 1, dropout=0.0)  # no random dropout masks
    return clf, "binary_crossentropy"

def step(kind, strat, weights, x, y, w):
    # SGD: the step is the gradient itself (Adam's first step is lr * sign(g), and gradients that are
    # zero up to rounding, the biases before a batch norm, would flip sign at random)
    with distribute.scope(strat):
        model, loss = build(kind, strat is not None)
        model.set_weights(weights)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    tensors = (x, y) if w is None else (x, y, w)
    ds = distribute.shardable(tf.data.Dataset.from_tensor_slices(tensors).batch(len(x)), strat)
    logs = model.fit(ds, epochs=1, verbose=0).history["loss"][0]
    return [np.asarray(v) for v in model.get_weights()], logs

rng = np.random.default_rng(0)
x = rng.normal(size=(8, 32, 32, 1)).astype("float32")
out = {}
for kind in ("unet", "classifier"):
    keras.utils.set_random_seed(0)
    weights = build(kind, False)[0].get_weights()
    y = x if kind == "unet" else (rng.random((8, 1)) < 0.5).astype("float32")
    w = None if kind == "unet" else rng.uniform(0.5, 2.0, 8).astype("float32")  # per-image weights, as class weights arrive
    (plain, loss_plain), (mirrored, loss_mirrored) = step(kind, None, weights, x, y, w), step(kind, strategy, weights, x, y, w)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(plain, weights))
    out[kind] = {"diff": max(float(np.abs(a - b).max()) for a, b in zip(plain, mirrored)), "moved": moved,
                 "loss": [loss_plain, loss_mirrored]}
print(json.dumps(out))
"""


def test_one_step_on_two_replicas_equals_one_plain_step():
    """One SGD step on a global batch of 8 split over two replicas (synchronized batch norms, the
    loss reduced over the global batch, sample weights) gives the plain model's weights to 1e-5,
    batch-norm moving statistics included: for the U-Net autoencoder and a classifier."""
    out = json.loads(finish(run_child(STEP, {distribute.DEVICES_ENV: "/cpu:0,/cpu:1"})).splitlines()[-1])
    logger.info("one step, plain vs two replicas: %s", out)
    for kind, r in out.items():
        assert r["moved"] > 1e-3, kind  # the step did change the weights
        assert r["diff"] < 1e-5, (kind, r)
        assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-5), (kind, r)


CONVERGE = TWO_CPUS + """
import json, math, sys
from neumo import distribute, training

variant = sys.argv[1]
data = training.pretraining_data(variant, 0, "unlabelled+train")
curves = {}
for name, strat, batch in (("plain", None, 8), ("mirrored", distribute.strategy(["/cpu:0", "/cpu:1"]), 4)):
    # the same global batch (8) and learning rate (1e-3) both ways
    lr = 1e-3 / math.sqrt(distribute.replicas(strat))
    config = training.PretrainConfig(depth=2, filters=4, epochs=4, batch_size=batch, learning_rate=lr)
    curve = training.pretrain(data, config, f"{variant}-{name}", strat)[1]
    curves[name] = {k: [float(v) for v in curve[k]] for k in ("loss", "val_loss")}
print(json.dumps(curves))
"""


@pytest.mark.slow  # over a minute on 2 cores
def test_a_short_pretraining_converges_the_same_on_two_replicas(tmp_path):
    """Up to four epochs of restoration pretraining (Adam, the corruption drawn on the global batch) on
    32 images: the loss curves on two replicas stay within 2% of the plain run's, epoch by epoch."""
    variant = write_variant(tmp_path / "v", unlabelled=24, train=8)
    code = f"import sys; sys.argv = ['x', {str(variant)!r}]\n" + textwrap.dedent(CONVERGE)
    curves = json.loads(finish(run_child(code)).splitlines()[-1])
    logger.info("loss curves, plain vs two replicas: %s", curves)
    for key in ("loss", "val_loss"):
        plain, mirrored = np.array(curves["plain"][key]), np.array(curves["mirrored"][key])
        assert len(plain) == len(mirrored) >= 2  # the same early stop
        assert np.allclose(plain, mirrored, rtol=0.02), (key, plain, mirrored)
    assert curves["plain"]["loss"][-1] < curves["plain"]["loss"][0]  # it did learn


TRIAL = TWO_CPUS + """
import json, sys
import keras
from neumo import distribute, training
from neumo.trial import TrialConfig

variant, out = sys.argv[1], sys.argv[2]
strategy = distribute.strategy()
data = training.pretraining_data(variant, 0, "unlabelled+train")
training.pretrain(data, training.PretrainConfig(depth=2, filters=4, task="none"), out + "/b", strategy)
cfg = TrialConfig(32, False, 1, 2, 1e-3, "bce", "light", True)
settings = training.TrainSettings(epochs=1, batch_size=4, precision="mixed_float16", selection="auc")
result = training.train_trial(cfg, settings, variant, out + "/b/autoencoder.keras", out + "/t")
model = keras.saving.load_model(out + "/t/model.keras", compile=False, safe_mode=True)
backbone = model.get_layer("backbone")
print(json.dumps({"replicas": distribute.replicas(strategy), "loss": result.train_loss,
                  "saved_synchronized": any(l.synchronized for l in backbone.layers if "_bn" in l.name),
                  "policy": backbone.get_layer("enc1_conv1_raw").dtype_policy.name,
                  "frozen": [l.name for l in backbone.layers if l.weights and not l.trainable]}))
"""


@pytest.mark.slow  # over a minute on 2 cores
def test_a_trial_on_two_replicas_with_mixed_precision_and_class_weights(tmp_path):
    """The trial path under MirroredStrategy: the backbone loaded and rebuilt in the strategy's scope
    (synchronized batch norms, mixed_float16, the frozen layers kept), class weights as per-image
    weights, augmentation: it trains to a finite loss and saves the model with plain batch norms."""
    variant = write_variant(tmp_path / "v", unlabelled=8, train=12)
    code = f"import sys; sys.argv = ['x', {str(variant)!r}, {str(tmp_path / 'out')!r}]\n" + textwrap.dedent(TRIAL)
    out = json.loads(finish(run_child(code, {distribute.DEVICES_ENV: "/cpu:0,/cpu:1"})).splitlines()[-1])
    assert out["replicas"] == 2 and np.isfinite(out["loss"])
    assert not out["saved_synchronized"] and out["policy"] == "mixed_float16"  # saved as one device runs it
    assert out["frozen"] == ["enc1_conv1_raw", "enc1_bn1"]


# --- two workers: the same training as one process ---------------------------------------------

WORKER = """
import json, sys
from neumo import distribute, stages
import keras, numpy as np

variant, out = sys.argv[1], sys.argv[2]
strategy = distribute.strategy()
info = stages.pretrain(variant_dir=variant, out_dir=out, depth=2, filters=4, pretrain_epochs=2)
print(json.dumps({"strategy": type(strategy).__name__, "replicas": distribute.replicas(strategy),
                  "chief": distribute.is_chief(), "info": info}))
"""


@pytest.mark.slow  # over a minute on 2 cores
def test_two_workers_train_like_one_process_on_the_same_global_batch(tmp_path):
    """Two processes with TF_CONFIG (MultiWorkerMirroredStrategy, one replica each, the dataset split
    by DATA) run `stages.pretrain` to the same autoencoder, to 1e-5, as one process mirroring over two
    devices (the same global batch of 16, the same learning rate); only the chief writes, here to a
    file:// URI (a worker's out_dir stays empty)."""
    variant = write_variant(tmp_path / "v", unlabelled=40, train=8)
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = []
    for index in range(2):
        out = f"file://{tmp_path}/worker{index}"
        code = f"import sys; sys.argv = ['x', {str(variant)!r}, {out!r}]\n" + textwrap.dedent(WORKER)
        env = {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        workers.append(run_child(code, env))
    one = run_child(TWO_CPUS + f"import sys; sys.argv = ['x', {str(variant)!r}, {str(tmp_path / 'one')!r}]\n"
                    + textwrap.dedent(WORKER), {distribute.DEVICES_ENV: "/cpu:0,/cpu:1"})
    results = [json.loads(finish(p, 300).splitlines()[-1]) for p in [*workers, one]]
    # (tf.distribute.MultiWorkerMirroredStrategy is the class CollectiveAllReduceStrategy)
    assert [r["strategy"] for r in results] == ["CollectiveAllReduceStrategy"] * 2 + ["MirroredStrategy"]
    assert [r["replicas"] for r in results] == [2, 2, 2] and [r["chief"] for r in results] == [True, False, True]
    assert results[0]["info"]["images"] == results[2]["info"]["images"]
    assert not (tmp_path / "worker1").exists()  # a worker's outputs went to a temporary folder
    import keras

    def weights(folder):
        unet = keras.saving.load_model(str(folder / "autoencoder.keras"), compile=False, safe_mode=True)
        return unet.get_weights()

    assert (tmp_path / "worker0" / "pretrain.json").exists() and (tmp_path / "worker0" / "history.csv").exists()
    diff = max(float(np.abs(a - b).max()) for a, b in zip(weights(tmp_path / "worker0"), weights(tmp_path / "one")))
    logger.info("two workers vs one process: largest weight difference %.3g", diff)
    assert diff < 1e-5
    saved = [json.loads((tmp_path / d / "pretrain.json").read_text()) for d in ("worker0", "one")]
    # the logged losses are per-replica means averaged (Keras' reduction of logs), and a partial batch
    # splits unevenly: they agree to 1e-3 (measured 3e-4), the weights exactly
    for key in ("final_loss", "best_val_loss"):
        assert saved[0][key] == pytest.approx(saved[1][key], rel=1e-3), key


# --- streamed pretraining: memory stays flat ----------------------------------------------------

class CountingPick:
    """A shard reader's `select` that keeps every image and counts those read (tf.numpy_function runs it
    in this process)."""

    def __init__(self):
        self.read = 0

    def __call__(self, ids) -> np.ndarray:
        self.read += len(ids)
        return np.ones(len(ids), bool)


def test_the_stream_reads_a_bounded_number_of_images_ahead(tmp_path):
    """The reader pretraining streams with (data.stream_shards, uncached, shuffled) reads a bounded number
    of images ahead of the batches consumed: the shuffle buffer (100 images here), the shards read at
    once and the prefetched batches; measured 360-490 images whether the shards hold 2000 or 8000, so
    memory does not grow with the set. (ru_maxrss of a child streaming a 256 px variant at 1x, 4x, 8x,
    16x and 32x the images stays within 750-850 MB, TensorFlow included; loading the set, as
    pretraining did, adds 170 MB at 4x.)"""
    variant = write_variant(tmp_path / "v", unlabelled=8000, train=0, pixels=32, per_shard=20)
    counting = CountingPick()
    ds = nd.stream_shards(nd.shard_uris(str(variant), "unlabelled"), 32, 8000, 8, shuffle=True, cache_bytes=0,
                          shuffle_bytes=100 * 32 * 32, select=counting)
    consumed = lead = 0
    for x, _ in ds:
        consumed += len(x)
        lead = max(lead, counting.read - consumed)
    logger.info("images read ahead of the batches consumed: at most %d of 8000", lead)
    assert consumed == counting.read == 8000
    assert lead <= 600


def test_shard_ids_reads_the_ids_alone(tmp_path):
    variant = write_variant(tmp_path / "v", unlabelled=5, train=3, per_shard=4)
    for uri in nd.shard_uris(str(variant), "train"):
        for form in (uri, f"file://{uri}"):
            assert np.array_equal(nd.shard_ids(form), nd.read_shard(uri).ids)
