"""Training input: images/s that data.stream_dataset / make_dataset deliver, against what a training
step consumes (classifier 1 on a U-Net backbone, filters 16, depth 4, batch 8).

    python -m benchmarks.input_bench [--pixels 256 512] [--images 512]

Targets: input >= 3x the training step's images/s, and >= 2000 images/s per host with a no-op consumer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from benchmarks.common import WORKDIR, report, setup
from benchmarks.fixtures import write_variant


def drain(ds) -> int:
    """Iterate one epoch, touching nothing (a no-op consumer); returns the images seen."""
    n = 0
    for batch in ds:
        n += int(batch[0].shape[0])
    return n


def epoch_rate(ds, epochs: int = 2) -> tuple[float, float]:
    """(first-epoch, best later-epoch) images/s of a dataset."""
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        n = drain(ds)
        rates.append(n / (time.perf_counter() - start))
    return rates[0], max(rates[1:] or rates)


def step_rate(pixels: int, batch: int = 8, steps: int = 3) -> float:
    """Images/s of classifier 1's training step (train_on_batch), after one warm-up step."""
    import keras
    import numpy as np

    from neumo import models

    keras.utils.set_random_seed(0)
    clf = models.build_classifier(models.build_backbone(models.build_unet(pixels, 4, 16)), 1)
    clf.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    x = np.random.default_rng(0).standard_normal((batch, pixels, pixels, 1)).astype("float32")
    y = np.ones((batch, 1), "float32")
    clf.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        clf.train_on_batch(x, y)
    rate = steps * batch / (time.perf_counter() - start)
    keras.backend.clear_session()
    return rate


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--images", type=int, default=512, help="images in the benchmark fold")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    setup("training input")
    from neumo import data as nd

    os.makedirs(WORKDIR, exist_ok=True)
    root = tempfile.mkdtemp(prefix="input-", dir=WORKDIR)
    try:
        for pixels in args.pixels:
            variant = write_variant(os.path.join(root, str(pixels)), args.images, pixels)
            step = step_rate(pixels, steps=args.steps)
            print(f"{pixels}px, {args.images} images, batch 8; training step (classifier 1, U-Net f16 d4): "
                  f"{step:7.1f} images/s")
            rows = [("in memory (load_fold + make_dataset)", "none",
                     lambda variant=variant: nd.make_dataset(nd.load_fold(variant, "train"), 8, "none", True, 0))]
            for aug in ("none", "light"):
                rows.append(("streamed, cached", aug,
                             lambda aug=aug, variant=variant: nd.stream_dataset(variant, "train", 8, aug, True, 0)))
                rows.append(("streamed, no cache", aug,
                             lambda aug=aug, variant=variant: nd.stream_dataset(variant, "train", 8, aug, True, 0,
                                                                                cache_bytes=0)))
            for label, aug, make in rows:
                first, later = epoch_rate(make())
                ratio = later / step
                print(f"  {label:40s} aug={aug:5s}: epoch 1 {first:7.1f}, epoch 2 {later:7.1f} images/s "
                      f"= {ratio:6.1f}x the step (target >= 3), {later / 2000:.2f}x 2000/s")
                report(bench="input", pixels=pixels, path=label, augmentation=aug, step_images_s=round(step, 1),
                       epoch1_images_s=round(first, 1), images_s=round(later, 1), ratio_to_step=round(ratio, 2),
                       ratio_to_2000=round(later / 2000, 3), load_average=round(os.getloadavg()[0], 1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
