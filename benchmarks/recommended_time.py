"""How long configs/recommended.json takes here: each part's rate measured on the real images
(pretraining steps, classifier training steps, prediction), then the whole run projected from the
file's own settings (pretraining and training epochs, ensemble members, the per-epoch shift-score
pass). The parts' rates are measured, the total is projected: say which when quoting it.

    python -m benchmarks.recommended_time --variant work/recommended-time/p128 --seconds 60
    python -m benchmarks.recommended_time --pixels 64 --variant work/levers64/p64-varied1   # vs benchmarks.levers' times

`--variant`: a prepared variant at the file's pixels (made here from ../shared/data when absent).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from neumo import data as nd
from neumo import models, parameters, stages, training
from neumo.trial import TrialConfig
from pipelines import runner

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
logger = logging.getLogger("benchmarks.recommended_time")


def _steps_per_s(fit_one, seconds: float) -> float:
    """Steps per second of `fit_one()` (one step), after two warm-up steps, over about `seconds`."""
    for _ in range(2):
        fit_one()
    start, steps = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        fit_one()
        steps += 1
    return steps / (time.monotonic() - start)


def measure(variant: str, trial: TrialConfig, values: dict, seconds: float) -> dict:
    import keras

    info = nd.read_variant(variant)
    counts, batch = info["counts"], int(values["batch_size"])
    rng = np.random.default_rng(0)
    p = trial.pixels
    x = rng.normal(size=(batch, p, p, 1)).astype(np.float32)
    y = rng.integers(0, 2, (batch, 1)).astype(np.float32)
    unet = models.build_unet(p, values["depth"], values["filters"], "linear", 1, name="autoencoder")
    unet.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    pretrain_rate = _steps_per_s(lambda: unet.train_on_batch(x, x), seconds)
    backbone = models.build_backbone(unet)
    clf = models.build_classifier(backbone, trial.model)
    clf.compile(optimizer=keras.optimizers.Adam(trial.learning_rate), loss="binary_crossentropy")
    train_rate = _steps_per_s(lambda: clf.train_on_batch(x, y), seconds)
    fold = nd.load_fold(variant, "valid")
    start = time.monotonic()
    training.predict(clf, fold)
    predict_rate = len(fold) / (time.monotonic() - start)
    return {"pretrain_steps_per_s": pretrain_rate, "train_steps_per_s": train_rate, "predict_images_per_s": predict_rate,
            "counts": counts, "shifted_images": info.get("shifted_images", 0), "batch": batch,
            "acquisition_copies": info["acquisition_copies"], "preprocess_seconds": info["seconds"]}


def project(m: dict, values: dict) -> dict:
    """Minutes of each part of the run and the total, from the measured rates and the file's settings."""
    train_images = m["counts"]["train"] * (1 + m["acquisition_copies"])
    pretrain_images = m["counts"]["unlabelled"] + m["counts"]["train"]
    epoch_pre = pretrain_images * (1 - 1 / training.PRETRAIN_HELD_OUT) / m["batch"] / m["pretrain_steps_per_s"]
    epoch_fit = train_images / m["batch"] / m["train_steps_per_s"]
    shifts_per_epoch = m["shifted_images"] // max(1, m["counts"]["valid"]) * min(m["counts"]["valid"],
                                                                                training.SHIFTED_PER_EPOCH)
    per_epoch_checks = (m["counts"]["valid"] * 2 + shifts_per_epoch) / m["predict_images_per_s"]
    evaluate = (m["counts"]["valid"] + m["counts"]["val"] + m["counts"].get("test", 0) + m["shifted_images"]) \
        / m["predict_images_per_s"] * (1 + int(values["tta_copies"]))
    members = max(1, int(values["ensemble_size"]))
    parts = {"preprocess": m["preprocess_seconds"], "pretrain": values["pretrain_epochs"] * epoch_pre,
             "train (all members)": members * values["epochs"] * (epoch_fit + per_epoch_checks),
             "of which the shift-score passes": members * values["epochs"] * per_epoch_checks,
             "evaluate (all members)": members * evaluate}
    total = sum(v for k, v in parts.items() if not k.startswith("of which"))
    return {**{k: round(v / 60, 1) for k, v in parts.items()}, "total": round(total / 60, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "recommended.json"))
    p.add_argument("--variant", default=str(ROOT / "work" / "recommended-time" / "variant"))
    p.add_argument("--seconds", type=float, default=60.0, help="seconds each rate is measured over")
    p.add_argument("--pixels", type=int, help="another pixel size than the file's (to check the projection against a "
                   "run whose time is known)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    trial_dict, params = runner.read_config(args.config)
    trial = TrialConfig.from_dict({**trial_dict, **({"pixels": args.pixels} if args.pixels else {})})
    values = parameters.apply(parameters.defaults(), params)
    variant = Path(args.variant)
    if not (variant / "variant.json").exists():
        manifest = variant.parent / "manifest"
        if not (manifest / stages.MANIFEST).exists():
            stages.ingest(dataset_uri=str(SHARED / "kermany_224"), pretrain_uri=str(SHARED / "nih_cxr14_extra"),
                          seed=0, out_dir=str(manifest))
        stages.preprocess(manifest_dir=str(manifest), variant={"pixels": trial.pixels, "mask": trial.mask},
                          out_dir=str(variant), acquisition_copies=values["acquisition_copies"],
                          acquisition=values["acquisition"])
    m = measure(str(variant), trial, values, args.seconds)
    out = {"measured": m, "projected_minutes": project(m, values)}
    print(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
