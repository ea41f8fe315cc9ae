"""Predictions from a model bundle (neumo.bundle) on new image files: `neumo predict` and the
predict pipeline (pipelines/predict.py) both run this.

Each file goes through the chain the bundle's variant was prepared with (decode as ingest does,
the bundle's lung-mask model when the variant is masked, then preprocess.variant_image: grey,
resize, CLAHE), the per-image z-score and the classifier, so a file gets the probability the
evaluate stage gave the same image. A file that cannot be used gets a row with the reason ingest
would report for it; an image unlike those the model was checked on (the bundle's OOD check)
gets a warning and no call.

Outputs, in one folder: predictions.csv (COLUMNS), gradcam/NNNNNN.png (one Grad-CAM overlay per
image) and index.html (the images sorted by probability, then the files that were not scored).
"""

from __future__ import annotations

import csv
import html
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from neumo import imaging, ingest, storage

logger = logging.getLogger(__name__)

COLUMNS = ["file", "status", "probability", "decision", "warning", "reason", "ood_score", "gradcam"]
CSV, PAGE, GRADCAM = "predictions.csv", "index.html", "gradcam"
#: Images decoded, classified and explained per step (bounded memory at full resolution).
BATCH = 32
#: The decision of an image the OOD check flags: no call, a warning instead.
NO_CALL = "no call"
LABELS = ("NORMAL", "PNEUMONIA")
#: Shifts (fractions of the side) of the test-time augmentation copies, in the order they are used.
TTA_SHIFTS = ((0.04, 0.0), (-0.04, 0.0), (0.0, 0.04), (0.0, -0.04), (0.04, 0.04), (-0.04, -0.04), (0.04, -0.04),
              (-0.04, 0.04))


# --- what to score ------------------------------------------------------------------------------

def _is_folder(uri: str) -> bool:
    """A local folder, or a gs:// prefix that is not itself an object."""
    path = storage.local_path(uri)
    if path is not None:
        return os.path.isdir(path)
    return uri.endswith("/") or not storage.exists(uri)


def list_inputs(inputs: list[str]) -> list[dict]:
    """Every file to score, in order: [{"index", "file", "size", "status", "reason"}]. A folder or
    gs:// prefix is walked as ingest walks a dataset (storage.walk: hidden and system files skipped
    with the reason, links out or loops rejected), and a name that is not an image file is rejected
    with ingest's reason; a file named directly is taken as given. `status` "" means: read it.
    ValueError for a folder or prefix with nothing under it."""
    items = []
    for given in inputs:
        if not given:
            continue
        if _is_folder(given):
            entries = storage.walk(given).entries
            if not entries:
                raise ValueError(f"no files under {given!r}: check the folder or gs:// prefix")
            for e in entries:
                reason = e.reason if e.status else ingest._classify(e.rel, labelled=False)[2]
                items.append({"file": e.uri, "size": e.size or None, "status": e.status or ("rejected" if reason else ""),
                              "reason": reason})
        else:
            items.append({"file": given, "size": None, "status": "", "reason": ""})
    if not items:
        raise ValueError("nothing to score: give a folder, a gs:// prefix or image files")
    for i, item in enumerate(items):
        item["index"] = i
    return items


def split(items: list[dict], shards: int) -> list[list[dict]]:
    """At most `shards` contiguous, nearly equal, non-empty parts of `items` (in order)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    n = min(shards, len(items))
    bounds = [round(k * len(items) / n) for k in range(n + 1)] if n else [0]
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


# --- reading: as ingest reads ----------------------------------------------------------------------

def read_image(uri: str, size: int | None = None) -> tuple[np.ndarray | None, str]:
    """(decoded image, "") or (None, the reason ingest reports for this file), read and decoded as
    ingest does (ingest.read_file, ingest.decode_file)."""
    data, reason = ingest.read_file(uri, size)
    if data is None:
        return None, reason
    try:
        return ingest.decode_file(data)[0], ""
    except imaging.ImageError as err:
        return None, str(err)


# --- scoring --------------------------------------------------------------------------------------

def prepare(bundle, images: list[np.ndarray], pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """Decoded images -> uint8 (N, p, p) as the bundle's variant stored them: the lung mask from the
    bundle's mask model (masked variants), then preprocess.variant_image."""
    from neumo import masking
    from neumo.preprocess import variant_image

    masks = masking.predict_masks(bundle.mask_model, images, bundle.mask_pixels) if bundle.mask else [None] * len(images)
    run = pool.map if pool is not None else map
    return np.stack(list(run(lambda im, m: variant_image(im, bundle.pixels, bundle.clahe_clip, m), images, masks)))


def tta_views(images: np.ndarray, copies: int) -> list[np.ndarray]:
    """`copies` shifted copies (N, p, p) of uint8 images, borders replicated (TTA_SHIFTS, in order)."""
    import cv2

    if not 0 <= copies <= len(TTA_SHIFTS):
        raise ValueError(f"test_time_augmentation copies must be in 0..{len(TTA_SHIFTS)}, got {copies}")
    p = images.shape[1]
    views = []
    for dx, dy in TTA_SHIFTS[:copies]:
        m = np.float32([[1, 0, dx * p], [0, 1, dy * p]])
        views.append(np.stack([cv2.warpAffine(im, m, (p, p), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                               for im in images]))
    return views


def tta_probabilities(classifier, images: np.ndarray, copies: int = 0) -> np.ndarray:
    """Pneumonia probabilities (N,) of uint8 images (N, p, p) by training.predict, averaged over
    the images and `copies` test-time augmentation views (tta_views); what evaluate and predict compute."""
    from neumo import data, training

    def one(x):
        return training.predict(classifier, data.Fold(x, np.zeros(len(x), np.int8), np.arange(len(x))))

    if len(images) == 0:
        return np.zeros((0,), np.float32)
    views = [images, *tta_views(images, copies)]
    return np.mean([one(v) for v in views], axis=0)


def probabilities(bundle, images: np.ndarray) -> np.ndarray:
    """Pneumonia probabilities (N,) of uint8 images (N, p, p) as the evaluate stage computes them,
    averaged over the bundle's test-time augmentation copies when it has any."""
    return tta_probabilities(bundle.classifier, images, bundle.tta_copies)


def members(bundle) -> list:
    """The bundles whose probabilities are averaged: an ensemble's members (neumo.bundle.Ensemble),
    else the bundle itself."""
    return list(getattr(bundle, "members", None) or [bundle])


def _preparation(member) -> tuple:
    """What decides how a member prepares an image: members alike in it share one preparation."""
    mask = member.info["files"][member.info["mask_model"]["file"]]["sha256"] if member.mask else ""
    return member.pixels, member.clahe_clip, member.mask, mask


def prepared_probabilities(bundle, images: list[np.ndarray],
                           pool: ThreadPoolExecutor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, p, p) images as the (first) member prepared them, pneumonia probabilities (N,)) of
    decoded images: a single bundle's (prepare, probabilities), or the mean over an ensemble's members
    of each member's probabilities on its own preparation, with its own test-time augmentation."""
    group = members(bundle)
    if len(group) == 1:
        prepared = prepare(group[0], images, pool)
        return prepared, probabilities(group[0], prepared)
    done: dict[tuple, np.ndarray] = {}
    per_member = []
    for member in group:
        key = _preparation(member)
        if key not in done:
            done[key] = prepare(member, images, pool)
        per_member.append(probabilities(member, done[key]))
    return done[_preparation(group[0])], np.mean(per_member, axis=0)


def overlay(image: np.ndarray, cam: np.ndarray, size: int = 256) -> np.ndarray:
    """A BGR picture of a uint8 (p, p) image with its Grad-CAM heat map (0-1) blended over it,
    enlarged to at least `size` px."""
    import cv2

    heat = cv2.applyColorMap(np.uint8(np.clip(cam, 0, 1) * 255), cv2.COLORMAP_JET)
    picture = cv2.addWeighted(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), 0.65, heat, 0.35, 0)
    side = max(size, image.shape[0])
    return cv2.resize(picture, (side, side), interpolation=cv2.INTER_NEAREST) if side != image.shape[0] else picture


def score(bundle, items: list[dict], out_dir: str, batch: int = BATCH, gradcam: bool = True) -> list[dict]:
    """The predictions.csv rows of `items` (list_inputs'), in their order; Grad-CAM overlays to
    out_dir/gradcam/. Files that cannot be used get their reason and no probability. `bundle`: a
    loaded Bundle or Ensemble (the members' probabilities averaged; the OOD check and Grad-CAM from
    the first member)."""
    import cv2

    from neumo import models, ood

    rows = {it["index"]: {"file": it["file"], "status": it["status"], "reason": it["reason"]} for it in items}
    todo = [it for it in items if not it["status"]]
    done, start = 0, time.monotonic()
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="predict-read") as pool:
        for lo in range(0, len(todo), batch):
            chunk = todo[lo:lo + batch]
            read = list(pool.map(lambda it: read_image(it["file"], it["size"]), chunk))
            good = []
            for it, (image, reason) in zip(chunk, read):
                if image is None:
                    rows[it["index"]].update(status="rejected", reason=reason)
                else:
                    good.append((it, image))
            if good:
                images, probs = prepared_probabilities(bundle, [im for _, im in good], pool)
                scores = ood.score(bundle.classifier, images, bundle.ood) if bundle.ood else np.full(len(good), np.nan)
                flagged = ood.flags(scores, bundle.ood) if bundle.ood else np.zeros(len(good), bool)
                cams = models.grad_cam(bundle.classifier, imaging.zscore(images)) if gradcam else None
                for k, ((it, _), p) in enumerate(zip(good, probs)):
                    row = rows[it["index"]]
                    row.update(status="predicted", probability=float(p),
                               decision=NO_CALL if flagged[k] else LABELS[int(p >= bundle.threshold)])
                    if np.isfinite(scores[k]):
                        row["ood_score"] = round(float(scores[k]), 4)
                    if flagged[k]:
                        row["warning"] = (f"outside the training distribution (score {scores[k]:.2f} > "
                                          f"{bundle.ood['threshold']:.2f})")
                    if cams is not None:
                        name = f"{GRADCAM}/{it['index']:06d}.png"
                        storage.write_bytes(storage.join(out_dir, name),
                                            cv2.imencode(".png", overlay(images[k], cams[k]))[1].tobytes())
                        row["gradcam"] = name
            done += len(chunk)
            rate = done / (time.monotonic() - start or 1e-9)
            logger.info("predict: %d/%d files, %.1f files/s", done, len(todo), rate)
    return [rows[it["index"]] for it in items]


# --- outputs --------------------------------------------------------------------------------------

def write_csv(rows: list[dict], out_dir: str) -> str:
    uri = storage.join(out_dir, CSV)
    storage.write_bytes(uri, ingest.csv_bytes(rows, COLUMNS))
    return uri


def read_csv(uri: str) -> list[dict]:
    """The rows of a predictions.csv (probability as float, None when not scored)."""
    from neumo import cells

    rows = [cells.unescape_row(r) for r in csv.DictReader(io.StringIO(ingest.read_csv_text(uri)))]
    for r in rows:
        r["probability"] = float(r["probability"]) if r.get("probability") else None
    return rows


def page(rows: list[dict], info: dict) -> str:
    """index.html: every scored image with its Grad-CAM overlay, most probable pneumonia first; then
    the files that were not scored, with the reason."""
    esc = html.escape
    scored = sorted((r for r in rows if r.get("probability") not in (None, "")), key=lambda r: -float(r["probability"]))
    other = [r for r in rows if r.get("probability") in (None, "")]
    threshold = float(info["decision"]["threshold"])
    cards = []
    for r in scored:
        p = float(r["probability"])
        colour = "#b00" if r["decision"] == LABELS[1] else "#06c" if r["decision"] == LABELS[0] else "#a60"
        img = f'<img src="{esc(r["gradcam"])}" alt="">' if r.get("gradcam") else ""
        warning = f'<div class="warn">{esc(r["warning"])}</div>' if r.get("warning") else ""
        cards.append(f'<figure>{img}<figcaption><b style="color:{colour}">{esc(r["decision"])}</b> p={p:.3f}'
                     f'<br><code>{esc(str(r["file"]))}</code>{warning}</figcaption></figure>')
    table = "".join(f"<tr><td><code>{esc(str(r['file']))}</code></td><td>{esc(r['status'])}</td>"
                    f"<td>{esc(r['reason'])}</td></tr>" for r in other)
    head = (f"<h1>Predictions</h1><p>{len(scored)} image(s) scored, {len(other)} file(s) not; call PNEUMONIA when "
            f"p &ge; {threshold:.3f} (policy {esc(str(info['decision'].get('policy', '')))}); model: "
            f"{_model_text(info)}. Overlays: Grad-CAM, where the model looked (red = most).</p>")
    style = ("body{font-family:sans-serif;margin:2em}figure{display:inline-block;width:260px;margin:6px;"
             "vertical-align:top}figure img{width:256px}figcaption{font-size:12px;word-break:break-all}"
             ".warn{color:#a60}table{border-collapse:collapse}td{border:1px solid #ccc;padding:3px 8px;font-size:13px}")
    rest = f"<h2>Not scored</h2><table><tr><th>file</th><th>status</th><th>reason</th></tr>{table}</table>" if other else ""
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>neumo predictions</title><style>{style}'
            f"</style></head><body>\n{head}\n{''.join(cards)}\n{rest}\n</body></html>\n")


def _model_text(info: dict) -> str:
    """Which model scored, for the page (HTML-escaped)."""
    esc = html.escape
    trial = info.get("trial", {})
    if info.get("kind") == "ensemble":
        return (f"an ensemble of {len(info['members'])} models (run {esc(str(trial.get('run_id') or ''))}), their "
                "probabilities averaged; overlays and the OOD check from the first")
    return (f"run {esc(str(trial.get('run_id', '')))}, round {esc(str(trial.get('round', '')))}, trial "
            f"{esc(str(trial.get('trial', '')))}, {info['preprocessing']['pixels']} px, mask="
            f"{info['preprocessing']['mask']}")


def summary(rows: list[dict]) -> dict:
    from collections import Counter

    status = Counter(r["status"] for r in rows)
    return {"files": len(rows), "predicted": status["predicted"], "rejected": status["rejected"],
            "skipped": status["skipped"], "pneumonia": sum(r.get("decision") == LABELS[1] for r in rows),
            "warnings": sum(bool(r.get("warning")) for r in rows)}


def run(bundle_uri: str, inputs: list[str], out_dir: str) -> dict:
    """`neumo predict`: load the bundle, score every file under `inputs` (folders, gs:// prefixes,
    files), write predictions.csv, the overlays and index.html to out_dir; returns a summary."""
    from neumo import bundle as bundles

    loaded = bundles.load(bundle_uri)
    return write(loaded, score(loaded, list_inputs(inputs), out_dir), out_dir)


def write(loaded, rows: list[dict], out_dir: str) -> dict:
    """predictions.csv and index.html of scored rows in out_dir; the summary."""
    csv_uri = write_csv(rows, out_dir)
    storage.write_text(storage.join(out_dir, PAGE), page(rows, loaded.info))
    result = {**summary(rows), "predictions": csv_uri, "page": storage.join(out_dir, PAGE)}
    logger.info("predict: %d files: %d predicted (%d PNEUMONIA, %d warnings), %d rejected, %d skipped", result["files"],
                result["predicted"], result["pneumonia"], result["warnings"], result["rejected"], result["skipped"])
    return result


def gather(parts: list[str], out_dir: str, info: dict) -> dict:
    """One predictions.csv, index.html and gradcam/ folder in out_dir from the outputs of several
    scored shards (`parts`, in shard order); returns the summary."""
    rows = []
    for part in parts:
        for r in read_csv(storage.join(part, CSV)):
            if r.get("gradcam"):
                storage.write_bytes(storage.join(out_dir, r["gradcam"]), storage.read_bytes(storage.join(part, r["gradcam"])))
            rows.append(r)
    csv_uri = write_csv(rows, out_dir)
    storage.write_text(storage.join(out_dir, PAGE), page(rows, info))
    return {**summary(rows), "predictions": csv_uri}
