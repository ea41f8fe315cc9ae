"""Measure the science on the real images of ../shared/data, with the project's own stages.

  (a) the lung-mask U-Net (256 px), trained on kermany_224 image + mask pairs of patients NOT in
      kermany_full_res, scored (Dice, IoU) on the 200 full-size images at their original size
      after the seed's post-processing;
  (b) the pretraining task under the same classifier (head 2, backbone fully frozen, same budget)
      over several seeds: the seed's identity autoencoder on the unlabelled NIH images only (every
      skip), our restoration task on NIH + the train fold's images (top skip dropped), and a
      randomly initialised encoder; on the patient-level valid fold of kermany_224/train;
  (c) the classifier trained in full (head 1, backbone fine-tuned, strong augmentation, class
      weights, the pipeline's one acquisition copy of each train image) on the valid fold at the
      validation-chosen threshold, then under acquisition shifts applied to the raw images
      (gamma, contrast, blur, noise, zoom, a text marker); the
      threshold stored with the model is chosen on the same valid fold, so a cross-fitted column
      also judges each half of the valid patients at the threshold chosen on the other half.

    python -m benchmarks.science [--only a,b,c] [--pixels 128] [--work work/science] [--seeds 0,1,2]

Prints a Markdown table of every figure with its interval and how long each training took, and
writes results.json in the work folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np

from neumo import data as nd
from neumo import evaluation, imaging, ingest, masking, models, shifts, stages, storage, training
from neumo.trial import TrialConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
logger = logging.getLogger("benchmarks.science")


#: The unlabelled set: the 992 NIH images of nih_cxr14_extra (the seed pretrains on NIH).
UNLABELLED = "nih_cxr14_extra"


def _manifest(work: Path) -> list[dict]:
    out = work / "manifest"
    if not (out / stages.MANIFEST).exists():
        stages.ingest(dataset_uri=str(SHARED / "kermany_224"), masks_uri=str(SHARED / "kermany_224_lung_masks"),
                      pretrain_uri=str(SHARED / UNLABELLED), seed=0, out_dir=str(out))
    return stages.load_manifest(str(out))


def lung_masks(work: Path, rows: list[dict], epochs: int, max_images: int) -> dict:
    full = sorted((SHARED / "kermany_full_res" / "images" / "train").glob("*/*"))
    held_patients = {ingest.patient_id(p.name) for p in full}
    pairs = [r for r in rows if r["mask_uri"] and r["patient_id"] not in held_patients and r["fold"] in ("train", "valid")]
    config = masking.MaskModelConfig(pixels=256, depth=4, filters=8, epochs=epochs, max_images=max_images, seed=0)
    start = time.monotonic()
    model, trained = masking.train(pairs, config, str(work / "mask_model"))
    seconds = time.monotonic() - start
    scores = []
    for path in full:
        image = imaging.decode(path.read_bytes())
        truth = imaging.read_grey((SHARED / "kermany_full_res" / "lung_masks" / "train" / path.parent.name /
                                   f"{path.stem}.png").read_bytes()) > 127
        scores.append(masking.dice_iou(truth, masking.predict_masks(model, [image], config.pixels)[0]))
    dice, iou = np.array([s[0] for s in scores]), np.array([s[1] for s in scores])
    rng = np.random.default_rng(0)
    boot = [dice[rng.integers(0, len(dice), len(dice))].mean() for _ in range(1000)]
    return {"dice": float(dice.mean()), "dice_ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "iou": float(iou.mean()), "dice_median": float(np.median(dice)), "dice_min": float(dice.min()),
            "held_out_images": len(full), "excluded_patients": len(held_patients), "trained_on": trained["trained_on"],
            "epochs": trained["epochs"], "train_seconds": round(seconds, 1)}


def _variant(work: Path, pixels: int, copies: int = 0) -> str:
    out = work / (f"p{pixels}" + (f"-acq{copies}" if copies else ""))
    if not (out / "variant.json").exists():
        stages.preprocess(manifest_dir=str(work / "manifest"), variant={"pixels": pixels, "mask": False},
                          out_dir=str(out), acquisition_copies=copies)
    return str(out)


def _pretrained(work: Path, variant: str, epochs: int) -> tuple[str, dict]:
    out = work / "backbone"
    if not (out / "autoencoder.keras").exists():
        info = stages.pretrain(variant_dir=variant, out_dir=str(out), depth=4, filters=16, pretrain_epochs=epochs, seed=0)
    else:
        info = json.loads((out / "pretrain.json").read_text())
    return str(out / "autoencoder.keras"), info


def _train(cfg: TrialConfig, settings: training.TrainSettings, variant: str, backbone: str, out: Path):
    start = time.monotonic()
    result = training.train_trial(cfg, settings, variant, backbone, str(out))
    model = keras.saving.load_model(str(out / "model.keras"), compile=False, safe_mode=True)
    return result, model, time.monotonic() - start


def _summary(targets, probs, threshold) -> dict:
    m = evaluation.metrics(targets, probs, threshold)
    ci = evaluation.bootstrap(targets, probs, threshold, n=1000)
    return {**{k: m[k] for k in ("n", "auc", "accuracy", "sensitivity", "specificity", "threshold")},
            **{f"{k}_ci": list(ci[k]) for k in ("auc", "sensitivity", "specificity")}}


#: The arms of (b): name -> (pretrain_task, pretrain_data).
ARMS = {"identity (seed)": ("identity", "unlabelled"), "restore (ours)": ("restore", "unlabelled+train"),
        "random init": ("none", "unlabelled")}


def pretraining(work: Path, pixels: int, pretrain_epochs: int, epochs: int, seeds: list[int]) -> dict:
    """(b): each arm's backbone pretrained with each seed, then the same frozen classifier (head 2,
    the whole backbone frozen, `epochs` epochs, the same seed) on it; valid-fold metrics per seed."""
    variant = _variant(work, pixels)
    frozen = len([layer for layer in models.build_backbone(models.build_unet(pixels, 4, 16)).layers if layer.weights])
    cfg = TrialConfig(pixels, False, 2, frozen, 1e-3, "bce", "none", False)
    valid = nd.load_fold(variant, "valid")
    out = {"config": asdict(cfg), "epochs": epochs, "pretrain_epochs": pretrain_epochs, "arms": {}}
    probs: dict[str, list[np.ndarray]] = {}
    for name, (task, data) in ARMS.items():
        runs = []
        for seed in seeds:
            where = work / f"arm-{task}-{seed}"
            info = stages.pretrain(variant_dir=variant, out_dir=str(where / "backbone"), depth=4, filters=16,
                                   pretrain_epochs=pretrain_epochs, seed=seed, pretrain_task=task, pretrain_data=data)
            settings = training.TrainSettings(epochs=epochs, patience=epochs, seed=seed)
            result, model, seconds = _train(cfg, settings, variant, str(where / "backbone" / "autoencoder.keras"),
                                            where / "classifier")
            p = training.predict(model, valid)
            probs.setdefault(name, []).append(p)
            half = evaluation.metrics(valid.targets, p, evaluation.KERAS_THRESHOLD)  # the seed's threshold_policy
            runs.append({"seed": seed, **_summary(valid.targets, p, result.threshold),
                         **{f"{k}_at_0.5": half[k] for k in ("accuracy", "sensitivity", "specificity")},
                         "pretrain_images": info["images"], "pretrain_seconds": info["seconds"],
                         "train_seconds": round(seconds, 1)})
            logger.info("(b) %s seed %d: AUC %.4f", name, seed, runs[-1]["auc"])
        out["arms"][name] = runs
    mean = {name: np.mean(p, axis=0) for name, p in probs.items()}  # the seeds' average probability
    out["paired_auc"] = {f"{a} - {b}": evaluation.paired_bootstrap_auc(valid.targets, mean[a], mean[b], n=1000)
                         for a, b in (("restore (ours)", "identity (seed)"), ("identity (seed)", "random init"),
                                      ("restore (ours)", "random init"))}
    return out


def _halves(valid_rows: list[dict]) -> np.ndarray:
    """0/1 per row: the valid fold's patients cut in two halves by a hash of their id."""
    return np.array([int(hashlib.sha256(r["patient_id"].encode()).hexdigest(), 16) % 2 for r in valid_rows])


def _crossfit(targets, probs_clean, probs, halves) -> dict:
    """Sensitivity and specificity when each patient half is judged at the threshold Youden's J
    picks on the OTHER half's as-acquired images: no image's decision uses its own label."""
    pred = np.zeros(len(targets), bool)
    for h in (0, 1):
        thr = evaluation.youden_threshold(targets[halves != h], probs_clean[halves != h])
        pred[halves == h] = probs[halves == h] >= thr
    pos, neg = targets == 1, targets == 0
    return {"sensitivity": float(pred[pos].mean()), "specificity": float(1 - pred[neg].mean())}


def best_classifier(work: Path, rows: list[dict], pixels: int, pretrain_epochs: int, epochs: int, copies: int,
                    seed: int = 0) -> dict:
    backbone, _ = _pretrained(work, _variant(work, pixels), pretrain_epochs)
    variant = _variant(work, pixels, copies)
    cfg = TrialConfig(pixels, False, 1, 0, 1e-3, "bce", "strong", True)
    result, model, seconds = _train(cfg, training.TrainSettings(epochs=epochs, patience=3, seed=seed), variant, backbone,
                                    work / "best")
    valid_rows = sorted((r for r in rows if r["fold"] == "valid"), key=lambda r: r["id"])
    raw = [imaging.to_grey(imaging.decode(storage.read_bytes(r["uri"]))) for r in valid_rows]
    targets = np.array([r["target"] for r in valid_rows])

    def score(images):
        x = imaging.zscore(np.stack([imaging.prepare_uint8(im, pixels, None) for im in images]))
        return model.predict(x, verbose=0, batch_size=32)[:, 0]

    halves = _halves(valid_rows)
    clean = score(raw)
    base = {**_summary(targets, clean, result.threshold), "crossfit": _crossfit(targets, clean, clean, halves)}
    out = {"config": asdict(cfg), "acquisition_copies": copies, "seed": seed, "train_seconds": round(seconds, 1),
           "epochs": result.epochs, "best_epoch": result.best_epoch, "valid": base, "shifts": {}}
    for name, shift in shifts.SHIFTS.items():
        probs = score([shift(im) for im in raw])
        m = _summary(targets, probs, result.threshold)
        out["shifts"][name] = {**m, "auc_drop": base["auc"] - m["auc"],
                               "specificity_drop": base["specificity"] - m["specificity"],
                               "crossfit": _crossfit(targets, clean, probs, halves)}
    return out


def _fmt_ci(d: dict, key: str) -> str:
    lo, hi = d[f"{key}_ci"]
    return f"{d[key]:.3f} ({lo:.3f}-{hi:.3f})"


def _fmt_crossfit(d: dict) -> str:
    c = d.get("crossfit")
    return f"{c['sensitivity']:.3f} / {c['specificity']:.3f}" if c else ""


def report(res: dict) -> str:
    lines = []
    if "masks" in res:
        m = res["masks"]
        lines += ["| lung masks, 200 held-out full-size images | Dice | IoU | trained on | time |", "|---|---|---|---|---|",
                  f"| 256 px U-Net, seed post-processing | {_fmt_ci(m, 'dice')} (median {m['dice_median']:.3f}, "
                  f"min {m['dice_min']:.3f}) | {m['iou']:.3f} | {m['trained_on']} pairs, {m['epochs']} epochs | "
                  f"{m['train_seconds'] / 60:.1f} min |", ""]
    if "pretraining" in res:
        p = res["pretraining"]
        seeds = ", ".join(str(r["seed"]) for r in next(iter(p["arms"].values())))
        lines += [f"| pretraining, then the same frozen classifier (head 2, {p['epochs']} epochs), valid fold, "
                  f"seeds {seeds} | AUC: mean (range over seeds) | AUC 95% CI, seed {seeds[0]} | sensitivity | "
                  "specificity | sensitivity / specificity at 0.5 | pretraining images | time per seed |",
                  "|---|---|---|---|---|---|---|---|"]

        def cell(values, digits=3) -> str:
            return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

        def half(runs) -> str:
            if not all("sensitivity_at_0.5" in r for r in runs):
                return ""
            return f"{cell([r['sensitivity_at_0.5'] for r in runs])} / {cell([r['specificity_at_0.5'] for r in runs])}"

        for name, runs in p["arms"].items():
            first = runs[0]
            minutes = np.mean([r["pretrain_seconds"] + r["train_seconds"] for r in runs]) / 60
            lines.append(f"| {name} | {cell([r['auc'] for r in runs])} | {first['auc']:.3f} ({first['auc_ci'][0]:.3f}-"
                         f"{first['auc_ci'][1]:.3f}) | {cell([r['sensitivity'] for r in runs])} | "
                         f"{cell([r['specificity'] for r in runs])} | {half(runs)} | {first['pretrain_images']} | "
                         f"{minutes:.1f} min |")
        for label, d in p["paired_auc"].items():
            p_text = "p < 0.001" if d["p_value"] < 0.001 else f"p = {d['p_value']:.3f}"  # 1000 bootstrap draws
            lines.append(f"| {label}, seeds' mean probability (paired bootstrap) | {d['difference']:+.3f} "
                         f"({d['low']:+.3f} to {d['high']:+.3f}), {p_text} | | | | | | |")
        lines.append("")
    if "best" in res:
        b = res["best"]
        v = b["valid"]
        lines += ["| best classifier, valid fold, and under shifts | AUC (95% CI) | sensitivity | specificity | AUC drop | "
                  "specificity drop | cross-fitted sensitivity / specificity |", "|---|---|---|---|---|---|---|",
                  f"| as acquired ({b['epochs']} epochs, {b.get('acquisition_copies', 0)} acquisition copies, "
                  f"{b['train_seconds'] / 60:.1f} min) | {_fmt_ci(v, 'auc')} | "
                  f"{_fmt_ci(v, 'sensitivity')} | {_fmt_ci(v, 'specificity')} | | | {_fmt_crossfit(v)} |"]
        for name, d in b["shifts"].items():
            lines.append(f"| {name} | {_fmt_ci(d, 'auc')} | {d['sensitivity']:.3f} | {d['specificity']:.3f} | "
                         f"{d['auc_drop']:+.3f} | {d['specificity_drop']:+.3f} | {_fmt_crossfit(d)} |")
    return "\n".join(lines)


def summarise(paths: list[str]) -> str:
    """Part (c) of several results.json files (seeds, with and without acquisition copies): the
    mean and range over seeds of AUC, specificity and the largest specificity drop under a shift."""
    groups: dict[int, list[dict]] = {}
    for path in paths:
        best = json.loads(Path(path).read_text())["best"]
        groups.setdefault(int(best.get("acquisition_copies", 0)), []).append(best)
    lines = ["| acquisition copies | runs (seeds) | AUC | specificity | sensitivity | specificity drop: noise | zoom 0.85 | "
             "worst shift | AUC drop, worst shift | cross-fitted specificity, worst shift |", "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(values) -> str:
        return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    for copies, runs in sorted(groups.items()):
        worst = [max(d["specificity_drop"] for d in b["shifts"].values()) for b in runs]
        lines.append(
            f"| {copies} | {len(runs)} ({', '.join(str(b.get('seed', 0)) for b in runs)}) | "
            f"{cell([b['valid']['auc'] for b in runs])} | {cell([b['valid']['specificity'] for b in runs])} | "
            f"{cell([b['valid']['sensitivity'] for b in runs])} | "
            f"{cell([b['shifts']['noise']['specificity_drop'] for b in runs])} | "
            f"{cell([b['shifts']['zoom 0.85']['specificity_drop'] for b in runs])} | {cell(worst)} | "
            f"{cell([max(d['auc_drop'] for d in b['shifts'].values()) for b in runs])} | "
            f"{cell([min(d['crossfit']['specificity'] for d in b['shifts'].values()) for b in runs])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="a,b,c")
    p.add_argument("--pixels", type=int, default=128)
    p.add_argument("--work", default=str(ROOT / "work" / "science"))
    p.add_argument("--mask-epochs", type=int, default=6)
    p.add_argument("--mask-images", type=int, default=2400)
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--frozen-epochs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--acquisition-copies", type=int, default=1, help="for (c): the pipeline's default")
    p.add_argument("--seed", type=int, default=0, help="for (c): the training seed")
    p.add_argument("--seeds", default="0,1,2", help="for (b): the seeds of each arm")
    p.add_argument("--summarise", nargs="+", metavar="RESULTS_JSON",
                   help="only print the summary of part (c) over these results.json files (copies of several runs)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.summarise:
        print(summarise(args.summarise))
        return 0
    if not (SHARED / "kermany_224" / "train").is_dir():
        raise SystemExit(f"the science measurements need the real images at {SHARED}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    res = json.loads(results_path.read_text()) if results_path.exists() else {}
    rows = _manifest(work)
    parts = set(args.only.split(","))
    if "a" in parts:
        res["masks"] = lung_masks(work, rows, args.mask_epochs, args.mask_images)
        results_path.write_text(json.dumps(res, indent=2))
    if "b" in parts:
        res["pretraining"] = pretraining(work, args.pixels, args.pretrain_epochs, args.frozen_epochs,
                                         [int(x) for x in args.seeds.split(",")])
        results_path.write_text(json.dumps(res, indent=2))
    if "c" in parts:
        res["best"] = best_classifier(work, rows, args.pixels, args.pretrain_epochs, args.epochs,
                                      args.acquisition_copies, args.seed)
        results_path.write_text(json.dumps(res, indent=2))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
