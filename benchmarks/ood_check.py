"""Measure the out-of-distribution check (neumo.ood) on real images of ../shared/data.

Trains a small classifier on kermany_224 with the project's own stages (the helpers of
benchmarks/science.py: ingest, a 64 px variant, a short autoencoder pretraining, one trial),
then, for each feature choice of the check (the deepest tap only, all three taps):

  - false alarms on the valid fold, cross-fitted: the valid patients are cut in two halves by a
    hash of their id; the reference fitted on one half flags the other half's images, and the
    rate is pooled over both directions (no image judged by a reference fitted on it);
  - with the reference fitted on the whole valid fold (as the bundle has it): the flagged share
    of the official val split (16 images, other patients), of the train fold, of the 992 adult
    NIH ChestX-ray14 images in nih_cxr14_extra, of real non-chest photographs (scikit-image's
    bundled sample images) and of synthetic non-chest images (noise, flat frames, gradients,
    shapes, 1/f "clouds");
  - the classifier's pneumonia-call rate on the adult NIH images, all and those not flagged;
  - the AUROC of the score between held-out valid images and the NIH images (threshold-free;
    each valid half scored by the reference fitted on the other, averaged over the halves).

    python -m benchmarks.ood_check [--pixels 64] [--pretrain-epochs 2] [--epochs 3] [--work work/ood_check]

Prints a Markdown table; writes results.json in the work folder. About 20 min on 2 shared cores
(pretraining and training about 15 of them; a classifier already in the work folder is reused).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from benchmarks import science
from neumo import data as nd
from neumo import evaluation, imaging, ingest, ood, training
from neumo.trial import TrialConfig

logger = logging.getLogger("benchmarks.ood_check")
METHODS = {"deepest tap": (2,), "all three taps": (0, 1, 2)}


def _halves(ids) -> np.ndarray:
    """0/1 per image: its patient's half of the valid fold, by a hash of the patient id."""
    return np.array([int(hashlib.sha256(ingest.patient_id(str(i)).encode()).hexdigest(), 16) % 2 for i in ids])


def nih_images(pixels: int, clip) -> np.ndarray:
    paths = sorted((science.SHARED / "nih_cxr14_extra").glob("*.png"))
    return np.stack([imaging.prepare_uint8(imaging.read_grey(p.read_bytes()), pixels, clip) for p in paths])


def photographs(pixels: int, clip) -> tuple[np.ndarray, list[str]]:
    """scikit-image's bundled sample pictures (real photographs and micrographs, no download),
    each also mirrored, through the same preprocessing as an X-ray."""
    from skimage import data as samples

    names = ["camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "grass",
             "gravel", "brick", "clock", "hubble_deep_field", "immunohistochemistry", "retina", "cat", "colorwheel"]
    out, kept = [], []
    for name in names:
        image = np.asarray(getattr(samples, name)())
        if image.ndim == 3:
            image = image[..., :3][..., ::-1]  # RGB -> the BGR that to_grey expects
        image = np.ascontiguousarray(image.astype(np.uint8))
        for variant in (image, np.ascontiguousarray(image[:, ::-1])):
            out.append(imaging.prepare_uint8(variant, pixels, clip))
            kept.append(name)
    return np.stack(out), kept


def synthetic(pixels: int, clip, per_kind: int = 6, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Non-chest images made here, through the same preprocessing: kinds x per_kind draws."""
    rng = np.random.default_rng(seed)
    size = 256
    yy, xx = np.mgrid[0:size, 0:size] / size

    def clouds():
        spectrum = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2
        amp = 1.0 / np.maximum(spectrum, 1.0 / size**2) ** (rng.uniform(0.8, 1.4) / 2)
        field = np.real(np.fft.ifft2(amp * np.exp(2j * np.pi * rng.random((size, size)))))
        return (field - field.min()) / (np.ptp(field) + 1e-9) * 255

    def shapes():
        img = np.full((size, size), rng.uniform(0, 255))
        for _ in range(rng.integers(3, 8)):
            cy, cx, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.3)]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0, 255)
        return img

    kinds = {
        "uniform noise": lambda: rng.uniform(0, 255, (size, size)),
        "gaussian noise": lambda: np.clip(rng.normal(128, 40, (size, size)), 0, 255),
        "flat": lambda: np.full((size, size), rng.uniform(0, 255)),
        "gradient": lambda: 255 * (np.cos(rng.uniform(0, 6.3)) * xx + np.sin(rng.uniform(0, 6.3)) * yy + 1.5) / 3,
        "checkerboard": lambda: 255.0 * ((np.floor(xx * rng.integers(2, 16)) + np.floor(yy * rng.integers(2, 16))) % 2),
        "shapes": shapes,
        "1/f clouds": clouds,
    }
    out, names = [], []
    for name, make in kinds.items():
        for _ in range(per_kind):
            out.append(imaging.prepare_uint8(np.clip(make(), 0, 255).astype(np.uint8), pixels, clip))
            names.append(name)
    return np.stack(out), names


def _share(flagged: np.ndarray) -> dict:
    return {"n": int(flagged.size), "flagged": int(flagged.sum()), "share": float(flagged.mean()) if flagged.size else float("nan")}


def measure(model, threshold: float, folds: dict, sets: dict, kinds: dict[str, list[str]]) -> dict:
    valid = folds["valid"]
    halves = _halves(valid.ids)
    patients = np.array([ingest.patient_id(str(i)) for i in valid.ids])
    out = {}
    for method, taps in METHODS.items():
        start = time.monotonic()
        crossfit, aurocs = np.zeros(len(valid), bool), []
        for h in (0, 1):
            ref = ood.fit(model, valid.images[halves != h], taps=taps, groups=patients[halves != h],
                          fitted_on=f"valid half {1 - h}")
            held = ood.score(model, valid.images[halves == h], ref)
            crossfit[halves == h] = ood.flags(held, ref)
            adults = ood.score(model, sets["nih adults"], ref)
            aurocs.append(evaluation.auc(np.r_[np.zeros(len(held)), np.ones(len(adults))], np.r_[held, adults]))
        ref = ood.fit(model, valid.images, taps=taps, groups=patients, fitted_on="valid fold")
        res = {"features": ref["features"], "reference_json_kb": round(len(json.dumps(ref)) / 1024),
               "valid_crossfit": _share(crossfit), "auroc_valid_vs_nih": float(np.mean(aurocs)),
               "valid_fitted": _share(ood.flags(ood.score(model, valid.images, ref), ref))}
        for name, images in sets.items():
            flagged = ood.flags(ood.score(model, images, ref), ref)
            res[name] = _share(flagged)
            if name in kinds:
                res[name]["by_kind"] = {k: _share(flagged[np.array(kinds[name]) == k]) for k in dict.fromkeys(kinds[name])}
            if name == "nih adults":
                calls = training.predict(model, nd.Fold(images, np.zeros(len(images), np.int8), np.zeros(len(images), str)))
                called = calls >= threshold
                res[name]["pneumonia_calls"] = float(called.mean())
                res[name]["pneumonia_calls_unflagged"] = float(called[~flagged].mean()) if (~flagged).any() else float("nan")
        res["seconds"] = round(time.monotonic() - start, 1)
        out[method] = res
    return out


def report(res: dict) -> str:
    sets = ["valid_crossfit", "val", "train sample", "nih adults", "photographs", "synthetic"]
    head = ["feature choice (features)", "valid fold, cross-fitted", "official val", "train fold (500)",
            "NIH adults", "photographs", "synthetic", "NIH called pneumonia: all / not flagged",
            "score AUROC, held-out valid vs NIH"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in res["methods"].items():
        cells = [f"{100 * r[s]['share']:.1f}% ({r[s]['flagged']}/{r[s]['n']})" for s in sets]
        nih = r["nih adults"]
        lines.append(f"| {method} ({r['features']}) | " + " | ".join(cells) +
                     f" | {100 * nih['pneumonia_calls']:.1f}% / {100 * nih['pneumonia_calls_unflagged']:.1f}% | "
                     f"{r['auroc_valid_vs_nih']:.3f} |")
    lines += ["", "| synthetic kind | " + " | ".join(res["methods"]) + " |", "|---|" + "---|" * len(res["methods"])]
    kinds = next(iter(res["methods"].values()))["synthetic"]["by_kind"]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(
            f"{r['synthetic']['by_kind'][kind]['flagged']}/{r['synthetic']['by_kind'][kind]['n']}" for r in res["methods"].values()) + " |")
    return "\n".join(lines)


def _classifier(cfg: TrialConfig, epochs: int, variant: str, backbone: str, out: Path):
    """The trained classifier and {epochs, threshold, train_seconds}: trained once, reused when
    out/ already holds one of this configuration (the OOD check itself does not change it)."""
    import keras

    meta_path = out / "model.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("config") == cfg.to_dict():
        meta = json.loads(meta_path.read_text())
        logger.info("reusing the classifier in %s", out)
        model = keras.saving.load_model(str(out / "model.keras"), compile=False, safe_mode=True)
        return model, {"epochs": meta.get("epochs"), "threshold": meta["threshold"], "train_seconds": None}
    result, model, seconds = science._train(cfg, training.TrainSettings(epochs=epochs, patience=epochs, seed=0),
                                            variant, backbone, out)
    return model, {"epochs": result.epochs, "threshold": result.threshold, "train_seconds": round(seconds, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pixels", type=int, default=64)
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--work", default=str(science.ROOT / "work" / "ood_check"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not (science.SHARED / "kermany_224" / "train").is_dir() or not (science.SHARED / "nih_cxr14_extra").is_dir():
        raise SystemExit(f"the OOD measurement needs kermany_224 and nih_cxr14_extra at {science.SHARED}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    science._manifest(work)
    variant = science._variant(work, args.pixels)
    backbone, _ = science._pretrained(work, variant, args.pretrain_epochs)
    cfg = TrialConfig(args.pixels, False, 1, 0, 1e-3, "bce", "light", True)
    model, trained = _classifier(cfg, args.epochs, variant, backbone, work / "classifier")
    clip = nd.read_variant(variant).get("clahe_clip")
    folds = {f: nd.load_fold(variant, f) for f in ("train", "valid", "val")}
    train = folds["train"]
    pick = np.random.default_rng(0).choice(len(train), min(500, len(train)), replace=False)
    photos, photo_names = photographs(args.pixels, clip)
    synth, synth_names = synthetic(args.pixels, clip)
    sets = {"val": folds["val"].images, "train sample": train.images[pick], "nih adults": nih_images(args.pixels, clip),
            "photographs": photos, "synthetic": synth}
    res = {"config": cfg.to_dict(), **trained, "valid_images": len(folds["valid"]),
           "methods": measure(model, trained["threshold"], folds, sets, {"synthetic": synth_names, "photographs": photo_names})}
    res["total_seconds"] = round(time.monotonic() - start, 1)
    (work / "results.json").write_text(json.dumps(res, indent=2))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
