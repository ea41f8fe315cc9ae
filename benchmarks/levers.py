"""Levers for a new site, measured over seeds: each arm trains the same classifier (head 1, backbone
fine-tuned, strong augmentation, class weights) on the same pretrained backbone with one setting
changed, then scores the patient-level valid fold of kermany_224/train as acquired and under every
acquisition shift of the suite (the variant's "shifted" fold), at the stored threshold and at the
thresholds the other policies would have chosen, and the arm's seeds averaged as an ensemble.

    python -m benchmarks.levers --arms baseline,varied+shift,varied --seeds 0,1,2 --pixels 64 --batch-size 32 \
        --backbone work/science-b64/arm-restore-0/backbone/autoencoder.keras \
        --manifest work/science-b64/manifest --work work/levers64

Each run's probabilities are kept (runs/ARM-SEED.npz), so a summary is recomputed without training:
    python -m benchmarks.levers --work work/levers64 --summarise
Prints Markdown tables (mean and range over seeds, 95% bootstrap intervals of seed 0) and writes
results.json in the work folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from neumo import evaluation, shifts, stages, training
from neumo import data as nd
from neumo.trial import TrialConfig

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("benchmarks.levers")

#: arm -> (acquisition_copies, acquisition, selection). The baseline is the pipeline's settings
#: before this study (one tight copy, the valid AUC selects).
ARMS = {
    "baseline": (1, "tight", "auc"),
    "shift-selected": (1, "tight", "shift"),
    "varied": (1, "varied", "auc"),
    "varied+shift": (1, "varied", "shift"),
    "varied x2+shift": (2, "varied", "shift"),
}
POLICIES = ("youden", "pooled_shifts", "sensitivity_0.95")


def _variant(work: Path, manifest: str, pixels: int, copies: int, acquisition: str) -> str:
    out = work / f"p{pixels}-{acquisition}{copies}"
    if not (out / "variant.json").exists():
        stages.preprocess(manifest_dir=manifest, variant={"pixels": pixels, "mask": False}, out_dir=str(out),
                          acquisition_copies=copies, acquisition=acquisition)
    return str(out)


def run_arm(work: Path, arm: str, seed: int, *, manifest: str, backbone: str, pixels: int, epochs: int,
            batch_size: int) -> Path:
    copies, acquisition, selection = ARMS[arm]
    out = work / "runs" / f"{arm}-{seed}.npz"
    if out.exists():
        return out
    variant = _variant(work, manifest, pixels, copies, acquisition)
    cfg = TrialConfig(pixels, False, 1, 0, 1e-3, "bce", "strong", True)
    settings = training.TrainSettings(epochs=epochs, batch_size=batch_size, patience=3, seed=seed, selection=selection)
    model_dir = work / "models" / f"{arm}-{seed}"
    start = time.monotonic()
    result = training.train_trial(cfg, settings, variant, backbone, str(model_dir))
    seconds = time.monotonic() - start
    import keras

    model = keras.saving.load_model(str(model_dir / "model.keras"), compile=False, safe_mode=True)
    folds = {f: nd.load_fold(variant, f) for f in ("valid", "shifted", "val")}
    probs = {f: training.predict(model, fold) for f, fold in folds.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **{f"{f}_probs": probs[f] for f in folds}, **{f"{f}_targets": folds[f].targets for f in folds},
             **{f"{f}_ids": folds[f].ids for f in folds}, threshold=result.threshold, seconds=seconds,
             epochs=result.epochs, best_epoch=result.best_epoch)
    logger.info("%s seed %d: valid AUC %.4f, shift score %.4f (%s), %.1f min", arm, seed, result.val_auc,
                result.shift_score, result.worst_shift, seconds / 60)
    return out


def _load(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _shifted(run: dict) -> dict:
    names = np.array([shifts.shift_of(i) for i in run["shifted_ids"]])
    return {n: (run["shifted_targets"][names == n], run["shifted_probs"][names == n]) for n in shifts.SHIFTS
            if (names == n).any()}


def score_run(run: dict, policy: str, threshold: float | None = None, bootstrap: int = 1000) -> dict:
    """Valid metrics (with intervals), the shift score and the worst specificity drop at the
    threshold `policy` picks on this run's valid images (or the given one)."""
    t, p, shifted = run["valid_targets"], run["valid_probs"], _shifted(run)
    chosen = training.Selection.of(t, p, shifted, policy)
    thr = chosen.threshold if threshold is None else threshold
    m = evaluation.metrics(t, p, thr)
    ci = evaluation.bootstrap(t, p, thr, n=bootstrap) if bootstrap else {}
    per = {n: evaluation.metrics(st, sp, thr) for n, (st, sp) in shifted.items()}
    drops = {n: m["specificity"] - v["specificity"] for n, v in per.items()}
    worst = max(drops, key=drops.get)
    auc_drop = max(m["auc"] - v["auc"] for v in per.values())
    sscore = evaluation.shift_score(t, p, thr, shifted)
    return {"threshold": thr, "auc": m["auc"], "sensitivity": m["sensitivity"], "specificity": m["specificity"],
            **{f"{k}_ci": list(ci[k]) for k in ("auc", "sensitivity", "specificity") if ci},
            "shift_score": sscore["shift_score"], "worst_shift": sscore["worst_shift"],
            "worst_specificity_drop": drops[worst], "worst_drop_shift": worst, "worst_auc_drop": auc_drop,
            "sensitivity_worst_shift": per[worst]["sensitivity"], "specificity_worst_shift": per[worst]["specificity"]}


def ensemble(runs: list[dict]) -> dict:
    """The seeds' mean probability, as one run."""
    out = dict(runs[0])
    for key in ("valid_probs", "shifted_probs", "val_probs"):
        out[key] = np.mean([r[key] for r in runs], axis=0)
    return out


def summarise(work: Path, arms: list[str], seeds: list[int], bootstrap: int = 1000) -> dict:
    results = {}
    for arm in arms:
        paths = [work / "runs" / f"{arm}-{s}.npz" for s in seeds]
        runs = [_load(p) for p in paths if p.exists()]
        if not runs:
            continue
        arm_out = {"seeds": [s for s, p in zip(seeds, paths) if p.exists()],
                   "minutes": [float(r["seconds"]) / 60 for r in runs],
                   "epochs": [int(r["epochs"]) for r in runs], "best_epoch": [int(r["best_epoch"]) for r in runs]}
        for policy in POLICIES:
            arm_out[policy] = [score_run(r, policy, bootstrap=bootstrap if i == 0 else 0) for i, r in enumerate(runs)]
        if len(runs) > 1:
            arm_out["ensemble"] = {policy: score_run(ensemble(runs), policy, bootstrap=bootstrap) for policy in POLICIES}
        results[arm] = arm_out
    return results


def _history(work: Path, arm: str, seed: int) -> list[dict]:
    import csv

    path = work / "models" / f"{arm}-{seed}" / "history.csv"
    if not path.exists():
        return []
    with open(path) as fh:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def ranking(work: Path, results: dict) -> dict:
    """Does the shift score rank models the valid AUC cannot? (a) Within each run: the epoch the
    valid AUC would keep and the one the shift score keeps, with both figures of each. (b) Across
    every run's final model: how often the two scores order a pair of models differently, and the
    pairs the AUC cannot tell apart (|difference| < 0.002) that the shift score separates by 0.02 or more."""
    epochs, finals = [], []
    for arm, r in results.items():
        for i, seed in enumerate(r["seeds"]):
            h = _history(work, arm, seed)
            if h and "val_shift_score" in h[0]:
                by_auc = max(range(len(h)), key=lambda e: h[e]["val_auc"])
                by_shift = max(range(len(h)), key=lambda e: h[e]["val_shift_score"])
                epochs.append({"run": f"{arm}-{seed}", "auc_epoch": by_auc + 1, "shift_epoch": by_shift + 1,
                               "auc_at_auc_epoch": h[by_auc]["val_auc"], "shift_at_auc_epoch": h[by_auc]["val_shift_score"],
                               "auc_at_shift_epoch": h[by_shift]["val_auc"],
                               "shift_at_shift_epoch": h[by_shift]["val_shift_score"]})
            final = r["youden"][i]
            finals.append((f"{arm}-{seed}", final["auc"], final["shift_score"]))
    pairs = [(a, b) for i, a in enumerate(finals) for b in finals[i + 1:]]
    discordant = sum((a[1] - b[1]) * (a[2] - b[2]) < 0 for a, b in pairs)
    blind = [(a[0], b[0], round(abs(a[1] - b[1]), 4), round(abs(a[2] - b[2]), 4)) for a, b in pairs
             if abs(a[1] - b[1]) < 0.002 and abs(a[2] - b[2]) >= 0.02]
    return {"epochs": epochs, "pairs": len(pairs), "discordant_pairs": discordant, "auc_blind_pairs": blind}


def ranking_report(rank: dict) -> str:
    lines = ["| run | epoch kept by valid AUC: AUC / shift score | epoch kept by shift score: AUC / shift score |",
             "|---|---|---|"]
    for e in rank["epochs"]:
        lines.append(f"| {e['run']} | {e['auc_epoch']}: {e['auc_at_auc_epoch']:.4f} / {e['shift_at_auc_epoch']:.3f} | "
                     f"{e['shift_epoch']}: {e['auc_at_shift_epoch']:.4f} / {e['shift_at_shift_epoch']:.3f} |")
    lines += ["", f"Final models (Youden threshold): {rank['discordant_pairs']} of {rank['pairs']} pairs ordered "
              f"differently by the valid AUC and the shift score; {len(rank['auc_blind_pairs'])} pairs within 0.002 "
              f"AUC of each other that the shift score separates by 0.02 or more: {rank['auc_blind_pairs']}"]
    return "\n".join(lines)


def _cell(values, digits=3) -> str:
    values = [v for v in values if v == v]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(results: dict, policy: str = "youden") -> str:
    lines = [f"Threshold policy: {policy}. Mean (range) over seeds; AUC CI of the first seed.", "",
             "| arm | seeds | valid AUC | AUC 95% CI, first seed | sensitivity | specificity | shift score | "
             "worst specificity drop (shift) | worst AUC drop | minutes per seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, r in results.items():
        rows = r[policy]
        ci = rows[0].get("auc_ci", [float("nan")] * 2)
        shifts_seen = sorted({x["worst_drop_shift"] for x in rows})
        lines.append(f"| {arm} | {','.join(map(str, r['seeds']))} | {_cell([x['auc'] for x in rows])} | "
                     f"{ci[0]:.3f}-{ci[1]:.3f} | {_cell([x['sensitivity'] for x in rows])} | "
                     f"{_cell([x['specificity'] for x in rows])} | {_cell([x['shift_score'] for x in rows])} | "
                     f"{_cell([x['worst_specificity_drop'] for x in rows])} ({', '.join(shifts_seen)}) | "
                     f"{_cell([x['worst_auc_drop'] for x in rows])} | {_cell(r['minutes'], 1)} |")
        if "ensemble" in r:
            e = r["ensemble"][policy]
            lines.append(f"| {arm}, seeds averaged | {len(r['seeds'])} | {e['auc']:.3f} | "
                         f"{e['auc_ci'][0]:.3f}-{e['auc_ci'][1]:.3f} | {e['sensitivity']:.3f} | {e['specificity']:.3f} | "
                         f"{e['shift_score']:.3f} | {e['worst_specificity_drop']:.3f} ({e['worst_drop_shift']}) | "
                         f"{e['worst_auc_drop']:.3f} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="baseline,varied,varied+shift", help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pixels", type=int, default=64)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32, help="32: four times the seed's 8, to fit 2 cores")
    p.add_argument("--backbone", help="a pretrained autoencoder.keras at these pixels")
    p.add_argument("--manifest", help="an ingest output folder (manifest.csv) of ../shared/data/kermany_224")
    p.add_argument("--work", default=str(ROOT / "work" / "levers"))
    p.add_argument("--summarise", action="store_true", help="only summarise the runs already in --work")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; arms: {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work)
    if not args.summarise:
        if not (args.backbone and args.manifest):
            raise SystemExit("--backbone and --manifest are needed to train (or --summarise)")
        for seed in seeds:
            for arm in arms:
                run_arm(work, arm, seed, manifest=args.manifest, backbone=args.backbone, pixels=args.pixels,
                        epochs=args.epochs, batch_size=args.batch_size)
    results = summarise(work, arms, seeds)
    rank = ranking(work, results)
    (work / "results.json").write_text(json.dumps({**results, "_ranking": rank}, indent=2, default=float))
    for policy in POLICIES:
        print(report(results, policy), "\n")
    print(ranking_report(rank))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
