"""One function per pipeline stage, over folders and URIs: what the KFP components and the
`neumo` command both call. Each validates its inputs first, writes its outputs into the given
folder (an artifact path in Kubeflow) and returns a small dict for artifact metadata."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict

import numpy as np

from neumo import ingest as ni
from neumo import storage
from neumo.tuning import KEYS as TRIAL_KEYS

logger = logging.getLogger(__name__)

MANIFEST = "manifest.csv"


def _write_json(path: str, obj) -> None:
    storage.write_text(path, json.dumps(obj, indent=2, default=str))


def _read_json(path: str):
    return json.loads(storage.read_text(path))


# --- fingerprint, ingest --------------------------------------------------------------------

def fingerprint(*uris: str) -> str:
    """A short hash of what lies under the given folders (relative names, sizes, versions)."""
    import hashlib

    h = hashlib.sha256()
    for base in uris:
        if not base:
            continue
        h.update(f"{base}\n".encode())
        for uri, size, version in storage.list_versions(base):
            h.update(f"{storage.relative(uri, base)}\t{size}\t{version}\n".encode())
    return h.hexdigest()[:16]


def ingest(config: ni.IngestConfig, out_dir: str) -> dict:
    """Manifest, per-file report and summary of a dataset (+ optional unlabelled set) in out_dir."""
    manifest, report, summary = ni.scan(config)
    if not any(r["fold"] == "train" for r in manifest):
        raise ValueError(f"no accepted training image under {config.dataset_uri}: see the report")
    summary["data_version"] = ni.data_version(manifest)
    storage.write_text(storage.join(out_dir, MANIFEST), ni.to_csv(manifest, ni.MANIFEST_COLUMNS))
    storage.write_text(storage.join(out_dir, "report.csv"), ni.to_csv(report, ni.REPORT_COLUMNS))
    _write_json(storage.join(out_dir, "summary.json"), summary)
    logger.info("ingest: %s", json.dumps({k: summary[k] for k in ("files", "accepted", "rejected", "duplicate", "skipped")}))
    return summary


def load_manifest(manifest_dir: str) -> list[dict]:
    return ni.read_manifest(storage.join(manifest_dir, MANIFEST))


def ingest_report_markdown(summary: dict) -> str:
    lines = ["# Ingest report", "", "| files | accepted | rejected | duplicate | skipped |", "|---|---|---|---|---|",
             f"| {summary['files']} | {summary['accepted']} | {summary['rejected']} | {summary['duplicate']} | {summary['skipped']} |",
             "", "| fold | NORMAL | PNEUMONIA | unlabelled |", "|---|---|---|---|"]
    for fold, c in summary["folds"].items():
        lines.append(f"| {fold} | {c.get('NORMAL', 0)} | {c.get('PNEUMONIA', 0)} | {c.get('unlabelled', 0)} |")
    lines += ["", f"Patients: {summary['patients']}; with lung mask: {summary['with_mask']}; "
              f"patient overlap between official splits: {summary['patient_overlap_between_splits']}; "
              f"empty class folders: {summary['empty_class_folders'] or 'none'}; data version {summary['data_version']}."]
    return "\n".join(lines) + "\n"


# --- plan -----------------------------------------------------------------------------------

def plan(search_space: dict, manifest_dir: str, mask_model_uri: str = "", depth: int = 4,
         results_uri: str = "", config: dict | None = None, clahe_clip: float | None = None,
         acquisition_copies: int = 0) -> list[dict]:
    """Validate the search space (or the one `config` of a single run) against the data and the
    U-Net depth, the preprocessing settings, and check the results URI is writable, before any
    GPU time; the (pixels, mask) variants to prepare."""
    from neumo.preprocess import PreprocessConfig
    from neumo.training import TrialConfig
    from neumo.tuning import SearchSpace

    if config:
        cfg = TrialConfig.from_dict(config)
        search_space = {**search_space, "pixels": [cfg.pixels], "mask": [cfg.mask]}
    space = SearchSpace.from_dict(search_space)
    factor = 2 ** int(depth)
    bad = [p for p in space.pixels if p % factor]
    if bad:
        raise ValueError(f"search_space.pixels {bad}: pixels must be a positive multiple of 2**depth={factor} "
                         f"(depth={depth}); lower depth or use larger pixels")
    PreprocessConfig(pixels=max(space.pixels), clahe_clip=clahe_clip, acquisition_copies=acquisition_copies)
    if results_uri:
        storage.check_writable(results_uri)  # a missing results bucket fails now, not at aggregate
    summary = _read_json(storage.join(manifest_dir, "summary.json"))
    if any(space.mask) and not summary["with_mask"] and not mask_model_uri:
        raise ValueError("search_space.mask includes true, but no image has a lung mask and no mask_model_uri was given")
    return space.variants()


# --- lung masks -----------------------------------------------------------------------------

def mask_model(manifest_dir: str, out_dir: str, mask_model_uri: str = "", config=None, needed: bool = True) -> dict:
    """Import the given lung-mask model (`.keras` or legacy `.h5`), or train one on the masks."""
    from neumo import masking

    config = config or masking.MaskModelConfig()
    os.makedirs(out_dir, exist_ok=True)
    if not needed:
        info = {"source": "none", "reason": "no masked variant in the search space"}
    elif mask_model_uri:
        name = "lung_mask" + (os.path.splitext(mask_model_uri)[1].lower() or ".keras")  # load() checks it
        storage.download(mask_model_uri, os.path.join(out_dir, name))
        model = masking.load(os.path.join(out_dir, name))
        info = {"source": mask_model_uri, "pixels": masking.model_pixels(model), "file": name}
    else:
        rows = [r for r in load_manifest(manifest_dir) if r["mask_uri"]]
        if not rows:
            info = {"source": "none", "reason": "no lung masks in the dataset and no mask_model_uri"}
            logger.warning("mask model: %s; masked variants are unavailable", info["reason"])
        else:
            _, scores = masking.train(rows, config, out_dir)
            info = {"source": "trained", "file": "lung_mask.keras", **scores}
    _write_json(os.path.join(out_dir, "mask_model.json"), info)
    return info


def mask(manifest_dir: str, model_dir: str, out_dir: str, sheet_size: int = 24) -> dict:
    """Lung masks for every image at its original size, per-image QA and a contact sheet."""
    import cv2

    from neumo import imaging, masking
    from neumo.preprocess import mask_path

    info = _read_json(os.path.join(model_dir, "mask_model.json"))
    qa_rows = []
    if info["source"] == "none":
        _write_json(os.path.join(out_dir, "masks.json"), {"available": False, "reason": info["reason"]})
        return {"available": False}
    model = masking.load(os.path.join(model_dir, info["file"]))
    pixels = masking.model_pixels(model)
    rows = load_manifest(manifest_dir)
    sheet = ([], [], [])
    for lo in range(0, len(rows), 32):
        chunk = rows[lo:lo + 32]
        images = [imaging.decode(storage.read_bytes(r["uri"])) for r in chunk]
        for r, image, m in zip(chunk, images, masking.predict_masks(model, images, pixels)):
            storage.write_bytes(mask_path(out_dir, r["id"]), cv2.imencode(".png", m.astype(np.uint8) * 255)[1].tobytes())
            qa = imaging.mask_qa(m)
            qa_rows.append({"id": r["id"], "lung_fraction": round(qa["lung_fraction"], 4),
                            "components": qa["components"], "flags": ";".join(qa["flags"])})
            if len(sheet[0]) < sheet_size:
                for lst, v in zip(sheet, (image, m, r["id"])):
                    lst.append(v)
        logger.info("mask: %d/%d images", lo + len(chunk), len(rows))
    storage.write_text(os.path.join(out_dir, "qa.csv"), ni.to_csv(qa_rows, ["id", "lung_fraction", "components", "flags"]))
    if sheet[0]:
        cv2.imwrite(os.path.join(out_dir, "contact_sheet.png"), masking.contact_sheet(*sheet))
    flagged = sum(1 for q in qa_rows if q["flags"])
    summary = {"available": True, "images": len(qa_rows), "flagged": flagged,
               "mean_lung_fraction": float(np.mean([q["lung_fraction"] for q in qa_rows])) if qa_rows else 0.0}
    _write_json(os.path.join(out_dir, "masks.json"), summary)
    return summary


# --- preprocess, pretrain, catalog ----------------------------------------------------------

def preprocess(manifest_dir: str, variant: dict, out_dir: str, masks_dir: str = "", clahe_clip: float | None = None,
               workers: int = 0, acquisition_copies: int = 0) -> dict:
    """Prepare one (pixels, mask) variant of every manifest image as uint8 shards per fold."""
    from neumo.preprocess import PreprocessConfig, run

    config = PreprocessConfig(pixels=int(variant["pixels"]), mask=bool(variant["mask"]), clahe_clip=clahe_clip,
                              workers=workers, acquisition_copies=acquisition_copies)
    if config.mask and not (masks_dir and _read_json(os.path.join(masks_dir, "masks.json")).get("available")):
        raise ValueError("a masked variant was asked for, but the mask stage produced no masks")
    summary = _read_json(storage.join(manifest_dir, "summary.json"))
    return run(load_manifest(manifest_dir), config, out_dir, masks_dir if config.mask else "", summary["data_version"])


def pretrain(variant_dir: str, out_dir: str, config=None) -> dict:
    """Pretrain the U-Net autoencoder on the variant's unlabelled images and its train fold (labels
    unused; never the valid, val or test images, which judge the classifiers)."""
    from neumo import data as nd
    from neumo import training
    from neumo.preprocess import COPY_MARK

    config = config or training.PretrainConfig()
    info = nd.read_variant(variant_dir)
    folds = [nd.load_fold(variant_dir, f) for f in ("unlabelled", "train")]
    originals = np.array([COPY_MARK not in str(i) for i in folds[1].ids], bool)  # acquisition copies are for classifiers
    folds[1] = nd.Fold(folds[1].images[originals], folds[1].targets[originals], folds[1].ids[originals])
    images = nd.Fold(*(np.concatenate([getattr(f, k) for f in folds]) for k in ("images", "targets", "ids")))
    source = f"{len(folds[0])} unlabelled + {len(folds[1])} train"
    if len(images) < 2:
        raise ValueError(f"pretraining needs at least 2 images; variant {variant_dir} has {len(images)}")
    order = np.random.default_rng(config.seed).permutation(len(images))
    images = nd.Fold(images.images[order], images.targets[order], images.ids[order])
    n_valid = max(1, len(images) // 10)
    fit = nd.Fold(images.images[n_valid:], images.targets[n_valid:], images.ids[n_valid:])
    held = nd.Fold(images.images[:n_valid], images.targets[:n_valid], images.ids[:n_valid])
    _, curve, seconds = training.pretrain(fit, held, int(info["pixels"]), config, out_dir)
    from neumo import figures

    figures.curve_png({k: curve[k] for k in ("loss", "val_loss") if k in curve}, os.path.join(out_dir, "loss_curve.png"),
                      f"reconstruction loss, {info['pixels']} px, mask={info['mask']}")
    result = {"pixels": int(info["pixels"]), "mask": bool(info["mask"]), "images": len(fit), "source": source,
              "final_loss": float(curve["loss"][-1]), "best_val_loss": float(min(curve["val_loss"])),
              "seconds": round(seconds, 1), "config": asdict(config)}
    _write_json(os.path.join(out_dir, "pretrain.json"), result)
    return result


def catalog(variants: list[dict], backbones: list[dict], out_path: str) -> list[dict]:
    """Pair each prepared variant with its pretrained backbone, by (pixels, mask).

    `variants` and `backbones` are [{"uri": ..., "pixels": ..., "mask": ...}] from artifact
    metadata (KFP's local runner turns the ints into floats: normalised here).
    """
    def key(d):
        return int(d["pixels"]), bool(d["mask"])

    by_key = {key(b): b["uri"] for b in backbones}
    entries = []
    for v in variants:
        if key(v) not in by_key:
            raise ValueError(f"no pretrained backbone for variant {key(v)}")
        entries.append({"pixels": key(v)[0], "mask": key(v)[1], "data_uri": v["uri"], "backbone_uri": by_key[key(v)]})
    _write_json(out_path, sorted(entries, key=lambda e: (e["pixels"], e["mask"])))
    return entries


def _variant(catalog_path: str, pixels: int, use_mask: bool) -> dict:
    for e in _read_json(catalog_path):
        if int(e["pixels"]) == pixels and bool(e["mask"]) == use_mask:
            return e
    raise ValueError(f"the catalog has no prepared variant pixels={pixels} mask={use_mask}")


# --- tuning ---------------------------------------------------------------------------------

def suggest(search_space: dict, history_in: str, finished: list[str], batch_size: int, seed: int,
            history_out: str, results_uri: str = "", round_index: int = 0, config: dict | None = None) -> list[dict]:
    """The next batch of configurations from every finished trial: earlier rounds (history_in,
    a JSON-lines file of trial records), the last round (`finished`, JSON strings) and, on the
    first round, the training CSV already at results_uri (so a recurring run continues). A given
    `config` is the batch (a single run: no tuning)."""
    from dataclasses import asdict

    from neumo import results, training, tuning

    if config:
        storage.write_text(history_out, "")
        return [{**asdict(training.TrialConfig.from_dict(config)), "round": round_index, "trial": 0}]

    space = tuning.SearchSpace.from_dict(search_space)
    _check_round(finished, round_index - 1)
    records = _read_records(history_in) + [json.loads(s) for s in finished]
    trials = [_trial_point(r["train"]) for r in records]
    if results_uri and round_index == 0:
        previous = results.read_rows(storage.join(results_uri, results.TRAIN_CSV))
        trials += [_trial_point(r) for r in previous if _in_space(r, space)]
    configs = tuning.suggest(space, trials, batch_size, seed + round_index)
    storage.write_text(history_out, "".join(json.dumps(r) + "\n" for r in records))
    for i, c in enumerate(configs):
        c.update({"round": round_index, "trial": i})
    logger.info("suggest round %d: %d configurations from %d finished trials", round_index, len(configs), len(trials))
    return configs


def _check_round(finished: list[str], round_index: int) -> None:
    """One failed trial never sinks a run; a round where every trial failed does (with the reasons)."""
    rows = [json.loads(s)["train"] for s in finished]
    if rows and all(r.get("status") != "ok" for r in rows):
        reasons = "; ".join(f"trial {r.get('trial')}: {r.get('error', '')[:200]}" for r in rows)
        raise RuntimeError(f"every trial of round {round_index} failed: {reasons}")


def _read_records(path: str) -> list[dict]:
    if not path or not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]




def _trial_point(row: dict) -> dict:
    """A training row as the optimiser sees it: the configuration and its score (None if failed)."""
    def parse(k, v):
        if k in ("mask", "class_weight"):
            return v in (True, "True", "true", "1", 1)
        if k in ("pixels", "model", "frozen_layers"):
            return int(float(v))
        if k == "learning_rate":
            return float(v)
        return str(v)

    point = {k: parse(k, row[k]) for k in TRIAL_KEYS}
    score = row.get("score")
    point["score"] = float(score) if score not in (None, "", "nan") and row.get("status", "ok") == "ok" else None
    return point


def _in_space(row: dict, space) -> bool:
    try:
        return space.contains(_trial_point(row))
    except (KeyError, ValueError):
        return False


# --- one trial: train, evaluate -------------------------------------------------------------

def train(config: dict, catalog_path: str, out_dir: str, model_uri: str = "", settings=None, run_id: str = "",
          clahe_clip: float | None = None, seed: int = 0, checkpoint_root: str = "") -> dict:
    """Train one trial; returns its training-CSV row (status ok). With a checkpoint_root the
    training state is backed up under it per (run, round, trial) and a restarted pod resumes."""
    from neumo import training

    cfg = training.TrialConfig.from_dict(config)
    settings = settings or training.TrainSettings(seed=seed)
    entry = _variant(catalog_path, cfg.pixels, cfg.mask)
    backbone = os.path.join(out_dir, "backbone.keras")
    storage.download(storage.join(entry["backbone_uri"], "autoencoder.keras"), backbone)
    os.makedirs(out_dir, exist_ok=True)
    checkpoint = ""
    if checkpoint_root:
        checkpoint = storage.join(checkpoint_root, "checkpoints", run_id or "run",
                                  f"round-{int(config.get('round', 0))}-trial-{int(config.get('trial', 0))}")
    result = training.train_trial(cfg, settings, entry["data_uri"], backbone, out_dir, checkpoint)
    os.remove(backbone)
    info = _read_json_safe(storage.join(entry["data_uri"], "variant.json"))
    return {
        "run_id": run_id, "round": int(config.get("round", 0)), "trial": int(config.get("trial", 0)), "status": "ok",
        "error": "", **asdict(cfg), "clahe_clip": "" if clahe_clip is None else clahe_clip,
        "epochs": result.epochs, "best_epoch": result.best_epoch, "train_loss": result.train_loss,
        "val_loss": result.val_loss, "val_accuracy": result.val_accuracy, "val_auc": result.val_auc,
        "threshold": result.threshold, "score": result.val_auc, "duration_s": result.duration_s,
        "model_uri": model_uri or out_dir, "data_version": info.get("data_version", ""),
        "git_revision": os.environ.get("NEUMO_GIT_REVISION", ""), "image": os.environ.get("NEUMO_IMAGE", ""),
        "seed": settings.seed, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _read_json_safe(uri: str) -> dict:
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else {}


EVAL_SPLITS = ("test", "val", "test+val", "valid")


def evaluate(model_dir: str, catalog_path: str, train_row: dict, out_dir: str, bootstrap: int = 1000,
             out_uri: str = "") -> dict:
    """Metrics of a trained trial on each split the seed used (test, val, test+val) plus our
    patient-level validation fold, at the stored threshold; per-image predictions; ROC data.
    Returns the trial record {"train": row, "eval": [rows], "figures_uri": where the PNGs are
    (out_uri, else out_dir), "roc": {...}}."""
    import keras

    from neumo import data as nd
    from neumo import evaluation, training

    meta = _read_json(os.path.join(model_dir, "model.json"))
    cfg = training.TrialConfig.from_dict(meta["config"])
    entry = _variant(catalog_path, cfg.pixels, cfg.mask)
    model = keras.saving.load_model(os.path.join(model_dir, "model.keras"), compile=False, safe_mode=True)
    folds = {f: nd.load_fold(entry["data_uri"], f) for f in ("test", "val", "valid")}
    eval_rows, predictions, roc = [], [], {}
    probs = {f: training.predict(model, fold) for f, fold in folds.items()}
    for split in EVAL_SPLITS:
        parts = split.split("+")
        t = np.concatenate([folds[p].targets for p in parts]).astype(int)
        if t.size == 0:
            continue
        p = np.concatenate([probs[p] for p in parts])
        m = evaluation.metrics(t, p, meta["threshold"])
        ci = evaluation.bootstrap(t, p, meta["threshold"], n=bootstrap)
        eval_rows.append({
            "run_id": train_row.get("run_id", ""), "round": train_row.get("round", ""), "trial": train_row.get("trial", ""),
            "model_uri": train_row.get("model_uri", ""), "split": split, **{k: m[k] for k in (
                "n", "loss", "accuracy", "auc", "sensitivity", "specificity", "precision", "f1", "tn", "fp", "fn", "tp",
                "threshold")},
            **{f"{k}_{side}": ci[k][j] for k in ("accuracy", "auc", "sensitivity", "specificity", "precision", "f1")
               for j, side in enumerate(("low", "high"))},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        if "+" not in split:
            predictions += [{"id": i, "split": split, "target": int(y), "probability": float(q),
                             "predicted": int(q >= meta["threshold"])} for i, y, q in zip(folds[split].ids, t, p)]
        fpr, tpr, th = evaluation.roc_curve(t, p)
        roc[split] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": th.tolist()}
    os.makedirs(out_dir, exist_ok=True)
    storage.write_text(os.path.join(out_dir, "predictions.csv"),
                       ni.to_csv(predictions, ["id", "split", "target", "probability", "predicted"]))
    _figures(model, folds, probs, meta["threshold"], eval_rows, roc, out_dir)
    record = {"train": train_row, "eval": eval_rows, "figures_uri": out_uri or out_dir}
    _write_json(os.path.join(out_dir, "evaluation.json"), {**record, "roc": roc})
    return {**record, "roc": roc}


def _figures(model, folds: dict, probs: dict, threshold: float, eval_rows: list[dict], roc: dict, out_dir: str,
             per_group: int = 3) -> None:
    """roc.png, confusion.png and gradcam.png (a few right and wrong calls of each class, from the
    first labelled split: clinicians would rather look than read)."""
    from neumo import figures, imaging, models

    if not eval_rows:
        return
    figures.roc_png(roc, {r["split"]: r["auc"] for r in eval_rows}, os.path.join(out_dir, "roc.png"))
    figures.confusion_png(eval_rows, os.path.join(out_dir, "confusion.png"))
    split = next(f for f in ("test", "val", "valid") if len(folds[f]))
    fold, p = folds[split], probs[split]
    correct = (p >= threshold) == (fold.targets == 1)
    picks, titles = [], []
    for target in (1, 0):
        for right in (True, False):
            for i in np.flatnonzero((fold.targets == target) & (correct == right))[:per_group]:
                picks.append(int(i))
                titles.append(f"{('NORMAL', 'PNEUMONIA')[target]} p={p[i]:.2f} {'right' if right else 'WRONG'}")
    if picks:
        x = imaging.zscore(fold.images[picks])
        figures.gradcam_png(fold.images[picks], models.grad_cam(model, x), titles, os.path.join(out_dir, "gradcam.png"))


def _best_figures(ok_records: list[dict]) -> dict[str, bytes]:
    """The best trial's ROC, confusion and Grad-CAM PNGs (those that can be read)."""
    if not ok_records:
        return {}
    best = max(ok_records, key=lambda r: float(r["train"]["score"]))
    base, found = best.get("figures_uri", ""), {}
    for name, caption in (("roc.png", "ROC"), ("confusion.png", "Confusion matrices"),
                          ("gradcam.png", "Grad-CAM: where the model looks, right and wrong calls")):
        uri = storage.join(base, name) if base else ""
        if uri and storage.exists(uri):
            found[f"{caption} (round {best['train'].get('round')}, trial {best['train'].get('trial')})"] = storage.read_bytes(uri)
    return found


def failed_row(config: dict, error: str, run_id: str = "", seed: int = 0) -> dict:
    """The training-CSV row of a trial that could not finish, with the reason."""
    row = {k: config.get(k, "") for k in TRIAL_KEYS}
    for k in ("pixels", "model", "frozen_layers"):  # KFP's local runner hands ints over as floats
        if isinstance(row[k], float) and row[k].is_integer():
            row[k] = int(row[k])
    return {"run_id": run_id, "round": int(config.get("round", 0)), "trial": int(config.get("trial", 0)),
            "status": "failed", "error": error[:500], **row, "seed": seed,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# --- aggregate ------------------------------------------------------------------------------

def aggregate(history_in: str, finished: list[str], results_uri: str, out_dir: str) -> dict:
    """Append every trial of this run to the two CSVs at results_uri (earlier rows kept byte for
    byte), and write copies plus an HTML report with the leaderboard and plots to out_dir."""
    from neumo import results

    records = _read_records(history_in) + [json.loads(s) for s in finished]
    train_rows = [r["train"] for r in records]
    eval_rows = [e for r in records for e in r.get("eval", [])]
    if results_uri:
        results.append_rows(storage.join(results_uri, results.TRAIN_CSV), train_rows, results.TRAIN_COLUMNS)
        results.append_rows(storage.join(results_uri, results.EVAL_CSV), eval_rows, results.EVAL_COLUMNS)
    os.makedirs(out_dir, exist_ok=True)
    results.append_rows(os.path.join(out_dir, results.TRAIN_CSV), train_rows, results.TRAIN_COLUMNS)
    results.append_rows(os.path.join(out_dir, results.EVAL_CSV), eval_rows, results.EVAL_COLUMNS)
    ok = [r for r in records if r["train"].get("status") == "ok"]
    results.write_report(os.path.join(out_dir, "report.html"), train_rows, eval_rows, _best_figures(ok))
    # Written first, checked after: the rows of a failed last round are kept too.
    _check_round(finished, int(records[-1]["train"].get("round", 0)) if records else 0)
    best = max(ok, key=lambda r: float(r["train"]["score"]))["train"] if ok else None
    return {"trials": len(train_rows), "failed": len(train_rows) - len(ok),
            "best_score": float(best["score"]) if best else None, "best_model_uri": best["model_uri"] if best else ""}
