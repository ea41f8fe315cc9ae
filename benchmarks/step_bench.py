"""Training step images/s: U-Net autoencoder, classifiers 1 and 2, at 256 and 512 px, float32 vs
mixed precision, without and with XLA (jit_compile), batch 8 (the seed's), TensorFlow backend.

    python -m benchmarks.step_bench [--pixels 256 512] [--steps 2] [--models unet clf1 clf2]

Each figure is a few train_on_batch steps after a warm-up step (which includes tracing and, with
XLA, compiling): short on purpose, so read the ratios, not the third digit. On a CPU mixed
precision emulates float16 and is expected to be slower; see device_step.py for a GPU.
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks.common import report, setup

MODELS = ("unet", "clf1", "clf2")


def build(kind: str, pixels: int, depth: int = 4, filters: int = 16):
    """A compiled-ready model under the current global dtype policy: "unet" autoencoder or "clf1"/"clf2"."""
    import keras

    from neumo import models

    if kind == "unet":
        return models.build_unet(pixels, depth, filters, "linear", 1, name="autoencoder"), "mse"
    backbone = models.build_backbone(models.build_unet(pixels, depth, filters))
    return models.build_classifier(backbone, int(kind[-1])), keras.losses.BinaryCrossentropy()


def step_rate(kind: str, pixels: int, policy: str, xla: bool, steps: int, batch: int = 8) -> tuple[float, float]:
    """(images/s over `steps` steps, seconds of the warm-up step) for one configuration."""
    import keras
    import numpy as np

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model, loss = build(kind, pixels)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, jit_compile=xla)
    x = np.random.default_rng(0).standard_normal((batch, pixels, pixels, 1)).astype("float32")
    y = x if kind == "unet" else np.ones((batch, 1), "float32")
    start = time.perf_counter()
    model.train_on_batch(x, y)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    rate = steps * batch / (time.perf_counter() - start)
    keras.mixed_precision.set_global_policy("float32")
    return rate, warm


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--policies", nargs="+", default=["float32", "mixed_float16"])
    parser.add_argument("--xla", nargs="+", type=int, default=[0, 1], help="0 = no XLA, 1 = jit_compile")
    args = parser.parse_args(argv)
    setup("training step (TensorFlow backend)")
    for pixels in args.pixels:
        for kind in args.models:
            base = None
            for policy in args.policies:
                for xla in args.xla:
                    rate, warm = step_rate(kind, pixels, policy, bool(xla), args.steps)
                    base = base or rate
                    print(f"{kind:5s} {pixels}px {policy:13s} xla={xla}: {rate:7.2f} images/s "
                          f"({rate / base:.2f}x float32 no-XLA; warm-up step {warm:.1f} s)", flush=True)
                    report(bench="step", model=kind, pixels=pixels, policy=policy, xla=bool(xla),
                           images_s=round(rate, 2), ratio_to_float32=round(rate / base, 3),
                           warmup_s=round(warm, 1), steps=args.steps, load_average=round(os.getloadavg()[0], 1))


if __name__ == "__main__":
    main()
