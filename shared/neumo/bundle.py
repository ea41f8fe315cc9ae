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
    MODEL_CARD.md     the model card (neumo.modelcard); MODEL_CARD.html: the same as an HTML fragment;
                      gradcam.png: evaluate's Grad-CAM sheet, which the card shows

The evaluate stage writes one per trial (`bundle/` in its output); aggregate copies the best one to
RESULTS_URI/models/best/ and this run's best to RESULTS_URI/models/RUN_ID/ (:func:`publish`).
"""

from __future__ import annotations

import hashlib
import json
import logging
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
VERSION = 1
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
REQUIRED = ("format", "version", "classifier", "preprocessing", "decision", "files")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _not_a_bundle(uri: str, why: str) -> ValueError:
    return ValueError(f"{uri} is not a neumo model bundle: {why} (a bundle is RESULTS_URI/models/best/, "
                      f"RESULTS_URI/models/RUN_ID/ or an evaluate output's {FOLDER}/)")


def read_info(uri: str) -> dict:
    """bundle.json of the bundle at `uri`, checked: a folder that is not a bundle (no bundle.json,
    another format, a newer version, a key missing) is a ValueError saying so in one line."""
    path = storage.join(uri, INFO)
    if not storage.exists(path):
        raise _not_a_bundle(uri, f"no {INFO}")
    try:
        info = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _not_a_bundle(uri, f"{INFO} is not JSON ({err})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise _not_a_bundle(uri, f"{INFO} does not say format {FORMAT!r}")
    if not isinstance(info.get("version"), int) or info["version"] > VERSION:
        raise ValueError(f"{path}: bundle format version {info.get('version')!r}; this neumo reads up to "
                         f"{VERSION}: use the neumo that made it, or a newer one")
    missing = [k for k in REQUIRED if k not in info]
    if missing:
        raise _not_a_bundle(uri, f"{INFO} lacks {', '.join(missing)}")
    return info


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


def load(uri: str) -> Bundle:
    """Load the bundle at `uri` (folder or gs://): every file checked against the size and sha256
    bundle.json records (a file changed or replaced after it was written is refused by name), the
    classifier in Keras safe mode, the lung-mask model when the variant is masked."""
    import keras

    from neumo import masking

    info = read_info(uri)
    work = tempfile.mkdtemp(prefix="neumo-bundle-")
    try:
        local = {}
        for name, want in info["files"].items():
            data = storage.read_bytes(storage.join(uri, name))
            if len(data) != want["bytes"] or _sha256(data) != want["sha256"]:
                raise ValueError(f"{storage.join(uri, name)}: {len(data)} bytes with another sha256 than {INFO} "
                                 "records: the bundle was changed or is being replaced; load it again")
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
          valid_groups=None) -> dict | None:
    """Write the bundle of one evaluated trial to `out_uri`; returns its bundle.json (None, with a
    logged warning, when a masked variant does not say which lung-mask model made its masks: a
    variant prepared before variant.json recorded it).

    `model_dir`: the train stage's output (model.keras, model.json); `variant`: the variant's
    variant.json; `valid_images`: the valid fold's uint8 images (N, p, p), which fit the OOD
    reference, and `valid_groups` their patient ids (its threshold is cross-fitted by patient); `eval_rows`, `predictions`: the evaluate stage's; `gradcam_uri`: its Grad-CAM PNG."""
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
    info = {
        "format": FORMAT, "version": VERSION, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classifier": CLASSIFIER,
        "preprocessing": {"pixels": int(variant["pixels"]), "clahe_clip": variant.get("clahe_clip"), "mask": masked,
                          "zscore": "per image: (x - mean) / std over its pixels, 0 when constant",
                          "chain": "decode -> grey -> lung mask (masked variants) -> resize INTER_LINEAR -> "
                                   "CLAHE 8x8 -> z-score"},
        "mask_model": mask_info,
        "decision": {"threshold": float(meta["threshold"]),
                     "policy": meta.get("threshold_policy", train_row.get("threshold_policy", "youden")),
                     "positive": "PNEUMONIA", "negative": "NORMAL", "chosen_on": "valid fold"},
        "ood": None if reference is None else {
            "file": OOD, "method": reference["method"], "threshold": reference["threshold"],
            "false_alarm_target": reference["false_alarm_target"], "fitted_on": reference.get("fitted_on", "")},
        "test_time_augmentation": {"copies": int(tta_copies)},
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
    files[RELIABILITY] = _reliability_png(predictions)
    card = _model_card(info, train_row, eval_rows, predictions, reference, gradcam_uri if GRADCAM in files else "")
    files[CARD_MD], files[CARD_HTML] = card[0].encode(), card[1].encode()
    info["model_card"] = CARD_MD
    _write_files(out_uri, files, info)
    logger.info("bundle written to %s (%s)", out_uri, ", ".join(sorted(files)))
    return info


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


def _reliability_png(predictions: list[dict]) -> bytes:
    """The reliability diagram of every split, for the Markdown card beside it."""
    from neumo import figures, modelcard

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, RELIABILITY)
        figures.reliability_png(modelcard.calibrations(predictions), path)
        with open(path, "rb") as fh:
            return fh.read()


# --- publishing ----------------------------------------------------------------------------------

def copy(src_uri: str, dest_uri: str) -> dict:
    """Copy the bundle at `src_uri` to `dest_uri` (replacing any bundle there): its bundle.json is
    removed first and written last, and files the new bundle does not list are removed, so a
    reader finds the old bundle, none, or the new one (load() refuses a mix by its checksums)."""
    info = read_info(src_uri)
    marker = storage.join(dest_uri, INFO)
    if storage.exists(marker):
        storage.delete(marker)
    for name in info["files"]:
        storage.write_bytes(storage.join(dest_uri, name), storage.read_bytes(storage.join(src_uri, name)))
    for stale in storage.list_files(dest_uri):
        if storage.relative(stale, dest_uri) not in info["files"]:
            storage.delete(stale)
    storage.write_text(marker, json.dumps(info, indent=2, default=str))
    return info


def _score(info: dict | None) -> float:
    try:
        return float(info["trial"]["score"]) if info else float("-inf")
    except (KeyError, TypeError, ValueError):
        return float("-inf")


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
