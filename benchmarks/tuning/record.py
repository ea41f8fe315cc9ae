"""Record a table of real trial results for the tuning benchmark.

Trains every configuration of a small grid of the search space (64 px, no mask) on a seeded
fifth of the patients of ../shared/data/kermany_224/train with a patient-level split, and writes one row per
configuration (its validation AUC) to benchmarks/tuning/trials.csv. The replay benchmark then
compares search strategies on this table without training anything.

    python -m benchmarks.tuning.record [--fraction 0.2] [--epochs 3] [--out benchmarks/tuning/trials.csv]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from neumo import ingest, stages, storage, training
from neumo.trial import TrialConfig

ROOT = Path(__file__).resolve().parents[2]
LEARNING_RATES = (1e-4, 1e-3, 1e-2)
GRID = {
    "pixels": (64,), "mask": (False,), "model": (1, 2), "frozen_layers": (0, 8), "learning_rate": LEARNING_RATES,
    "loss": ("bce", "weighted_bce", "focal"), "augmentation": ("none", "light"), "class_weight": (False,),
}
COLUMNS = list(GRID) + ["score", "epochs", "seconds"]

logger = logging.getLogger("benchmarks.tuning.record")


def grid() -> list[dict]:
    return [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]


def prepare(work: Path, fraction: float, seed: int) -> tuple[str, str]:
    """Ingest the real train split, keep a seeded fraction of its patients (so the classes keep
    their natural 26/74 imbalance and class weighting matters), preprocess at 64 px and pretrain
    a small backbone."""
    data = ROOT.parent / "shared" / "data" / "kermany_224"
    if not (data / "train").is_dir():
        raise SystemExit(f"this benchmark needs the real images at {data}")
    stages.ingest(dataset_uri=str(data), seed=seed, out_dir=str(work / "manifest"))
    rows = stages.load_manifest(str(work / "manifest"))
    patients = sorted({r["patient_id"] for r in rows})
    rng = np.random.default_rng(seed)
    keep = {patients[i] for i in rng.choice(len(patients), int(fraction * len(patients)), replace=False)}
    rows = [r for r in rows if r["patient_id"] in keep or r["fold"] not in ("train", "valid")]
    storage.write_text(str(work / "manifest" / stages.MANIFEST), ingest.to_csv(rows, ingest.MANIFEST_COLUMNS))
    logger.info("kept %d images of %d patients", len(rows), len(keep))
    stages.preprocess(manifest_dir=str(work / "manifest"), variant={"pixels": 64, "mask": False},
                      out_dir=str(work / "p64"), acquisition_copies=0)  # as recorded: before acquisition copies
    stages.pretrain(variant_dir=str(work / "p64"), out_dir=str(work / "backbone"), depth=3, filters=8,
                    pretrain_epochs=4, seed=seed)
    return str(work / "p64"), str(work / "backbone" / "autoencoder.keras")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fraction", type=float, default=0.2, help="of the train split's patients")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "tuning" / "trials.csv"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("neumo.fitting").setLevel(logging.WARNING)  # no line per epoch
    done = set()
    if os.path.exists(args.out):  # resumable: configurations already in the table are skipped
        with open(args.out) as fh:
            done = {tuple(r[k] for k in GRID) for r in csv.DictReader(fh)}
    with tempfile.TemporaryDirectory() as tmp:
        variant, backbone = prepare(Path(tmp), args.fraction, args.seed)
        configs = [c for c in grid() if tuple(str(c[k]) for k in GRID) not in done]
        new_file = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as fh:
            writer = csv.DictWriter(fh, COLUMNS, lineterminator="\n")
            if new_file:
                writer.writeheader()
            for i, config in enumerate(configs, 1):
                start = time.monotonic()
                settings = training.TrainSettings(epochs=args.epochs, patience=args.epochs, seed=args.seed)
                try:
                    result = training.train_trial(TrialConfig.from_dict(config), settings, variant, backbone,
                                                  os.path.join(tmp, "trial"))
                    score, epochs = result.val_auc, result.epochs
                except FloatingPointError:
                    score, epochs = "", 0  # a diverged trial: the table records the failure
                writer.writerow({**config, "score": score, "epochs": epochs,
                                 "seconds": round(time.monotonic() - start, 1)})
                fh.flush()
                logger.info("%d/%d %s -> %s", i, len(configs), config, score)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
