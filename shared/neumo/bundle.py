"""A model bundle: everything needed to turn a raw chest X-ray file into a decision, in one folder
(a local folder or a gs:// prefix), usable without any other artifact of the pipeline that made it.

    bundle.json       what the rest is and how to use it: format and version, the preprocessing it was
                      trained with, the decision threshold and its policy, the trial, data version, git
                      revision and image, its evaluation, and every other file's size and sha256 (written
                      last: a folder without it is not a bundle, or an unfinished one)
    model.keras       the classifier (loaded in Keras safe mode)
    model.json        training's record of it (configuration, threshold, curve summary)
    lung_mask.keras   the lung-mask model, for a masked variant only (lung_mask.h5: the group's legacy one)
    ood.json          the out-of-distribution reference (neumo.ood), fitted on the valid fold
    predictions.csv   evaluate's per-image predictions (id, split, target, probability, predicted) on test,
                      val, valid and "shifted" (the valid images under each acquisition shift): what an
                      ensemble of bundles averages (neumo.ensemble); absent in version-1 bundles
    MODEL_CARD.md     the model card (neumo.modelcard); MODEL_CARD.html: the same as an HTML fragment;
                      gradcam.png: evaluate's Grad-CAM sheet, which the card shows

An ensemble bundle (bundle.json "kind": "ensemble", neumo.ensemble.combine) holds whole member bundles
in members/00/, members/01/, ... (each verified by its own bundle.json), its own predictions.csv,
model card and bundle.json; it averages the members' probabilities and applies its own threshold.

The evaluate stage writes one per trial (`bundle/` in its output); aggregate copies the best one to
RESULTS_URI/models/best/ and this run's best to RESULTS_URI/models/RUN_ID/ (:func:`publish`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from neumo import storage

logger = logging.getLogger(__name__)

FORMAT = "neumo-model-bundle"
#: The bundle.json layout this code writes and reads; a newer one is refused with a clear message.
#: 2: predictions.csv, "kind" (single or ensemble) and "calibration"; version 1 is still read.
VERSION = 2
INFO = "bundle.json"
#: Where the evaluate stage puts a trial's bundle inside its output folder.
FOLDER = "bundle"
CLASSIFIER = "model.keras"
OOD = "ood.json"
CARD_MD, CARD_HTML = "MODEL_CARD.md", "MODEL_CARD.html"
#: The evaluate stage's Grad-CAM sheet, which the model card shows.
GRADCAM = "gradcam.png"
RELIABILITY = "reliability.png"
#: The OOD check's target false-alarm rate on in-distribution images (neumo.ood.fit).
OOD_FALSE_ALARM = 0.05
#: Where aggregate publishes bundles under the results URI.
MODELS = "models"
BEST = "best"
PREDICTIONS = "predictions.csv"
PREDICTION_COLUMNS = ["id", "split", "target", "probability", "predicted"]
#: bundle.json "kind": one classifier, or an ensemble of member bundles (absent: single).
SINGLE, ENSEMBLE = "single", "ensemble"
#: Where an ensemble keeps its member bundles (members/00, members/01, ...).
MEMBERS = "members"
REQUIRED = ("format", "version", "classifier", "preprocessing", "decision", "files")
REQUIRED_ENSEMBLE = ("format", "version", "kind", "members", "decision", "files")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _not_a_bundle(uri: str, why: str) -> ValueError:
    return ValueError(f"{uri} is not a neumo model bundle: {why} (a bundle is RESULTS_URI/models/best/, "
                      f"RESULTS_URI/models/RUN_ID/ or an evaluate output's {FOLDER}/)")


def read_info(uri: str) -> dict:
    """bundle.json of the bundle at `uri`, checked: a folder that is not a bundle (no bundle.json,
    another format, a newer version, a key missing) is a ValueError saying so in one line."""
    return _read_info_text(uri)[0]


def _read_info_text(uri: str) -> tuple[dict, str]:
    """(bundle.json checked as read_info checks it, its text as stored)."""
    path = storage.join(uri, INFO)
    if not storage.exists(path):
        raise _not_a_bundle(uri, f"no {INFO}")
    try:
        text = storage.read_text(path)
        info = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _not_a_bundle(uri, f"{INFO} is not JSON ({err})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise _not_a_bundle(uri, f"{INFO} does not say format {FORMAT!r}")
    if not isinstance(info.get("version"), int) or info["version"] > VERSION:
        raise ValueError(f"{path}: bundle format version {info.get('version')!r}; this neumo reads up to "
                         f"{VERSION}: use the neumo that made it, or a newer one")
    missing = [k for k in (REQUIRED_ENSEMBLE if kind(info) == ENSEMBLE else REQUIRED) if k not in info]
    if missing:
        raise _not_a_bundle(uri, f"{INFO} lacks {', '.join(missing)}")
    return info, text


def kind(info: dict) -> str:
    """SINGLE or ENSEMBLE (a bundle.json without "kind", version 1 included, is a single one)."""
    return ENSEMBLE if info.get("kind") == ENSEMBLE else SINGLE


def read_file(uri: str, info: dict, name: str) -> bytes:
    """The bytes of file `name` of the bundle at `uri`, checked against the size and sha256 its
    bundle.json (`info`) records: a file it does not list, or one changed since, is a ValueError."""
    if name not in info["files"]:
        raise _not_a_bundle(uri, f"{INFO} does not list {name} among its files")
    data = storage.read_bytes(storage.join(uri, name))
    want = info["files"][name]
    if len(data) != want["bytes"] or _sha256(data) != want["sha256"]:
        raise ValueError(f"{storage.join(uri, name)}: {len(data)} bytes with another sha256 than {INFO} "
                         "records: the bundle was changed or is being replaced; load it again")
    return data


def read_predictions(uri: str, info: dict | None = None) -> list[dict]:
    """The rows of the bundle's predictions.csv (checked against bundle.json; probability a float,
    target and predicted ints); a bundle without one (version 1) is a ValueError naming it."""
    import csv
    import io

    from neumo import cells

    info = info or read_info(uri)
    if PREDICTIONS not in info["files"]:
        raise ValueError(f"{uri}: the bundle has no {PREDICTIONS} (a bundle from before format version 2): evaluate "
                         "its trial again with this neumo")
    text = read_file(uri, info, PREDICTIONS).decode("utf-8", "surrogateescape")
    rows = [cells.unescape_row(r) for r in csv.DictReader(io.StringIO(text))]
    try:
        return [{"id": r["id"], "split": r["split"], "target": int(r["target"]), "probability": float(r["probability"]),
                 "predicted": int(r["predicted"])} for r in rows]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{storage.join(uri, PREDICTIONS)}: not a predictions table ({err})") from None


@dataclass
class Bundle:
    """A loaded bundle: its bundle.json (`info`), the classifier, the lung-mask model (None when the
    variant is not masked) and the OOD reference (None when the bundle has none)."""

    uri: str
    info: dict
    classifier: Any
    mask_model: Any = None
    ood: dict | None = None

    @property
    def pixels(self) -> int:
        return int(self.info["preprocessing"]["pixels"])

    @property
    def clahe_clip(self) -> float | None:
        return self.info["preprocessing"]["clahe_clip"]

    @property
    def mask(self) -> bool:
        return bool(self.info["preprocessing"]["mask"])

    @property
    def mask_pixels(self) -> int:
        return int(self.info["mask_model"]["pixels"])

    @property
    def threshold(self) -> float:
        return float(self.info["decision"]["threshold"])

    @property
    def tta_copies(self) -> int:
        return int((self.info.get("test_time_augmentation") or {}).get("copies", 0))


@dataclass
class Ensemble:
    """A loaded ensemble bundle: its bundle.json (`info`) and its loaded member Bundles. neumo.predict
    prepares each image per member, averages the members' probabilities (each with its own TTA) and
    applies the ensemble's threshold; the OOD check and Grad-CAM come from the first member."""

    uri: str
    info: dict
    members: list

    @property
    def threshold(self) -> float:
        return float(self.info["decision"]["threshold"])

    @property
    def classifier(self):
        return self.members[0].classifier

    @property
    def ood(self) -> dict | None:
        return self.members[0].ood


def load(uri: str) -> Bundle | Ensemble:
    """Load the bundle at `uri` (folder or gs://): every file checked against the size and sha256
    bundle.json records (a file changed or replaced after it was written is refused by name), the
    classifier in Keras safe mode, the lung-mask model when the variant is masked. An ensemble
    bundle gives an Ensemble of its members, each loaded (and checked) so."""
    info = read_info(uri)
    if kind(info) == ENSEMBLE:
        return _load_ensemble(uri, info)
    return _load_single(uri, info)


def _load_ensemble(uri: str, info: dict) -> Ensemble:
    """Its own files checked, each member's bundle.json checked against the sha256 the ensemble
    recorded (a member swapped after the ensemble was made is refused), then each member loaded."""
    for name in info["files"]:
        read_file(uri, info, name)
    members = []
    for folder in info["members"]:
        want = (info.get("member_info_sha256") or {}).get(folder)
        if want and _sha256(storage.read_bytes(storage.join(uri, folder, INFO))) != want:
            raise ValueError(f"{storage.join(uri, folder, INFO)}: another sha256 than the ensemble's {INFO} records: "
                             "the member was replaced after the ensemble was made")
        member = load(storage.join(uri, folder))
        if not isinstance(member, Bundle):
            raise _not_a_bundle(uri, f"its member {folder} is itself an ensemble")
        members.append(member)
    if not members:
        raise _not_a_bundle(uri, f"the ensemble's {INFO} lists no member")
    logger.info("ensemble bundle %s: %d members, threshold %.3f (%s), OOD check %s (first member's)", uri, len(members),
                info["decision"]["threshold"], info["decision"]["policy"], "on" if members[0].ood else "off")
    return Ensemble(uri=uri, info=info, members=members)


def _load_single(uri: str, info: dict) -> Bundle:
    import keras

    from neumo import masking

    work = tempfile.mkdtemp(prefix="neumo-bundle-")
    try:
        local = {}
        for name in info["files"]:
            data = read_file(uri, info, name)
            local[name] = os.path.join(work, name)
            with open(local[name], "wb") as fh:
                fh.write(data)
        for name in [info["classifier"], *([info["mask_model"]["file"]] if info["preprocessing"]["mask"] else [])]:
            if name not in local:
                raise _not_a_bundle(uri, f"{INFO} names {name} but does not list it among its files")
        classifier = keras.saving.load_model(local[info["classifier"]], compile=False, safe_mode=True)
        mask_model = masking.load(local[info["mask_model"]["file"]]) if info["preprocessing"]["mask"] else None
        ood = None
        if info.get("ood"):
            with open(local[info["ood"]["file"]]) as fh:
                ood = json.load(fh)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("bundle %s: %d px, mask=%s, threshold %.3f (%s), OOD check %s", uri, int(info["preprocessing"]["pixels"]),
                info["preprocessing"]["mask"], info["decision"]["threshold"], info["decision"]["policy"],
                "on" if ood else "off")
    return Bundle(uri=uri, info=info, classifier=classifier, mask_model=mask_model, ood=ood)


# --- writing -------------------------------------------------------------------------------------

def write(out_uri: str, *, model_dir: str, variant: dict, classifier, train_row: dict, eval_rows: list[dict],
          predictions: list[dict], valid_images, gradcam_uri: str = "", tta_copies: int = 0,
          valid_groups=None, threshold: float | None = None) -> dict | None:
    """Write the bundle of one evaluated trial to `out_uri`; returns its bundle.json (None, with a
    logged warning, when a masked variant does not say which lung-mask model made its masks: a
    variant prepared before variant.json recorded it).

    `model_dir`: the train stage's output (model.keras, model.json); `variant`: the variant's
    variant.json; `valid_images`: the valid fold's uint8 images (N, p, p), which fit the OOD
    reference, and `valid_groups` their patient ids (its threshold is cross-fitted by patient); `eval_rows`,
    `predictions`: the evaluate stage's (stored as predictions.csv, its "shifted" rows included);
    `gradcam_uri`: its Grad-CAM PNG; `threshold`: the decision threshold to store (None: model.json's;
    evaluate chooses it again when test-time augmentation changes the probabilities)."""
    meta = json.loads(storage.read_text(storage.join(model_dir, "model.json")))
    files: dict[str, bytes] = {CLASSIFIER: storage.read_bytes(storage.join(model_dir, CLASSIFIER)),
                               "model.json": storage.read_bytes(storage.join(model_dir, "model.json"))}
    masked = bool(variant["mask"])
    mask_info = None
    if masked:
        made_by = variant.get("mask_model") or {}
        if not made_by.get("uri"):
            logger.warning("no bundle for this trial: its masked variant does not record the lung-mask model that "
                           "made its masks (variant.json from before bundles); rerun preprocess")
            return None
        name = "lung_mask" + (os.path.splitext(made_by["uri"])[1].lower() or ".keras")
        files[name] = storage.read_bytes(made_by["uri"])
        mask_info = {"file": name, **{k: made_by[k] for k in ("pixels", "source", "dice", "iou") if k in made_by}}
        if "pixels" not in mask_info:
            mask_info["pixels"] = _mask_pixels(files[name], name)
    reference = _ood_reference(classifier, valid_images, valid_groups)
    if reference is not None:
        files[OOD] = json.dumps(reference).encode()
    files[PREDICTIONS] = predictions_csv(predictions)
    info = {
        "format": FORMAT, "version": VERSION, "kind": SINGLE, "created_at": _now(),
        "classifier": CLASSIFIER,
        "preprocessing": {"pixels": int(variant["pixels"]), "clahe_clip": variant.get("clahe_clip"), "mask": masked,
                          "zscore": "per image: (x - mean) / std over its pixels, 0 when constant",
                          "chain": "decode -> grey -> lung mask (masked variants) -> resize INTER_LINEAR -> "
                                   "CLAHE 8x8 -> z-score"},
        "mask_model": mask_info,
        "decision": {"threshold": float(meta["threshold"] if threshold is None else threshold),
                     "policy": meta.get("threshold_policy", train_row.get("threshold_policy", "youden")),
                     "positive": "PNEUMONIA", "negative": "NORMAL", "chosen_on": "valid fold"},
        "ood": None if reference is None else {
            "file": OOD, "method": reference["method"], "threshold": reference["threshold"],
            "false_alarm_target": reference["false_alarm_target"], "fitted_on": reference.get("fitted_on", "")},
        "test_time_augmentation": {"copies": int(tta_copies)},
        "calibration": {"temperature": float(meta.get("temperature", 1.0)), "fitted_on": "valid fold"},
        "predictions": PREDICTIONS,
        "trial": {k: train_row.get(k) for k in ("run_id", "round", "trial", "score", "model_uri") if k in train_row},
        "config": meta.get("config", {}),
        "training": {k: v for k, v in train_row.items() if k not in ("status", "error")},
        "data_version": variant.get("data_version", train_row.get("data_version", "")),
        "git_revision": train_row.get("git_revision", "") or os.environ.get("NEUMO_GIT_REVISION", ""),
        "image": train_row.get("image", "") or os.environ.get("NEUMO_IMAGE", ""),
        "evaluation": eval_rows,
    }
    if gradcam_uri and storage.exists(gradcam_uri):  # the card's picture travels with it
        files[GRADCAM] = storage.read_bytes(gradcam_uri)
    files[RELIABILITY] = reliability_png(predictions)
    card = _model_card(info, train_row, eval_rows, predictions, reference, gradcam_uri if GRADCAM in files else "")
    files[CARD_MD], files[CARD_HTML] = card[0].encode(), card[1].encode()
    info["model_card"] = CARD_MD
    _write_files(out_uri, files, info)
    logger.info("bundle written to %s (%s)", out_uri, ", ".join(sorted(files)))
    return info


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def predictions_csv(predictions: list[dict]) -> bytes:
    """predictions.csv of a bundle: PREDICTION_COLUMNS, one row per image and split."""
    from neumo import ingest

    return ingest.csv_bytes([{k: r.get(k, "") for k in PREDICTION_COLUMNS} for r in predictions], PREDICTION_COLUMNS)


def _write_files(out_uri: str, files: dict[str, bytes], info: dict) -> None:
    """The files, then bundle.json (listing their sizes and sha256) last: a reader never finds a
    bundle.json whose files are not all in place."""
    info["files"] = {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in sorted(files.items())}
    for name, data in files.items():
        storage.write_bytes(storage.join(out_uri, name), data)
    storage.write_text(storage.join(out_uri, INFO), json.dumps(info, indent=2, default=str))


def _mask_pixels(data: bytes, name: str) -> int:
    from neumo import masking

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as fh:
            fh.write(data)
        return masking.model_pixels(masking.load(path))


def _ood_reference(classifier, valid_images, groups=None) -> dict | None:
    """The OOD reference fitted on the valid fold, its threshold cross-fitted by patient (`groups`)
    (None, logged, with fewer than 2 images)."""
    from neumo import ood

    if valid_images is None or len(valid_images) < 2:
        logger.warning("no OOD reference in the bundle: the valid fold has fewer than 2 images")
        return None
    return ood.fit(classifier, valid_images, OOD_FALSE_ALARM, groups=groups, fitted_on="valid fold")


def _model_card(info, train_row, eval_rows, predictions, reference, gradcam_uri) -> tuple[str, str]:
    """(Markdown, HTML fragment) of the model card (neumo.modelcard)."""
    from neumo import modelcard

    described = {**info, "threshold": info["decision"]["threshold"], "threshold_policy": info["decision"]["policy"]}
    args = dict(info=described, evaluation={"train": train_row, "eval": eval_rows}, predictions=predictions,
                ood=reference)
    # the Markdown links the copy beside it; the HTML fragment (for the report) inlines the picture
    return (modelcard.markdown(**args, gradcam=GRADCAM if gradcam_uri else "", reliability=RELIABILITY),
            modelcard.html(**args, gradcam=gradcam_uri))


def reliability_png(predictions: list[dict]) -> bytes:
    """The reliability diagram of every evaluated split (not the shifted copies: modelcard.calibrations),
    for the Markdown card beside it."""
    from neumo import figures, modelcard

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, RELIABILITY)
        figures.reliability_png(modelcard.calibrations(predictions), path)
        with open(path, "rb") as fh:
            return fh.read()


# --- publishing ----------------------------------------------------------------------------------

def copy(src_uri: str, dest_uri: str) -> dict:
    """Copy the bundle at `src_uri` to `dest_uri` (replacing any bundle there): its bundle.json is
    removed first and written last (as it was stored), and files the new bundle does not list are
    removed, so a reader finds the old bundle, none, or the new one (load() refuses a mix by its
    checksums). An ensemble's member bundles are copied with it."""
    info, text = _read_info_text(src_uri)
    marker = _unmark(dest_uri)
    members = info["members"] if kind(info) == ENSEMBLE else []
    for folder in members:
        copy(storage.join(src_uri, folder), storage.join(dest_uri, folder))
    for name in info["files"]:
        storage.write_bytes(storage.join(dest_uri, name), storage.read_bytes(storage.join(src_uri, name)))
    _remove_stale(dest_uri, info["files"], members)
    storage.write_text(marker, text)
    return info


def _unmark(dest_uri: str) -> str:
    """Remove the bundle.json at dest_uri (if any): from here until it is written again, no reader
    takes the folder for a bundle. Returns its URI."""
    marker = storage.join(dest_uri, INFO)
    if storage.exists(marker):
        storage.delete(marker)
    return marker


def _remove_stale(dest_uri: str, files, member_folders) -> None:
    """Delete every file under dest_uri that is neither one of `files` nor under a member folder."""
    folders = tuple(f.rstrip("/") + "/" for f in member_folders)
    for stale in storage.list_files(dest_uri):
        rel = storage.relative(stale, dest_uri)
        if rel not in files and not rel.startswith(folders):
            storage.delete(stale)


def write_ensemble(out_uri: str, *, member_uris: list[str], files: dict[str, bytes], info: dict) -> dict:
    """Write an ensemble bundle to `out_uri` (replacing any bundle there): each member bundle copied
    whole to members/00, members/01, ... (:func:`copy`), the ensemble's own `files`, then its
    bundle.json (`info` completed with "members", each member's bundle.json sha256 and the
    own files' listing) last. Returns the bundle.json written."""
    marker = _unmark(out_uri)
    folders = [f"{MEMBERS}/{k:02d}" for k in range(len(member_uris))]
    checksums = {}
    for src, folder in zip(member_uris, folders):
        copy(src, storage.join(out_uri, folder))
        checksums[folder] = _sha256(storage.read_bytes(storage.join(out_uri, folder, INFO)))
    info = {**info, "kind": ENSEMBLE, "members": folders, "member_info_sha256": checksums,
            "files": {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in sorted(files.items())}}
    for name, data in files.items():
        storage.write_bytes(storage.join(out_uri, name), data)
    _remove_stale(out_uri, info["files"], folders)
    storage.write_text(marker, json.dumps(info, indent=2, default=str))
    logger.info("ensemble bundle written to %s (%d members; %s)", out_uri, len(folders), ", ".join(sorted(files)))
    return info


def _score(info: dict | None) -> float:
    """The selection score a bundle (single or ensemble) records in its "trial"; -inf when it has
    none or it is not finite (so a NaN never blocks a better bundle from models/best)."""
    try:
        score = float(info["trial"]["score"]) if info else float("-inf")
    except (KeyError, TypeError, ValueError):
        return float("-inf")
    return score if math.isfinite(score) else float("-inf")


def publish(bundle_uri: str, results_uri: str, run_id: str) -> dict:
    """Copy this run's best bundle to RESULTS_URI/models/RUN_ID/ and, when its score beats the
    bundle already at RESULTS_URI/models/best/ (or there is none), to models/best/: a scheduled
    run's consumers always find the best model so far there. Returns {"run": uri, "best": uri,
    "replaced_best": bool}."""
    run_uri = storage.join(results_uri, MODELS, run_id or "run")
    best_uri = storage.join(results_uri, MODELS, BEST)
    info = copy(bundle_uri, run_uri)
    current = read_info(best_uri) if storage.exists(storage.join(best_uri, INFO)) else None
    better = _score(info) > _score(current)
    if better:
        copy(run_uri, best_uri)
        logger.info("bundle: %s is the best model so far (score %.4f > %.4f): copied to %s", run_uri, _score(info),
                    _score(current), best_uri)
    else:
        logger.info("bundle: this run's best (score %.4f) does not beat %s (score %.4f)", _score(info), best_uri,
                    _score(current))
    return {"run": run_uri, "best": best_uri, "replaced_best": better}
