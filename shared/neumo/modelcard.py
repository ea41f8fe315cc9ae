"""A model card per bundle, written from the evaluation (never by hand), as Markdown and as an HTML
fragment for the aggregate report.

Every number comes from the arguments: the bundle's description (`info`), evaluate's
evaluation.json (`evaluation`) and predictions.csv rows (`predictions`), optionally the ingest
manifest (training counts, the patient split, image size bands) and the OOD reference
(:mod:`neumo.ood`). A missing piece gives a sentence saying what is missing, never an error.
Measured failure modes are cited by reference to where they are measured (README: Science;
benchmarks/README.md), not copied.

The card is a list of sections, each a list of blocks (paragraph, bullet list, table, image), so
the Markdown and the HTML say the same thing.
"""

from __future__ import annotations

import base64
import html as htmlmod
import logging
import math
import os
from collections import Counter, defaultdict

import numpy as np

from neumo import evaluation

logger = logging.getLogger(__name__)

#: What each evaluated split is (evaluation.EVAL_SPLITS).
SPLIT_MEANING = {
    "valid": "held-out patients of the official train split (our patient-level validation fold; it chose the "
             "threshold and the best epoch, so its figures are optimistic)",
    "val": "the official Kermany val split (16 images in the Kaggle release: intervals are wide)",
    "test": "the official Kermany test split",
    "test+val": "the official test and val splits pooled",
}
SPLIT_ORDER = ("test", "val", "test+val", "valid")
#: predictions.csv's rows of the valid images' acquisition-shifted copies (evaluate's "shifted"): not
#: a dataset split, so the card's per-split figures (metrics, subgroups, calibration) leave them out.
SHIFTED = "shifted"
BANDS = ("small", "medium", "large")
Z95 = 1.959963984540054


# --- numbers -----------------------------------------------------------------------------------

def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion; (NaN, NaN) with n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if successes <= 0 else max(0.0, centre - half)), (1.0 if successes >= n else min(1.0, centre + half))


def _num(value, default=float("nan")) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _rows(predictions: list[dict]) -> list[dict]:
    """predictions.csv rows with typed target, probability and predicted (CSV strings accepted);
    rows without a 0/1 target or a finite probability are left out (logged), and so are the valid
    fold's acquisition-shifted copies (split SHIFTED)."""
    out, dropped = [], 0
    for r in predictions or []:
        if str(r.get("split", "")) == SHIFTED:
            continue
        target, prob = _num(r.get("target")), _num(r.get("probability"))
        if target not in (0.0, 1.0) or not math.isfinite(prob):
            dropped += 1
            continue
        predicted = _num(r.get("predicted"), float("nan"))
        out.append({"id": str(r.get("id", "")), "split": str(r.get("split", "")), "target": int(target),
                    "probability": prob, "predicted": int(predicted) if predicted in (0.0, 1.0) else None})
    if dropped:
        logger.warning("model card: %d prediction row(s) without a 0/1 target or a probability left out", dropped)
    return out


def _ordered_splits(names) -> list[str]:
    names = list(dict.fromkeys(names))
    return [s for s in SPLIT_ORDER if s in names] + sorted(s for s in names if s not in SPLIT_ORDER)


def _by_split(rows: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for r in rows:
        groups[r["split"]].append(r)
    return {s: groups[s] for s in _ordered_splits(groups)}


def _threshold(info: dict, evaluation_: dict) -> float:
    t = _num(info.get("threshold"))
    if math.isfinite(t):
        return t
    return next((_num(e.get("threshold")) for e in evaluation_.get("eval", []) if math.isfinite(_num(e.get("threshold")))),
                float("nan"))


def _called(r: dict, threshold: float) -> int:
    """The stored call, else the probability against the threshold."""
    if r["predicted"] is not None:
        return r["predicted"]
    return int(r["probability"] >= threshold)


def subtype(image_id: str) -> str:
    """bacterial / viral from a Kermany PNEUMONIA file name (`person1_bacteria_1.jpeg`,
    `person1_virus_6.jpeg`); "unspecified" otherwise."""
    name = os.path.basename(image_id).lower()
    return "bacterial" if "bacteria" in name else "viral" if "virus" in name else "unspecified"


def subtypes(predictions: list[dict], threshold: float = 0.5) -> list[dict]:
    """Sensitivity per pneumonia subtype and split: [{split, subtype, n, detected, sensitivity,
    low, high}] (Wilson 95% intervals); subtypes with no image are left out."""
    out = []
    for split, rows in _by_split(_rows(predictions)).items():
        for kind in ("bacterial", "viral", "unspecified"):
            pos = [r for r in rows if r["target"] == 1 and subtype(r["id"]) == kind]
            if not pos:
                continue
            hit = sum(_called(r, threshold) for r in pos)
            lo, hi = wilson(hit, len(pos))
            out.append({"split": split, "subtype": kind, "n": len(pos), "detected": hit,
                        "sensitivity": hit / len(pos), "low": lo, "high": hi})
    return out


def _sizes(manifest: list[dict] | None) -> dict[str, tuple[int, int]]:
    out = {}
    for m in manifest or []:
        w, h = _num(m.get("width")), _num(m.get("height"))
        if math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0:
            out[str(m.get("id", ""))] = (int(w), int(h))
    return out


def size_bands(predictions: list[dict], manifest: list[dict] | None, threshold: float = 0.5) -> dict:
    """Metrics per band of the original image size (the manifest's width x height, before the
    resize): terciles of the shorter side over every evaluated image the manifest knows.
    Returns {"edges": [...], "rows": [{split, band, range, n, normal, pneumonia, sensitivity
    (+low/high), specificity (+low/high), auc}], "reason": why there are no bands, or ""}."""
    sizes = _sizes(manifest)
    rows = [r for r in _rows(predictions) if r["id"] in sizes]
    if not manifest:
        return {"edges": [], "rows": [], "reason": "no ingest manifest given: the original image sizes are unknown"}
    if not rows:
        return {"edges": [], "rows": [], "reason": "no evaluated image is in the manifest"}
    side = np.array([min(sizes[r["id"]]) for r in rows])
    if np.unique(side).size < 2:
        w, h = sizes[rows[0]["id"]]
        return {"edges": [], "rows": [], "reason": f"every evaluated image is {w}x{h} px in the manifest: no size bands"}
    distinct = np.unique(side)
    # terciles; with three sizes or fewer, one band per size (quantiles would merge two of them)
    edges = distinct[:-1] if distinct.size <= 3 else np.unique(np.quantile(side, [1 / 3, 2 / 3]))
    band = np.searchsorted(edges, side, side="left")  # <= first edge, <= second, above
    names = BANDS if len(edges) == 2 else ("smaller", "larger")
    out = []
    for split in _by_split(rows):
        for b, name in enumerate(names):
            pick = [i for i, r in enumerate(rows) if r["split"] == split and band[i] == b]
            if not pick:
                continue
            members = [rows[i] for i in pick]
            t = np.array([r["target"] for r in members])
            called = np.array([_called(r, threshold) for r in members])
            pos, neg = int(t.sum()), int((1 - t).sum())
            tp, tn = int(np.sum(called[t == 1])), int(np.sum(1 - called[t == 0]))
            sens, spec = wilson(tp, pos), wilson(tn, neg)
            lo, hi = int(side[pick].min()), int(side[pick].max())
            out.append({"split": split, "band": name, "range": f"short side {lo}-{hi} px" if lo < hi else f"short side {lo} px",
                        "n": len(members), "normal": neg, "pneumonia": pos,
                        "sensitivity": tp / pos if pos else float("nan"), "sensitivity_low": sens[0], "sensitivity_high": sens[1],
                        "specificity": tn / neg if neg else float("nan"), "specificity_low": spec[0], "specificity_high": spec[1],
                        "auc": evaluation.auc(t, [r["probability"] for r in members])})
    return {"edges": [float(e) for e in edges], "rows": out, "reason": ""}


def calibrations(predictions: list[dict], bins: int = 10) -> dict[str, dict]:
    """evaluation.calibration per split of the predictions ({split: calibration}), for the card
    and for figures.reliability_png."""
    return {split: evaluation.calibration([r["target"] for r in rows], [r["probability"] for r in rows], bins)
            for split, rows in _by_split(_rows(predictions)).items()}


# --- formatting --------------------------------------------------------------------------------

def _f(value, digits: int = 3) -> str:
    v = _num(value)
    return f"{v:.{digits}f}" if math.isfinite(v) else "n/a"


def _ci(value, low, high) -> str:
    if not math.isfinite(_num(value)):
        return "n/a"
    if not (math.isfinite(_num(low)) and math.isfinite(_num(high))):
        return _f(value)
    return f"{_f(value)} ({_f(low)}-{_f(high)})"


def _p(text) -> tuple:
    return ("p", str(text))


def _ul(items) -> tuple:
    return ("ul", [str(i) for i in items])


def _table(headers, rows) -> tuple:
    return ("table", [str(h) for h in headers], [[str(c) for c in row] for row in rows])


def _image(alt: str, src: str, png: bytes | None = None) -> tuple:
    return ("img", alt, src, png)


# --- sections ----------------------------------------------------------------------------------

def _header(info: dict, threshold: float) -> list:
    cfg = info.get("config") or {}
    facts = [f"created {info.get('created_at') or 'unknown'}", f"code revision {info.get('git_revision') or 'unknown'}",
             f"data version {info.get('data_version') or 'unknown'}",
             f"decision threshold {_f(threshold)}"]
    what = (f"Head {cfg.get('model', '?')} on the pretrained U-Net encoder, {cfg.get('pixels', '?')} px"
            f"{', lung-masked' if str(cfg.get('mask')).lower() in ('true', '1') else ''}.") if cfg else ""
    return [_p(f"This card was written by neumo.modelcard from the bundle's evaluation ({'; '.join(facts)}). {what}")]


def _intended(ood: dict | None) -> list:
    warn = ("images the out-of-distribution check flags get a warning instead of a call (see below)"
            if ood else "this bundle carries no out-of-distribution check: every image gets a call, however unlike "
            "the training images it is")
    return [
        _p("Intended use:"),
        _ul(["Frontal (posteroanterior/anteroposterior) chest X-rays of children, like the Kermany pediatric "
             "dataset it was trained on (patients aged one to five, one hospital).",
             "A screening aid: it ranks or flags films for a radiologist to read first. Its output is a pneumonia "
             "probability and a call at the stored threshold; a person makes the diagnosis.",
             f"Batch use through the neumo pipeline or `neumo predict`; {warn}."]),
        _p("Not intended use:"),
        _ul(["Diagnosis, or any decision without a clinician reading the image.",
             "Adults: the model has never seen adult chests (see Known failure modes).",
             "Lateral views, other body parts, other modalities (CT, photographs, scans of documents).",
             "Telling bacterial from viral pneumonia, or other findings (tuberculosis, COVID-19, effusion, "
             "masses): it was trained on NORMAL vs PNEUMONIA only.",
             "Populations, hospitals or equipment unlike the training data, without a local evaluation first."]),
    ]


def _training_data(info: dict, manifest: list[dict] | None, rows: list[dict]) -> list:
    blocks = [_p("Source: Kermany D., Zhang K., Goldbaum M. (2018), 'Labeled Optical Coherence Tomography (OCT) "
                 "and Chest X-Ray Images for Classification', Mendeley Data v2, doi:10.17632/rscbjbr9sj.2 (CC BY 4.0); "
                 "pediatric chest X-rays from Guangzhou Women and Children's Medical Center, labelled NORMAL or "
                 f"PNEUMONIA. Data version (ingest's hash of ids, checksums and folds): "
                 f"{info.get('data_version') or 'unknown'}.")]
    if manifest:
        counts: dict[str, Counter] = defaultdict(Counter)
        patients: dict[str, set] = defaultdict(set)
        for m in manifest:
            fold = str(m.get("fold") or m.get("split") or "?")
            counts[fold][str(m.get("label") or "unlabelled")] += 1
            patients[fold].add(str(m.get("patient_id", "")))
        folds = [f for f in ("train", "valid", "val", "test", "unlabelled") if f in counts] + sorted(
            f for f in counts if f not in ("train", "valid", "val", "test", "unlabelled"))
        table = [[f, counts[f].get("NORMAL", 0), counts[f].get("PNEUMONIA", 0), counts[f].get("unlabelled", 0),
                  sum(counts[f].values()), len(patients[f])] for f in folds]
        blocks.append(_table(["fold", "NORMAL", "PNEUMONIA", "unlabelled", "images", "patients"], table))
        shared = patients.get("train", set()) & patients.get("valid", set())
        blocks.append(_p(
            "Patient split: the official train split is divided by patient (Kermany file names: personN_ for "
            "PNEUMONIA, IM-xxxx for NORMAL), stratified by label, into train and valid folds; "
            f"{len(shared)} patient(s) appear in both train and valid. The official val and test splits keep their "
            "folds; the dataset's own train/test split is not patient-disjoint (../shared/data/README.md). "
            "Unlabelled images (NIH ChestX-ray14) only pretrain the encoder; valid, val and test images never do."))
    else:
        per = Counter((r["split"], r["target"]) for r in rows)
        blocks.append(_p("No ingest manifest was given, so the training counts and the patient split are not shown. "
                         "Evaluated images: " + (", ".join(
                             f"{s}: {per[(s, 0)]} NORMAL + {per[(s, 1)]} PNEUMONIA" for s in _ordered_splits(
                                 s for s, _ in per)) or "none") + "."))
    return blocks


def _preprocessing(info: dict) -> list:
    pre = info.get("preprocessing") or {}
    cfg = info.get("config") or {}
    pixels = pre.get("pixels", cfg.get("pixels", "?"))
    mask = pre.get("mask", cfg.get("mask"))
    clip = pre.get("clahe_clip")
    clip_text = "OpenCV's default 40" if clip in (None, 0, 0.0, "", "0", "0.0") else f"{clip}"
    steps = ["decode, convert to grey",
             f"resize to {pixels}x{pixels} px (INTER_LINEAR; the aspect ratio is not kept)",
             "lung mask from the segmentation U-Net applied" if str(mask).lower() in ("true", "1") else "no lung mask",
             f"CLAHE, 8x8 tiles, clip limit {clip_text}",
             "per-image z-score ((x - mean) / std; a constant image becomes 0)"]
    blocks = [_p("The research group's fixed chain (neumo.imaging), the same in training and prediction:"), _ul(steps)]
    if cfg:
        keys = ("pixels", "mask", "model", "frozen_layers", "learning_rate", "loss", "augmentation", "class_weight")
        blocks.append(_table(["hyperparameter", "value"], [[k, cfg.get(k, "n/a")] for k in keys]))
    return blocks


def _metrics(evaluation_: dict) -> list:
    rows = sorted(evaluation_.get("eval") or [], key=lambda e: _ordered_splits(
        [x.get("split", "") for x in evaluation_.get("eval") or []]).index(e.get("split", "")))
    if not rows:
        return [_p("No split was evaluated (a failed trial, or no labelled image): there are no metrics.")]
    table = [[e.get("split", "?"), e.get("n", "?"), *[_ci(e.get(k), e.get(f"{k}_low"), e.get(f"{k}_high"))
                                                   for k in ("auc", "accuracy", "sensitivity", "specificity")],
              f"{e.get('tn', '?')} / {e.get('fp', '?')} / {e.get('fn', '?')} / {e.get('tp', '?')}"] for e in rows]
    meaning = [f"{e.get('split')}: {SPLIT_MEANING.get(e.get('split'), 'as evaluated')}" for e in rows]
    return [_p("At the stored threshold; 95% percentile-bootstrap intervals over images (evaluate's `bootstrap` draws)."),
            _table(["split", "images", "AUC", "accuracy", "sensitivity", "specificity", "TN / FP / FN / TP"], table),
            _ul(meaning)]


def _threshold_section(info: dict, threshold: float) -> list:
    policy = info.get("threshold_policy") or ("Youden's J (sensitivity + specificity - 1) maximised on the valid fold "
                                              "(neumo.evaluation.youden_threshold; the higher threshold among ties)")
    return [_p(f"Threshold {_f(threshold)}: an image is called PNEUMONIA when its probability is at least this. "
               f"How it was chosen: {policy}. It was chosen on the valid fold, so that fold's sensitivity and "
               "specificity at this threshold are optimistic; on a fold the model nearly separates, Youden's J is flat "
               "and the threshold moves between folds (README: Science, 'The threshold').")]


def _subgroups(predictions: list[dict], manifest: list[dict] | None, threshold: float) -> list:
    blocks = [_p("Pneumonia subtype (from the Kermany file names: 'bacteria' or 'virus' in a PNEUMONIA image's name): "
                 "sensitivity per subtype, 95% Wilson intervals.")]
    sub = subtypes(predictions, threshold)
    if sub:
        blocks.append(_table(["split", "subtype", "pneumonia images", "called PNEUMONIA", "sensitivity (95% CI)"],
                             [[s["split"], s["subtype"], s["n"], s["detected"], _ci(s["sensitivity"], s["low"], s["high"])]
                              for s in sub]))
    else:
        blocks.append(_p("No evaluated pneumonia image: no subtype figures."))
    bands = size_bands(predictions, manifest, threshold)
    blocks.append(_p("Original image size (the manifest's width x height before the resize), terciles of the shorter "
                     "side over the evaluated images (one band per size when there are three sizes or fewer); 95% Wilson intervals."))
    if bands["rows"]:
        blocks.append(_table(["split", "band", "range", "images (NORMAL / PNEUMONIA)", "sensitivity", "specificity", "AUC"],
                             [[b["split"], b["band"], b["range"], f"{b['n']} ({b['normal']} / {b['pneumonia']})",
                               _ci(b["sensitivity"], b["sensitivity_low"], b["sensitivity_high"]),
                               _ci(b["specificity"], b["specificity_low"], b["specificity_high"]), _f(b["auc"])]
                              for b in bands["rows"]]))
    else:
        blocks.append(_p(f"No size bands: {bands['reason']}."))
    return blocks


def _calibration(cals: dict[str, dict]) -> list:
    if not cals:
        return [_p("No labelled prediction: calibration cannot be measured.")]
    blocks = [_p("Expected calibration error (ECE: the image-weighted mean gap between the share with pneumonia and "
                 "the mean predicted probability, 10 equal-width bins); the largest gap of any non-empty bin. Class "
                 "weights and the threshold move probabilities away from frequencies: read a probability as a rank, "
                 "not as a risk."),
              _table(["split", "images", "ECE", "largest bin gap"],
                     [[s, c["n"], _f(c["ece"]), _f(c["max_gap"])] for s, c in cals.items()])]
    splits = list(cals)
    bins = next(iter(cals.values()))["bins"]
    rows = []
    for i, b in enumerate(bins):
        cells = []
        for s in splits:
            c = cals[s]["bins"][i]
            cells.append(f"{c['count']}: {_f(c['confidence'], 2)} -> {_f(c['accuracy'], 2)}" if c["count"] else "0")
        rows.append([f"{b['low']:.1f}-{b['high']:.1f}", *cells])
    blocks.append(_table(["probability bin", *[f"{s}: images: mean p -> share pneumonia" for s in splits]], rows))
    return blocks


def _ood_section(ood: dict | None) -> list:
    if not ood:
        return [_p("This bundle has no out-of-distribution reference: images unlike the training data (adults, "
                   "photographs, blank frames) get a pneumonia call like any other.")]
    fitted = ood.get("fitted_on") or "the valid fold"
    return [_p(f"Method {ood.get('method', '?')}: the backbone's feature maps (taps {ood.get('taps', '?')}), "
               f"global-average-pooled, {ood.get('features', '?')} features; the score is the Mahalanobis distance to "
               f"the {ood.get('n_fit', '?')} images of {fitted} under a Ledoit-Wolf shrinkage covariance. An image "
               f"scoring above {_f(ood.get('threshold'), 2)} (the {100 * (1 - _num(ood.get('false_alarm_target'), 0.05)):.0f}th "
               f"percentile of those images' {ood.get('threshold_from') or 'scores'}) gets a warning instead of a "
               f"confident call. False-alarm rate on the valid fold (those scores): "
               f"{100 * _num(ood.get('false_alarm_rate')):.1f}%, by construction; the false-alarm "
               "rate on held-out patients and the flagged shares of adult chest X-rays and non-chest images are "
               "measured in benchmarks/README.md ('Out-of-distribution check').")]


def _failure_modes(ood: dict | None) -> list:
    return [_ul([
        "Adult chest X-rays: the model calls most adults' films pneumonia, healthy or not (adult NIH ChestX-ray14 "
        "images, ../shared/data/nih_cxr14_extra; measured in benchmarks/README.md, 'Out-of-distribution check')"
        + (". The OOD check flagged most, not all, of them there; an unflagged adult film is still no pediatric one."
           if ood else "; this bundle has no OOD check to warn."),
        "A tighter field of view (zoom) and detector noise lower specificity: a tighter view looks like pneumonia to "
        "it (README: Science on the real images, the shift tables and 'What this shows').",
        "The threshold is unstable between patient groups (README: Science, 'The threshold'); "
        "sensitivity and specificity at it vary more than the AUC does.",
        "Figures on the valid fold come from a split carved from the official train split and overstate quality on "
        "the official test split (README: Science; ../shared/docs/ANCHORS.md).",
        "Images of other sizes and aspect ratios are squashed to a square by the resize; see the size bands above.",
        "Any image gets a probability, including photographs and blank frames"
        + (" (the OOD check warns on these)." if ood else "."),
    ])]


def _gradcam_section(gradcam: str, png: bytes | None) -> list:
    if not gradcam:
        return [_p("No Grad-CAM sheet was given.")]
    return [_p("Where the model looks (Grad-CAM on the deepest encoder tap), for a few right and wrong calls of each "
               "class of the first labelled split; red: regions that drove the pneumonia probability up."),
            _image("Grad-CAM sheet", gradcam, png)]


def _sections(info: dict, evaluation_: dict, predictions: list[dict], manifest: list[dict] | None, ood: dict | None,
              gradcam: str, gradcam_png: bytes | None, reliability_png: bytes | None, reliability: str) -> list:
    info, evaluation_ = info or {}, evaluation_ or {}
    threshold = _threshold(info, evaluation_)
    rows = _rows(predictions)
    cals = calibrations(rows)
    calibration_blocks = _calibration(cals)
    if cals and (reliability or reliability_png):
        calibration_blocks.append(_image("Reliability diagram", reliability or "reliability.png", reliability_png))
    return [
        ("Model card: pneumonia classifier (pediatric chest X-rays)", _header(info, threshold)),
        ("Intended use and not-intended use", _intended(ood)),
        ("Training data", _training_data(info, manifest, rows)),
        ("Preprocessing", _preprocessing(info)),
        ("Metrics on every split", _metrics(evaluation_)),
        ("Threshold", _threshold_section(info, threshold)),
        ("Subgroups", _subgroups(rows, manifest, threshold)),
        ("Calibration", calibration_blocks),
        ("Out-of-distribution check", _ood_section(ood)),
        ("Known failure modes", _failure_modes(ood)),
        ("Grad-CAM", _gradcam_section(gradcam, gradcam_png)),
    ]


# --- an ensemble's card ------------------------------------------------------------------------

def _members_section(members: list[dict]) -> list:
    """One row per member bundle (its bundle.json): which trial, its configuration and its scores."""
    keys = ("pixels", "mask", "model", "frozen_layers", "learning_rate", "loss", "augmentation", "class_weight")
    rows = []
    for k, m in enumerate(members):
        trial, cfg = m.get("trial") or {}, m.get("config") or {}
        valid = next((e for e in m.get("evaluation") or [] if e.get("split") == "valid"), {})
        rows.append([f"{k:02d}", trial.get("run_id", ""), trial.get("round", ""), trial.get("trial", ""),
                     *[cfg.get(key, "n/a") for key in keys], _f(trial.get("score"), 4), _f(valid.get("auc")),
                     _f((m.get("decision") or {}).get("threshold")),
                     (m.get("test_time_augmentation") or {}).get("copies", 0)])
    return [_p(f"The ensemble averages the pneumonia probabilities of these {len(members)} member models; each "
               "prepares the image its own way (pixels, lung mask, CLAHE) and averages its own test-time "
               "augmentation copies first. Score: the member's selection score; threshold: its own (not used here)."),
            _table(["member", "run", "round", "trial", *keys, "score", "valid AUC", "threshold", "TTA copies"], rows)]


def _ensemble_selection(info: dict) -> list:
    trial = info.get("trial") or {}
    cal = info.get("calibration") or {}
    return [_ul([f"selection score ({trial.get('selection', '?')}): {_f(trial.get('score'), 4)}",
                 f"shift score (the worst balanced accuracy at the threshold over the valid fold as acquired and "
                 f"under each acquisition shift): {_f(trial.get('shift_score'), 4)}, worst: "
                 f"{trial.get('worst_shift') or 'n/a'}",
                 f"temperature {_f(cal.get('temperature'))}, fitted on the {cal.get('fitted_on', 'valid fold')} "
                 "(the members' averaged probabilities)"])]


def _ensemble_sections(info: dict, members: list[dict], evaluation_: dict, predictions: list[dict], ood: dict | None,
                       reliability_png: bytes | None, reliability: str) -> list:
    info, evaluation_ = info or {}, evaluation_ or {}
    threshold = _num((info.get("decision") or {}).get("threshold"))
    policy = (info.get("decision") or {}).get("policy", "?")
    rows = _rows(predictions)
    cals = calibrations(rows)
    calibration_blocks = _calibration(cals)
    if cals and (reliability or reliability_png):
        calibration_blocks.append(_image("Reliability diagram", reliability or "reliability.png", reliability_png))
    facts = [f"created {info.get('created_at') or 'unknown'}", f"data version {info.get('data_version') or 'unknown'}",
             f"decision threshold {_f(threshold)}"]
    described = {"threshold_policy": f"policy {policy}, on the members' averaged probabilities"}
    return [
        (f"Model card: ensemble of {len(members)} pneumonia classifiers (pediatric chest X-rays)",
         [_p(f"This card was written by neumo.modelcard from the ensemble's evaluation ({'; '.join(facts)}).")]),
        ("Members", _members_section(members)),
        ("Intended use and not-intended use", _intended(ood)),
        ("Metrics on every split", _metrics(evaluation_)),
        ("Threshold", _threshold_section(described, threshold)),
        ("Selection", _ensemble_selection(info)),
        ("Calibration", calibration_blocks),
        ("Out-of-distribution check", [_p("The first member's check, on the first member's preparation of the image:"),
                                       *_ood_section(ood)]),
        ("Known failure modes", _failure_modes(ood)),
    ]


def ensemble_markdown(*, info: dict, members: list[dict], evaluation: dict, predictions: list[dict],
                      ood: dict | None = None, reliability: str = "") -> str:
    """An ensemble bundle's card as Markdown: `info` its bundle.json, `members` the members'
    bundle.json, `evaluation` {"eval": rows}, `predictions` its predictions.csv rows, `ood` the
    first member's OOD reference; `reliability`: the reliability diagram beside the card (linked)."""
    return _render_md(_ensemble_sections(info, members, evaluation, predictions, ood, None, reliability))


def ensemble_html(*, info: dict, members: list[dict], evaluation: dict, predictions: list[dict],
                  ood: dict | None = None) -> str:
    """An ensemble bundle's card as an HTML fragment, the reliability diagram inlined."""
    from neumo import figures

    cals = calibrations(predictions)
    png = figures.png_bytes(figures.reliability_figure(cals)) if cals else None
    return _render_html(_ensemble_sections(info, members, evaluation, predictions, ood, png, ""))


# --- rendering ---------------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _render_md(sections: list) -> str:
    out = []
    for i, (title, blocks) in enumerate(sections):
        out += [("# " if i == 0 else "## ") + title, ""]
        for block in blocks:
            kind = block[0]
            if kind == "p":
                out += [block[1], ""]
            elif kind == "ul":
                out += [f"- {item}" for item in block[1]] + [""]
            elif kind == "table":
                out += ["| " + " | ".join(_md_cell(h) for h in block[1]) + " |", "|" + "---|" * len(block[1])]
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block[2]] + [""]
            elif kind == "img":
                out += [f"![{block[1]}]({block[2]})", ""]
    return "\n".join(out).rstrip() + "\n"


def _render_html(sections: list) -> str:
    e = htmlmod.escape
    out = ['<section class="model-card">']
    for i, (title, blocks) in enumerate(sections):
        out.append(f"<h{2 if i == 0 else 3}>{e(title)}</h{2 if i == 0 else 3}>")
        for block in blocks:
            kind = block[0]
            if kind == "p":
                out.append(f"<p>{e(block[1])}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{e(h)}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block[2])
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "img":
                src = (f"data:image/png;base64,{base64.b64encode(block[3]).decode('ascii')}" if block[3] else block[2])
                out.append(f'<img alt="{e(block[1])}" src="{e(src)}">')
    out.append("</section>")
    return "\n".join(out) + "\n"


def _read_png(uri: str) -> bytes | None:
    """The bytes of a PNG at a path or URI, or None (logged) when it cannot be read."""
    from neumo import storage

    if not uri:
        return None
    try:
        return storage.read_bytes(uri) if storage.exists(uri) else None
    except (OSError, ValueError) as err:
        logger.warning("model card: cannot read %s (%s); linked instead of inlined", uri, err)
        return None


def markdown(*, info: dict, evaluation: dict, predictions: list[dict], manifest: list[dict] | None = None,
             ood: dict | None = None, gradcam: str = "", reliability: str = "") -> str:
    """The model card as Markdown. `gradcam`: the Grad-CAM sheet's path or URI (linked);
    `reliability`: where a reliability diagram (figures.reliability_png over :func:`calibrations`)
    was written beside the card, linked when given."""
    return _render_md(_sections(info, evaluation, predictions, manifest, ood, gradcam, None, None, reliability))


def html(*, info: dict, evaluation: dict, predictions: list[dict], manifest: list[dict] | None = None,
         ood: dict | None = None, gradcam: str = "", reliability: str = "") -> str:
    """The model card as an HTML fragment (a <section>) for the aggregate report: the reliability
    diagram inlined as a base64 PNG (drawn here, or read from `reliability` when that can be read),
    the Grad-CAM sheet inlined when `gradcam` can be read (else linked)."""
    from neumo import figures

    cals = calibrations(predictions)
    png = (_read_png(reliability) or figures.png_bytes(figures.reliability_figure(cals))) if cals else None
    return _render_html(_sections(info, evaluation, predictions, manifest, ood, gradcam, _read_png(gradcam), png, ""))
