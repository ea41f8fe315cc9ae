"""Training step images/s on a lent GPU with Keras 3 on the JAX backend (no TensorFlow needed).

    KERAS_BACKEND=jax python benchmarks/device_step.py [--pixels 576 512 256] [--steps 10]
        [--models unet clf1 clf2] [--policies float32 mixed_float16] [--json results.json]

Self-contained: imports keras, numpy and neumo.models (pure Keras) from shared/ beside this file.
Prints images/s per (model, pixels, precision) and, for the U-Net, the ratio to NVIDIA's TF2 U-Net
reference (../shared/docs/ANCHORS.md: 572x572, one A100, batch 8: 46 images/s TF32, 119 mixed). Our U-Net needs
a multiple of 16 px, so 576 stands in for 572 (1.3% more pixels); the reference is an A100, so a
ratio on an H100/H200 above 1 is expected from the hardware alone. Steps run under jax.jit
(Keras' default on JAX); each figure follows warm-up steps that compile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shared"))

import keras  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from neumo import models  # noqa: E402  (pure Keras: no TensorFlow import)

#: NVIDIA DeepLearningExamples TF2 U-Net, 572x572, batch 8, one A100 (../shared/docs/ANCHORS.md).
REFERENCE = {"float32": 46.0, "mixed_float16": 119.0}


def build(kind: str, pixels: int, depth: int = 4, filters: int = 16):
    if kind == "unet":
        return models.build_unet(pixels, depth, filters, "linear", 1, name="autoencoder"), "mse"
    backbone = models.build_backbone(models.build_unet(pixels, depth, filters))
    return models.build_classifier(backbone, int(kind[-1])), "binary_crossentropy"


def step_rate(kind: str, pixels: int, policy: str, steps: int, warmup: int, batch: int) -> float:
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model, loss = build(kind, pixels)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    x = np.random.default_rng(0).standard_normal((batch, pixels, pixels, 1)).astype("float32")
    y = x if kind == "unet" else np.ones((batch, 1), "float32")
    for _ in range(warmup):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        logs = model.train_on_batch(x, y)  # returns a host value: the step has finished
    rate = steps * batch / (time.perf_counter() - start)
    keras.mixed_precision.set_global_policy("float32")
    _ = logs
    return rate


def device() -> str:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return f"jax {jax.__version__} on {d.platform}: {getattr(d, 'device_kind', d)}"
    return backend


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, nargs="+", default=[576, 512, 256])
    parser.add_argument("--models", nargs="+", default=["unet", "clf1", "clf2"])
    parser.add_argument("--policies", nargs="+", default=["float32", "mixed_float16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args(argv)
    print(f"== training step, Keras {keras.__version__} {device()}, batch {args.batch}", flush=True)
    results = []
    for pixels in args.pixels:
        for kind in args.models:
            base = None
            for policy in args.policies:
                rate = step_rate(kind, pixels, policy, args.steps, args.warmup, args.batch)
                base = base or rate
                line = f"{kind:5s} {pixels}px {policy:13s}: {rate:9.1f} images/s ({rate / base:.2f}x float32)"
                row = {"model": kind, "pixels": pixels, "policy": policy, "images_s": round(rate, 2),
                       "ratio_to_float32": round(rate / base, 3)}
                if kind == "unet" and policy in REFERENCE:
                    ref = REFERENCE[policy]
                    line += f"; NVIDIA TF2 U-Net reference (A100, 572 px) {ref:.0f} images/s -> {rate / ref:.2f}x"
                    row["ratio_to_nvidia_reference"] = round(rate / ref, 3)
                print(line, flush=True)
                results.append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device(), "batch": args.batch, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
