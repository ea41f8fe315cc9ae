"""One function per pipeline stage, over folders and URIs: what the KFP components and the
`neumo` command both call. Every argument is passed by keyword; an argument named like a pipeline
parameter (`neumo.parameters`) means that parameter and takes its declared default. Each stage
validates its inputs first, writes its outputs into the given folder (an artifact path in Kubeflow)
and returns a small dict for the artifact's metadata."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time

import numpy as np

from neumo import ingest as listing
from neumo import evaluation, parameters, storage

logger = logging.getLogger(__name__)

D = parameters.defaults()  # each stage's defaults are the declared ones
MANIFEST = "manifest.csv"
#: Images decoded and masked per step of the mask stage (bounded memory at full resolution).
MASK_CHUNK = 32
#: The record a mask part writes beside its masks (mask with parts > 1).
MASK_PART_RECORD = "mask-part.json"


def _write_json(path: str, obj) -> None:
    storage.write_text(path, json.dumps(obj, indent=2, default=str))


def _read_json(path: str):
    return json.loads(storage.read_text(path))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- fingerprint, ingest --------------------------------------------------------------------

def fingerprint(*, dataset_uri: str, masks_uri: str = D["masks_uri"], pretrain_uri: str = D["pretrain_uri"]) -> str:
    """A short hash of what lies under the data URIs: every entry ingest would report (relative
    name, status and reason, as storage.walk finds it) and each readable file's size and version.
    Nothing is read; a bad entry changes the hash, it never stops it."""
    h = hashlib.sha256()
    for base in (dataset_uri, masks_uri, pretrain_uri):
        if not base:
            continue
        h.update(f"{base}\n".encode("utf-8", "surrogateescape"))
        for e in storage.walk(base).entries:  # one listing: names, statuses, sizes and versions
            h.update(f"{e.rel}\t{e.status}\t{e.reason}\t{e.size}\t{e.version}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def ingest(*, dataset_uri: str, out_dir: str, masks_uri: str = D["masks_uri"], pretrain_uri: str = D["pretrain_uri"],
           sample_per_class: int = D["sample_per_class"], seed: int = D["seed"],
           valid_fraction: float = listing.VALID_FRACTION, report_path: str = "") -> dict:
    """Manifest, per-file report and summary of a dataset (+ optional unlabelled set) in out_dir;
    the summary as Markdown at report_path when given. The report and summary are written first,
    so a dataset with no usable training image fails (ValueError) with both in place and no manifest."""
    config = listing.IngestConfig(dataset_uri=dataset_uri, masks_uri=masks_uri, pretrain_uri=pretrain_uri,
                                  valid_fraction=valid_fraction, sample_per_class=sample_per_class, seed=seed)
    manifest, report, summary = listing.scan(config)
    summary["data_version"] = listing.data_version(manifest)
    report_uri = storage.join(out_dir, "report.csv")
    storage.write_bytes(report_uri, listing.csv_bytes(report, listing.REPORT_COLUMNS))
    _write_json(storage.join(out_dir, "summary.json"), summary)
    if report_path:
        storage.write_text(report_path, ingest_report_markdown(summary))
    if not any(r["fold"] == "train" for r in manifest):
        counts = ", ".join(f"{summary[k]} {k}" for k in ("files", "accepted", "rejected", "duplicate", "skipped"))
        raise ValueError(f"no accepted training image under {config.dataset_uri} ({counts}): see {report_uri}")
    storage.write_bytes(storage.join(out_dir, MANIFEST), listing.csv_bytes(manifest, listing.MANIFEST_COLUMNS))
    logger.info("ingest: %s", json.dumps({k: summary[k] for k in ("files", "accepted", "rejected", "duplicate", "skipped")}))
    return summary


def load_manifest(manifest_dir: str) -> list[dict]:
    return listing.read_manifest(storage.join(manifest_dir, MANIFEST))


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

def plan(*, search_space: dict = D["search_space"], manifest_dir: str, mask_model_uri: str = D["mask_model_uri"],
         depth: int = D["depth"], results_uri: str = "", config: dict = D["config"],
         clahe_clip: float = D["clahe_clip"], acquisition_copies: int = D["acquisition_copies"],
         acquisition: str = D["acquisition"]) -> list[dict]:
    """Validate the search space (or the one `config` of a single run) against the data and the
    U-Net depth, the preprocessing settings, and check the results URI is writable, before any
    GPU time; the (pixels, mask) variants to prepare."""
    from neumo.preprocess import PreprocessConfig
    from neumo.trial import SearchSpace, TrialConfig

    if config:
        trial = TrialConfig.from_dict(config)
        search_space = {**search_space, "pixels": [trial.pixels], "mask": [trial.mask]}
    space = SearchSpace.from_dict(search_space)
    factor = 2 ** int(depth)
    bad = [p for p in space.pixels if p % factor]
    if bad:
        raise ValueError(f"search_space.pixels {bad}: pixels must be a positive multiple of 2**depth={factor} "
                         f"(depth={depth}); lower depth or use larger pixels")
    PreprocessConfig(pixels=max(space.pixels), clahe_clip=clahe_clip, acquisition_copies=acquisition_copies,
                     acquisition=acquisition)
    if results_uri:
        storage.check_writable(results_uri)  # a missing results bucket fails now, not at aggregate
    summary = _read_json(storage.join(manifest_dir, "summary.json"))
    if any(space.mask) and not summary["with_mask"] and not mask_model_uri:
        raise ValueError("search_space.mask includes true, but no image has a lung mask and no mask_model_uri was given")
    check_trainable(summary["folds"])
    return space.variants()


#: The fewest images of each class a fold needs: training needs both classes (a one-class train fold
#: "trains" to a constant and scores NaN); the valid fold chooses the threshold and the score.
MIN_PER_CLASS = {"train": 2, "valid": 1}


def check_trainable(folds: dict) -> None:
    """Refuse, before any GPU time, a dataset whose train or valid fold lacks a class or has too
    few images of one (`folds`: ingest's summary, {fold: {class: count}})."""
    from neumo.ingest import CLASSES

    short = [f"{fold} has {folds.get(fold, {}).get(label, 0)} {label} (needs >= {least})"
             for fold, least in MIN_PER_CLASS.items() for label in CLASSES
             if folds.get(fold, {}).get(label, 0) < least]
    if short:
        raise ValueError(f"the dataset cannot train and validate a classifier: {'; '.join(short)} "
                         "(ingest's summary.json; the valid fold is 20% of the train split's patients)")


# --- lung masks -----------------------------------------------------------------------------

def mask_model(*, manifest_dir: str, out_dir: str, mask_model_uri: str = D["mask_model_uri"],
               mask_pixels: int = D["mask_pixels"], mask_epochs: int = D["mask_epochs"],
               mask_max_images: int = D["mask_max_images"], filters: int = D["filters"], seed: int = D["seed"],
               planned: list[dict] | None = None, mask_depth: int | None = None) -> dict:
    """Import the given lung-mask model (`.keras` or legacy `.h5`), or train one on the masks.
    Does nothing when none of the `planned` variants (plan's output; None: assume needed) is masked.
    `mask_depth`: levels of the mask U-Net (None: the library's)."""
    from neumo import masking

    os.makedirs(out_dir, exist_ok=True)
    if planned is not None and not any(v["mask"] for v in planned):
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
            depth = {} if mask_depth is None else {"depth": mask_depth}
            config = masking.MaskModelConfig(pixels=mask_pixels, epochs=mask_epochs, filters=filters,
                                             max_images=mask_max_images, seed=seed, **depth)
            _, scores = masking.train(rows, config, out_dir)
            info = {"source": "trained", "file": "lung_mask.keras", **scores}
    _write_json(os.path.join(out_dir, "mask_model.json"), info)
    return info


def mask(*, manifest_dir: str, model_dir: str, out_dir: str, sheet_size: int = 24, model_uri: str = "",
         part: int = 0, parts: int = 1) -> dict:
    """Lung masks for every image at its original size, per-image QA and a contact sheet of
    `sheet_size` images sampled across folds and classes. masks.json records the model's file as
    other stages reach it (under `model_uri`, model_dir's URI; default model_dir), so a masked
    variant's model bundle can carry it.

    With parts > 1, only part `part` of the manifest's rows (contiguous, in manifest order, as
    even as can be) is masked into out_dir with its QA rows in a part record (MASK_PART_RECORD,
    returned): mask_gather writes the stage's output from the parts, identical to one pod's."""
    import cv2

    from neumo import imaging, masking
    from neumo.preprocess import check_part, mask_path

    check_part(part, parts)
    info = _read_json(os.path.join(model_dir, "mask_model.json"))
    if info["source"] == "none" and parts == 1:
        _write_json(os.path.join(out_dir, "masks.json"), {"available": False, "reason": info["reason"]})
        return {"available": False}
    model_info = None if info["source"] == "none" else {
        **{k: info[k] for k in ("source", "dice", "iou", "pixels") if k in info},
        "uri": storage.join(model_uri or model_dir, info["file"])}
    rows = load_manifest(manifest_dir)
    if parts > 1:
        record = {"part": part, "parts": parts, "key": _mask_key(rows, model_info, sheet_size),
                  "sheet_size": sheet_size, "mask_model": model_info, "reason": info.get("reason", ""),
                  "qa": [], "files": []}
        rows = rows[part * len(rows) // parts:(part + 1) * len(rows) // parts]
        if model_info is None:
            _write_json(storage.join(out_dir, MASK_PART_RECORD), record)
            return {"available": False, "part": part, "parts": parts}
    model = masking.load(os.path.join(model_dir, info["file"]))
    pixels = masking.model_pixels(model)
    picked = {} if parts > 1 else {r["id"]: i for i, r in enumerate(masking.sheet_rows(rows, sheet_size))}
    sheet = {kind: [None] * len(picked) for kind in ("images", "masks", "titles")}
    qa_rows = []
    for lo in range(0, len(rows), MASK_CHUNK):
        chunk = rows[lo:lo + MASK_CHUNK]
        images = [imaging.decode(listing.read_verified(r), check_damage=False) for r in chunk]  # as ingest saw them
        for r, image, m in zip(chunk, images, masking.predict_masks(model, images, pixels)):
            storage.write_bytes(mask_path(out_dir, r["id"]), cv2.imencode(".png", m.astype(np.uint8) * 255)[1].tobytes())
            qa = imaging.mask_qa(m)
            qa_rows.append({"id": r["id"], "lung_fraction": round(qa["lung_fraction"], 4),
                            "components": qa["components"], "flags": ";".join(qa["flags"])})
            if r["id"] in picked:
                for kind, v in zip(sheet, (image, m, _sheet_title(r))):
                    sheet[kind][picked[r["id"]]] = v
        logger.info("mask: %d/%d images", lo + len(chunk), len(rows))
    if parts > 1:
        record.update(qa=qa_rows, files=[storage.relative(mask_path(out_dir, r["id"]), out_dir) for r in rows])
        _write_json(storage.join(out_dir, MASK_PART_RECORD), record)
        return {"available": True, "part": part, "parts": parts, "images": len(qa_rows)}
    return _mask_outputs(out_dir, qa_rows, sheet, model_info)


def _sheet_title(row: dict) -> str:
    """A contact-sheet tile's title: class / fold, then the file name."""
    return f"{row['label'] or 'unlabelled'} / {row['fold']}\n{row['id'].rsplit('/', 1)[-1]}"


def _mask_key(rows: list[dict], model_info: dict | None, sheet_size: int) -> str:
    """A digest of what the mask stage's output depends on (every row, the model, the sheet's size):
    the parts of one run share it, a part of another manifest or model does not."""
    h = hashlib.sha256(json.dumps([model_info, sheet_size], sort_keys=True, default=str).encode())
    for r in rows:
        h.update(json.dumps([r["id"], r["uri"], r.get("checksum"), r["fold"], r["label"]], default=str).encode())
    return h.hexdigest()


def _mask_outputs(out_dir: str, qa_rows: list[dict], sheet: dict, model_info: dict) -> dict:
    """qa.csv, contact_sheet.png (when it has images), then masks.json, last: the mask stage's
    record, returned."""
    import cv2

    from neumo import masking

    storage.write_bytes(os.path.join(out_dir, "qa.csv"),
                        listing.csv_bytes(qa_rows, ["id", "lung_fraction", "components", "flags"]))
    if sheet["images"]:
        cv2.imwrite(os.path.join(out_dir, "contact_sheet.png"), masking.contact_sheet(**sheet))
    flagged = sum(1 for q in qa_rows if q["flags"])
    summary = {"available": True, "images": len(qa_rows), "flagged": flagged,
               "mean_lung_fraction": float(np.mean([q["lung_fraction"] for q in qa_rows])) if qa_rows else 0.0,
               "mask_model": model_info}
    _write_json(os.path.join(out_dir, "masks.json"), summary)
    return summary


def mask_gather(*, parts: list[str], manifest_dir: str, out_dir: str) -> dict:
    """The mask stage's output one pod would have written, from the folders of its parts (in
    order): every mask copied to its path under out_dir, qa.csv in manifest order, the contact
    sheet (its images read again, its masks from the copies), masks.json last."""
    from neumo import imaging, masking
    from neumo.preprocess import copy_files, mask_path, read_parts

    records = read_parts(parts, MASK_PART_RECORD, "mask")
    first = records[0]
    rows = load_manifest(manifest_dir)
    if _mask_key(rows, first["mask_model"], first["sheet_size"]) != first["key"]:
        raise ValueError(f"mask gather: the parts were made from another manifest than {manifest_dir}")
    if first["mask_model"] is None:
        _write_json(os.path.join(out_dir, "masks.json"), {"available": False, "reason": first["reason"]})
        return {"available": False}
    copy_files([(storage.join(uri, f), storage.join(out_dir, f)) for uri, r in zip(parts, records)
                for f in r["files"]])
    picks = masking.sheet_rows(rows, first["sheet_size"])
    sheet = {"images": [imaging.decode(listing.read_verified(r), check_damage=False) for r in picks],
             "masks": [imaging.read_grey(storage.read_bytes(mask_path(out_dir, r["id"]))) > 127 for r in picks],
             "titles": [_sheet_title(r) for r in picks]}
    logger.info("mask gather: %d masks of %d parts in %s", len(rows), len(records), out_dir)
    return _mask_outputs(out_dir, [q for r in records for q in r["qa"]], sheet, first["mask_model"])


# --- preprocess, pretrain, catalog ----------------------------------------------------------

def preprocess(*, manifest_dir: str, variant: dict, out_dir: str, masks_dir: str = "",
               clahe_clip: float = D["clahe_clip"], acquisition_copies: int = D["acquisition_copies"],
               acquisition: str = D["acquisition"], workers: int = 0, part: int = 0, parts: int = 1) -> dict:
    """Prepare one (pixels, mask) variant of every manifest image as uint8 shards per fold.
    `workers`: decoding processes (0 = one per core). With parts > 1, only part `part` of the
    variant's shards and a part record (returned), for preprocess_gather."""
    from neumo.preprocess import PreprocessConfig, prepare_variant

    config = PreprocessConfig(pixels=_as_int(variant["pixels"]), mask=bool(variant["mask"]), clahe_clip=clahe_clip,
                              workers=workers, acquisition_copies=acquisition_copies, acquisition=acquisition)
    masks = _read_json(os.path.join(masks_dir, "masks.json")) if config.mask and masks_dir else {}
    if config.mask and not masks.get("available"):
        raise ValueError("a masked variant was asked for, but the mask stage produced no masks")
    summary = _read_json(storage.join(manifest_dir, "summary.json"))
    return prepare_variant(load_manifest(manifest_dir), config, out_dir, masks_dir if config.mask else "",
                           summary["data_version"], masks.get("mask_model"), part=_as_int(part), parts=_as_int(parts))


def preprocess_parts(*, variant: dict, parts: int) -> list[dict]:
    """The items of one variant's preprocess loop: {"variant", "part", "parts"} for each part. Each
    item carries its variant: kfp.local hands a loop nested in the variant loop the inner item
    where the outer one is asked for."""
    return [{"variant": variant, "part": k, "parts": parts} for k in range(_as_int(parts))]


def preprocess_gather(*, parts: list[str], out_dir: str) -> dict:
    """The variant folder one pod would have written, from its parts' folders (in order)."""
    from neumo.preprocess import gather_variant

    return gather_variant(parts, out_dir)


def _as_int(value) -> int:
    """KFP's local runner hands the ints inside dicts over as floats."""
    return int(float(value))


def pretrain(*, variant_dir: str, out_dir: str, pretrain_epochs: int = D["pretrain_epochs"], filters: int = D["filters"],
             depth: int = D["depth"], seed: int = D["seed"], pretrain_task: str = D["pretrain_task"],
             pretrain_data: str = D["pretrain_data"]) -> dict:
    """Pretrain the U-Net autoencoder (`pretrain_task`) on the variant's unlabelled images and, by
    `pretrain_data`, its train fold (labels unused; never the valid, val or test images, which
    judge the classifiers). pretrain.json records what was done, for every trial's CSV row.

    The images are read from the shards as a stream (memory stays flat at any scale). Every GPU of
    the node trains, and with TF_CONFIG every node of a multi-worker job (neumo.distribute); then
    `out_dir` may be a gs:// or file:// URI: only the chief writes there (uploaded from a local
    folder), the other workers train alongside and keep nothing."""
    from neumo import distribute, figures, training

    strategy = distribute.strategy()  # first: a multi-worker strategy must exist before any TensorFlow op
    config = training.PretrainConfig(epochs=pretrain_epochs, filters=filters, depth=depth, seed=seed,
                                     task=pretrain_task, data=pretrain_data)
    data = training.pretraining_data(variant_dir, seed, pretrain_data)
    info = data.info
    with distribute.output_dir(out_dir) as local:
        _, curve, seconds = training.pretrain(data, config, local, strategy)
        if curve["loss"]:
            figures.curve_png({k: curve[k] for k in ("loss", "val_loss") if k in curve},
                              os.path.join(local, "loss_curve.png"), f"pretraining ({pretrain_task}), "
                              f"{info['pixels']} px, mask={info['mask']}", ylabel="reconstruction loss (MSE)")
        result = {"pixels": int(info["pixels"]), "mask": bool(info["mask"]), "task": pretrain_task,
                  "data": pretrain_data, "images": data.images, "source": data.source, "epochs": len(curve["loss"]),
                  "data_version": info.get("data_version", ""),
                  "final_loss": float(curve["loss"][-1]) if curve["loss"] else None,
                  "best_val_loss": float(min(curve["val_loss"])) if curve["val_loss"] else None,
                  "seconds": round(seconds, 1), "config": {**config.__dict__, "skip_levels": config.skip_levels}}
        _write_json(os.path.join(local, "pretrain.json"), result)
    return result


def catalog(*, variants: list[dict], backbones: list[dict], out_path: str) -> list[dict]:
    """Pair each prepared variant with its pretrained backbone, by (pixels, mask).

    `variants` and `backbones` are [{"uri": ..., "pixels": ..., "mask": ...}] (artifact URIs with
    their metadata).
    """
    def key(d):
        return _as_int(d["pixels"]), bool(d["mask"])

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

def suggest(*, search_space: dict = D["search_space"], history_in: str = "", finished: list[str], history_out: str,
            trials_per_round: int = D["trials_per_round"], seed: int = D["seed"], results_uri: str = "",
            round_index: int = 0, config: dict = D["config"], counts: dict | None = None,
            clahe_clip: float = D["clahe_clip"], acquisition_copies: int = D["acquisition_copies"],
            pretrain_task: str = D["pretrain_task"], pretrain_data: str = D["pretrain_data"],
            frozen_layers_count: str = D["frozen_layers_count"], threshold_policy: str = D["threshold_policy"],
            acquisition: str = D["acquisition"], selection: str = D["selection"]) -> list[dict]:
    """The next batch of configurations from every finished trial: earlier rounds (history_in,
    a JSON-lines file of trial records), the last round (`finished`, JSON strings) and, on the
    first round, the training CSV already at results_uri (so a recurring run continues) — only its
    rows recorded with this run's settings (the clip, copies, pretraining task and data, frozen-layer
    count, threshold policy, acquisition kind and selection score: a score under other settings is
    another experiment's). A given `config` is the batch (a single run: no tuning): `trials_per_round`
    copies of it, the k-th trained with seed + k (the members of a seed ensemble). `counts`, when given, is filled with how many
    trials were used and how many rows were skipped (each skip is logged with its reason)."""
    from neumo import results, trial, tuning

    if config:
        storage.write_text(history_out, "")
        one = trial.TrialConfig.from_dict(config).to_dict()
        return [{**one, "round": round_index, "trial": k, "seed_offset": k} for k in range(int(trials_per_round))]

    space = trial.SearchSpace.from_dict(search_space)
    _check_round(finished, round_index - 1)
    records = _read_records(history_in) + [json.loads(s) for s in finished]
    points = [_trial_point(r["train"], f"trial record {i}") for i, r in enumerate(records)]
    if results_uri and round_index == 0:
        csv_uri = storage.join(results_uri, results.TRAIN_CSV)
        previous = results.read_rows(csv_uri)
        settings = {"clahe_clip": clahe_clip, "acquisition_copies": acquisition_copies, "pretrain_task": pretrain_task,
                    "pretrain_data": pretrain_data, "frozen_layers_count": frozen_layers_count,
                    "threshold_policy": threshold_policy, "acquisition": acquisition, "selection": selection}
        from_csv = [_trial_point(r, f"{csv_uri} row {i + 2}", settings) for i, r in enumerate(previous)]  # 1: header
        points += [p for p in from_csv if p is None or space.contains(p)]
    used = [p for p in points if p is not None]
    if counts is not None:
        counts.update(used=len(used), skipped=len(points) - len(used))
    configs = tuning.suggest(space, used, trials_per_round, seed + round_index)
    storage.write_text(history_out, "".join(json.dumps(r) + "\n" for r in records))
    for i, c in enumerate(configs):
        c.update({"round": round_index, "trial": i})
    logger.info("suggest round %d: %d configurations from %d finished trials", round_index, len(configs), len(points))
    return configs


def _check_round(finished: list[str], round_index: int) -> None:
    """One failed trial never sinks a run; a round where every trial failed does (with the reasons)."""
    rows = [json.loads(s)["train"] for s in finished]
    if rows and all(r.get("status") != "ok" for r in rows):
        reasons = "; ".join(f"trial {r.get('trial')}: {r.get('error', '')[:200]}" for r in rows)
        raise RuntimeError(f"every trial of round {round_index} failed: {reasons}")


def _read_records(path: str) -> list[dict]:
    """The trial records of a JSON-lines history file ({"train": row, "eval": [rows], ...} a line)."""
    if not path or not storage.exists(path):
        return []
    records = []
    for line, text in enumerate(storage.read_text(path).splitlines(), 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {line}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("train"), dict):
            raise ValueError(f"{path} line {line}: a trial record needs a \"train\" object (its training row)")
        records.append(record)
    return records


#: What a training row from before a setting was recorded had: its score was the valid AUC, its
#: acquisition copies the tight kind.
BEFORE_RECORDED = {"selection": "auc", "acquisition": "tight"}


def _other_settings(row: dict, settings: dict) -> str:
    """How a training row's recorded settings differ from `settings` ("" when they do not; a
    setting the row does not record, from before it was recorded, is not held against it, except
    those whose value then is known: BEFORE_RECORDED)."""
    from neumo import imaging

    wanted = dict(settings)
    if "clahe_clip" in wanted:
        wanted["clahe_clip"] = imaging.clahe_limit(wanted["clahe_clip"] or None)  # 0: OpenCV's default
    differ = []
    for name, value in wanted.items():
        recorded = str(row.get(name, "")).strip() or BEFORE_RECORDED.get(name, "")
        if recorded in ("", UNKNOWN):
            continue
        try:
            same = type(value)(float(recorded) if isinstance(value, (int, float)) else recorded) == value
        except ValueError:
            same = False
        if not same:
            differ.append(f"{name}={recorded} (this run: {value})")
    return ", ".join(differ)


def _trial_point(row: dict, where: str, settings: dict | None = None) -> dict | None:
    """A training row as the optimiser sees it: the configuration and its score (None for a failed
    trial); None, with one logged reason, for a row the optimiser cannot use (a configuration that
    does not parse, a score that is not a number in [0, 1], other `settings` than this run's)."""
    from neumo import trial

    other = _other_settings(row, settings or {})
    if other:
        logger.warning("suggest: skipped %s: recorded with %s", where, other)
        return None
    try:
        point = trial.coerce(row, what=where)
        ok = str(row.get("status", "ok")).strip().lower() == "ok"
        blank = str(row.get("score", "")).strip().lower() in ("", "nan", "none")  # no score: counts as failed
        score = trial.parse_float(row.get("score"), "score", what=where) if ok and not blank else None
    except ValueError as err:  # the message names `where`
        logger.warning("suggest: skipped %s", err)
        return None
    if score is not None and not 0.0 <= score <= 1.0:
        logger.warning("suggest: skipped %s: score %r is not an AUC in [0, 1]", where, score)
        return None
    point["score"] = score
    return point


# --- one trial: train, evaluate -------------------------------------------------------------

def train(*, trial: dict, catalog_path: str, out_dir: str, model_uri: str = "", epochs: int = D["epochs"],
          batch_size: int = D["batch_size"], patience: int = D["patience"], seed: int = D["seed"], run_id: str = "",
          results_uri: str = "", frozen_layers_count: str = D["frozen_layers_count"],
          threshold_policy: str = D["threshold_policy"], selection: str = D["selection"]) -> dict:
    """Train one trial (`trial`: its configuration, with its "round" and "trial" index); returns
    its training-CSV row, which records every setting that changed what the trial saw or learnt
    (:func:`trial_context`). A trial that fails (NaN loss, out of memory, an impossible
    configuration) returns a failed row with the reason and the same settings instead of raising,
    so one trial never sinks its round. With a results_uri the training state is backed up under
    results_uri/checkpoints/RUN/round-R-trial-T every epoch and a restarted pod resumes. A trial
    with a "seed_offset" (a member of a seed ensemble) trains with seed + seed_offset."""
    seed = int(seed) + _as_int(trial.get("seed_offset", 0))
    context = trial_context(catalog_path, trial, frozen_layers_count=frozen_layers_count,
                            threshold_policy=threshold_policy, selection=selection)
    try:
        return _train(trial=trial, catalog_path=catalog_path, out_dir=out_dir, model_uri=model_uri, epochs=epochs,
                      batch_size=batch_size, patience=patience, seed=seed, run_id=run_id, results_uri=results_uri,
                      frozen_layers_count=frozen_layers_count, threshold_policy=threshold_policy, selection=selection,
                      context=context)
    except Exception as err:  # noqa: BLE001 - any failure of one trial becomes its failed row
        logger.exception("trial failed")
        return failed_row(trial, f"{type(err).__name__}: {err}", run_id, seed, context)


#: What a training row says of a setting it could not read (an impossible configuration, a missing catalog).
UNKNOWN = "unknown"
#: The settings columns of a training row beyond the trial's hyperparameters (results.TRAIN_COLUMNS).
CONTEXT_COLUMNS = ("clahe_clip", "acquisition_copies", "acquisition", "mask_model", "mask_model_dice",
                   "pretrain_task", "pretrain_data", "pretrain_epochs", "pretrain_images", "pretrain_data_version",
                   "frozen_layers_count", "threshold_policy", "selection")


def trial_context(catalog_path: str, trial: dict, *, frozen_layers_count: str = D["frozen_layers_count"],
                  threshold_policy: str = D["threshold_policy"], selection: str = D["selection"]) -> dict:
    """Every setting outside the trial's hyperparameters that changes what it sees or learns, read
    from its variant (variant.json) and backbone (pretrain.json): the effective CLAHE clip,
    acquisition copies, which lung-mask model made the masks and its Dice, the pretraining task,
    data, epochs run, images and data version, and the frozen-layer and threshold rules. Never
    raises: what cannot be read is "unknown" (its reason logged), so a failed row is complete too."""
    from neumo import imaging
    from neumo.trial import TrialConfig

    out = {k: UNKNOWN for k in CONTEXT_COLUMNS}
    out.update(frozen_layers_count=frozen_layers_count, threshold_policy=threshold_policy, selection=selection)
    try:
        cfg = TrialConfig.from_dict(trial)
        entry = _variant(catalog_path, cfg.pixels, cfg.mask)
        variant = _read_json(storage.join(entry["data_uri"], "variant.json"))
        clip = variant.get("clahe_clip")
        masker = variant.get("mask_model") or {"source": "none" if not cfg.mask else UNKNOWN}
        out.update(clahe_clip=imaging.clahe_limit(clip),
                   acquisition_copies=int(variant.get("acquisition_copies", 0)),
                   acquisition=variant.get("acquisition", "tight"),
                   mask_model=masker.get("source", UNKNOWN),
                   mask_model_dice=masker["dice"] if "dice" in masker else
                   ("none" if masker.get("source") == "none" else "not measured"))
        pretrained = _read_json(storage.join(entry["backbone_uri"], "pretrain.json"))
        out.update(pretrain_task=pretrained.get("task", "restore"), pretrain_data=pretrained.get("data", "unlabelled+train"),
                   pretrain_epochs=pretrained.get("epochs", UNKNOWN), pretrain_images=pretrained.get("images", UNKNOWN),
                   pretrain_data_version=pretrained.get("data_version") or variant.get("data_version") or UNKNOWN)
    except (ValueError, OSError, KeyError, TypeError) as err:
        logger.warning("trial settings partly unknown: %s", err)
    return out


def _train(*, trial, catalog_path, out_dir, model_uri, epochs, batch_size, patience, seed, run_id, results_uri,
           frozen_layers_count, threshold_policy, selection, context):
    from neumo import training
    from neumo.trial import TrialConfig

    cfg = TrialConfig.from_dict(trial)
    settings = training.TrainSettings(epochs=epochs, batch_size=batch_size, patience=patience, seed=seed,
                                      frozen_layers_count=frozen_layers_count, threshold_policy=threshold_policy,
                                      selection=selection)
    entry = _variant(catalog_path, cfg.pixels, cfg.mask)
    backbone = os.path.join(out_dir, "backbone.keras")
    storage.download(storage.join(entry["backbone_uri"], "autoencoder.keras"), backbone)
    os.makedirs(out_dir, exist_ok=True)
    where = _where(trial)
    checkpoint = ""
    if results_uri:
        checkpoint = storage.join(results_uri, "checkpoints", run_id or "run",
                                  f"round-{where['round']}-trial-{where['trial']}")
    result = training.train_trial(cfg, settings, entry["data_uri"], backbone, out_dir, checkpoint)
    os.remove(backbone)
    info = _read_json_safe(storage.join(entry["data_uri"], "variant.json"))
    return {
        "run_id": run_id, **where, "status": "ok", "error": "", **cfg.to_dict(), **context,
        "epochs": result.epochs, "best_epoch": result.best_epoch, "train_loss": result.train_loss,
        "val_loss": result.val_loss, "val_accuracy": result.val_accuracy, "val_auc": result.val_auc,
        "threshold": result.threshold, "shift_score": result.shift_score, "worst_shift": result.worst_shift,
        "score": result.score, "duration_s": result.duration_s,
        "model_uri": model_uri or out_dir, "data_version": info.get("data_version", ""),
        "git_revision": os.environ.get("NEUMO_GIT_REVISION", ""), "image": os.environ.get("NEUMO_IMAGE", ""),
        "seed": settings.seed, "finished_at": _now(),
    }


def _where(config: dict) -> dict:
    """The trial's place in the run: {"round": R, "trial": T}."""
    return {k: _as_int(config.get(k, 0)) for k in ("round", "trial")}


def trial_metadata(row: dict) -> dict:
    """What a trained model's artifact metadata shows: status, variant, head and a finite score."""
    meta = {k: row[k] for k in ("status", "pixels", "mask", "model") if k in row}
    score = row.get("score")
    if isinstance(score, float) and math.isfinite(score):  # KFP metadata cannot hold NaN
        meta["score"] = score
    return meta


def _read_json_safe(uri: str) -> dict:
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else {}


EVAL_SPLITS, EVAL_METRICS = evaluation.EVAL_SPLITS, evaluation.EVAL_METRICS
splits_present = evaluation.splits_present


def evaluate(*, model_dir: str, catalog_path: str, train_row: dict, out_dir: str, bootstrap: int = D["bootstrap"],
             out_uri: str = "", tta_copies: int = D["tta_copies"]) -> dict:
    """Metrics of a trained trial on each split the seed used (test, val, test+val) plus our
    patient-level validation fold, at the stored threshold and (accuracy, sensitivity,
    specificity) at 0.5; the loss is the trial's own (focal for a focal trial) as `model.evaluate`
    gives it, beside plain cross-entropy ("bce", comparable across trials); the expected
    calibration error raw and after the trial's temperature; per-image predictions (the valid
    fold's shifted copies too, split "shifted", which an ensemble's threshold and score need); ROC data.
    `tta_copies` > 0: each probability averages the image and that many shifted copies (neumo.predict).
    Returns the trial record {"train": row, "eval": [rows], "figures_uri": where the PNGs are
    (out_uri, else out_dir), "roc": {...}}; a failed trial's record has no evaluation."""
    import keras

    from neumo import bundle, data, predict, training, trial

    if train_row.get("status") != "ok":
        return {"train": train_row, "eval": [], "figures_uri": "", "roc": {}}
    meta = _read_json(os.path.join(model_dir, "model.json"))
    cfg = trial.TrialConfig.from_dict(meta["config"])
    entry = _variant(catalog_path, cfg.pixels, cfg.mask)
    classifier = keras.saving.load_model(os.path.join(model_dir, "model.keras"), compile=False, safe_mode=True)
    folds = {f: data.load_fold(entry["data_uri"], f) for f in ("test", "val", "valid", "shifted")}
    probs = {f: predict.tta_probabilities(classifier, fold.images, tta_copies) for f, fold in folds.items()}
    threshold = meta["threshold"]
    if tta_copies:  # the averaged probabilities are another model's: its threshold is chosen again, by the same rule
        shifted = {n: (f.targets, predict.tta_probabilities(classifier, f.images, tta_copies))
                   for n, f in training.by_shift(folds["shifted"]).items()}
        threshold = training.Selection.of(folds["valid"].targets, probs["valid"], shifted,
                                          meta.get("threshold_policy", "youden")).threshold
    base = {k: train_row.get(k, "") for k in ("run_id", "round", "trial", "model_uri")}
    eval_rows, roc = evaluation.split_rows(
        {f: folds[f].targets for f in ("test", "val", "valid")}, probs, threshold, resamples=bootstrap,
        base={**base, "finished_at": _now()}, policy=meta.get("threshold_policy", "youden"),
        own_loss=lambda t, p: training.trial_loss(cfg.loss, t, p), loss_function=cfg.loss,
        temperature=meta.get("temperature", 1.0))
    predictions = [{"id": i, "split": f, "target": int(y), "probability": float(q), "predicted": int(q >= threshold)}
                   for f in ("test", "val", "valid", "shifted") for i, y, q in zip(folds[f].ids, folds[f].targets, probs[f])]
    os.makedirs(out_dir, exist_ok=True)
    storage.write_bytes(os.path.join(out_dir, bundle.PREDICTIONS), bundle.predictions_csv(predictions))
    _figures(classifier, folds, probs, threshold, eval_rows, roc, out_dir)
    # everything needed to use this model on new files, in one folder (aggregate publishes the best)
    bundle.write(os.path.join(out_dir, bundle.FOLDER), model_dir=model_dir, variant=data.read_variant(entry["data_uri"]),
                 classifier=classifier, train_row=train_row, eval_rows=eval_rows, predictions=predictions,
                 valid_images=folds["valid"].images, gradcam_uri=os.path.join(out_dir, "gradcam.png"),
                 valid_groups=[listing.patient_id(str(i).rsplit("/", 1)[-1]) for i in folds["valid"].ids],
                 tta_copies=tta_copies, threshold=threshold)
    record = {"train": train_row, "eval": eval_rows, "figures_uri": out_uri or out_dir}
    _write_json(os.path.join(out_dir, "evaluation.json"), {**record, "roc": roc})
    return {**record, "roc": roc}


def shown_metrics(record: dict) -> dict | None:
    """What the Kubeflow UI shows of an evaluation: the first of test, val, test+val (else the
    valid fold), as {"metrics": {"SPLIT_NAME": value} (finite only: KFP metadata cannot hold NaN,
    e.g. precision with no positive call), "roc": (fpr, tpr, thresholds), "confusion": (labels,
    matrix)}; None when nothing was evaluated."""
    rows = record["eval"]
    shown = next((e for e in rows if e["split"] != "valid"), rows[0] if rows else None)
    if shown is None:
        return None
    split = shown["split"]
    metrics = {f"{split}_{k}": float(shown[k]) for k in (*EVAL_METRICS, "loss", "bce")
               if k in shown and math.isfinite(shown[k])}
    curve = record["roc"][split]
    return {"metrics": metrics, "roc": (curve["fpr"], curve["tpr"], curve["thresholds"]),
            "confusion": (["NORMAL", "PNEUMONIA"], [[shown["tn"], shown["fp"]], [shown["fn"], shown["tp"]]])}


def trial_record(record: dict) -> str:
    """The JSON a trial hands on to the next round and to aggregate (no ROC points)."""
    return json.dumps({k: record[k] for k in ("train", "eval", "figures_uri")})


def _figures(classifier, folds: dict, probs: dict, threshold: float, eval_rows: list[dict], roc: dict, out_dir: str,
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
    picks = [int(i) for target in (1, 0) for right in (True, False)
             for i in np.flatnonzero((fold.targets == target) & (correct == right))[:per_group]]
    if picks:
        x = imaging.zscore(fold.images[picks])
        figures.gradcam_png(images=fold.images[picks], cams=models.grad_cam(classifier, x), targets=fold.targets[picks],
                            probs=p[picks], threshold=threshold, split=split, path=os.path.join(out_dir, "gradcam.png"))


def _best_figures(ok_records: list[dict]) -> dict[str, bytes]:
    """The ROC, confusion and Grad-CAM PNGs of this run's best trial (those that can be read),
    captioned with its run, round and trial: the report may rank an earlier run's model first."""
    if not ok_records:
        return {}
    best = max(ok_records, key=lambda r: float(r["train"]["score"]))
    base, found = best.get("figures_uri", ""), {}
    for name, caption in (("roc.png", "ROC"), ("confusion.png", "Confusion matrices"),
                          ("gradcam.png", "Grad-CAM: where the model looks, right and wrong calls")):
        uri = storage.join(base, name) if base else ""
        if uri and storage.exists(uri):
            where = f"run {best['train'].get('run_id') or '(no run id)'}, round {best['train'].get('round')}"
            found[f"{caption} ({where}, trial {best['train'].get('trial')})"] = storage.read_bytes(uri)
    return found


def failed_row(config: dict, error: str, run_id: str = "", seed: int = D["seed"], context: dict | None = None) -> dict:
    """The training-CSV row of a trial that could not finish, with the reason (its configuration
    as given, ints that KFP turned into floats made ints again) and its settings (`context`, from
    :func:`trial_context`; "unknown" where none was read)."""
    from neumo.trial import KEYS

    row = {k: config.get(k, "") for k in KEYS}
    for k in ("pixels", "model", "frozen_layers"):
        if isinstance(row[k], float) and row[k].is_integer():
            row[k] = int(row[k])
    context = context or {k: UNKNOWN for k in CONTEXT_COLUMNS}
    return {"run_id": run_id, **_where(config), "status": "failed", "error": error[:500], **row, **context,
            "seed": seed, "finished_at": _now()}


# --- aggregate ------------------------------------------------------------------------------

def aggregate(*, history_in: str, finished: list[str], results_uri: str, out_dir: str, report_path: str = "",
              ensemble_size: int = D["ensemble_size"], threshold_policy: str = D["threshold_policy"],
              selection: str = D["selection"], bootstrap: int = D["bootstrap"]) -> dict:
    """Append every trial of this run to the two CSVs at results_uri (earlier rows kept byte for
    byte) and copies of this run's rows to out_dir; then write an HTML report of the whole history
    at results_uri (this run's rows marked; only this run's without a results_uri), with the
    leaderboard and plots, to out_dir (and to report_path when given). The run's model is its best
    trial by the score or, with `ensemble_size` K > 1, the ensemble of its best K trials
    (neumo.ensemble: probabilities averaged, threshold chosen again by `threshold_policy`, scored by
    `selection`; its evaluation rows, trial "ensemble", join the evaluation CSV); it is published
    under results_uri/models/. Returns this run's summary."""
    from neumo import results

    records = _read_records(history_in) + [json.loads(s) for s in finished]
    train_rows = [r["train"] for r in records]
    ok = [r for r in records if r["train"].get("status") == "ok"]
    bundled = _with_bundle(ok)  # read once: the ensemble's members and the published model come from them
    ensembled = _ensemble(bundled, ensemble_size, out_dir, threshold_policy=threshold_policy, selection=selection,
                          bootstrap=bootstrap) if ensemble_size > 1 else None
    eval_rows = [e for r in records for e in r.get("eval", [])] + (ensembled["eval_rows"] if ensembled else [])
    if results_uri:
        results.append_rows(storage.join(results_uri, results.TRAIN_CSV), train_rows, results.TRAIN_COLUMNS)
        results.append_rows(storage.join(results_uri, results.EVAL_CSV), eval_rows, results.EVAL_COLUMNS)
    os.makedirs(out_dir, exist_ok=True)
    results.append_rows(os.path.join(out_dir, results.TRAIN_CSV), train_rows, results.TRAIN_COLUMNS)
    results.append_rows(os.path.join(out_dir, results.EVAL_CSV), eval_rows, results.EVAL_COLUMNS)
    history_train, history_eval = train_rows, eval_rows
    if results_uri:  # the whole search history, this run's rows just appended
        history_train = results.read_table(storage.join(results_uri, results.TRAIN_CSV))
        history_eval = results.read_table(storage.join(results_uri, results.EVAL_CSV))
    run_ids = {str(r.get("run_id") or "") for r in train_rows}
    published = _publish_bundle(bundled, results_uri, ensembled)
    results.write_report(os.path.join(out_dir, "report.html"), history_train, history_eval, _best_figures(ok),
                         current_run=run_ids, history_uri=results_uri, model_card_html=published.get("card", ""))
    if report_path:
        storage.write_bytes(report_path, storage.read_bytes(os.path.join(out_dir, "report.html")))
    # Written first, checked after: the rows of a failed last round are kept too.
    _check_round(finished, int(records[-1]["train"].get("round", 0)) if records else 0)
    best = max(ok, key=lambda r: float(r["train"]["score"]))["train"] if ok else None
    return {"trials": len(train_rows), "failed": len(train_rows) - len(ok),
            "best_score": float(best["score"]) if best else None, "best_model_uri": best["model_uri"] if best else "",
            "ensemble_score": ensembled["score"] if ensembled else None, "bundle_uri": published.get("best", "")}


def _with_bundle(ok_records: list[dict]) -> list[dict]:
    """The finished trials with a finite score whose evaluation wrote a model bundle."""
    from neumo import bundle

    def found(r):
        base = r.get("figures_uri", "")
        return base and math.isfinite(float(r["train"]["score"])) and \
            storage.exists(storage.join(base, bundle.FOLDER, bundle.INFO))

    return [r for r in ok_records if found(r)]


def _ensemble(bundled: list[dict], size: int, out_dir: str, *, threshold_policy: str, selection: str,
              bootstrap: int) -> dict | None:
    """The ensemble of the best `size` trials (by score) of `bundled` (_with_bundle's), written to
    out_dir/ensemble (neumo.ensemble.combine); None, with the reason logged, when fewer than two."""
    from neumo import bundle, ensemble

    members = sorted(bundled, key=lambda r: float(r["train"]["score"]), reverse=True)[:size]
    if len(members) < 2:
        logger.warning("aggregate: ensemble_size=%d, but %d finished trial(s) with a model bundle: no ensemble, the "
                       "best trial is the run's model", size, len(members))
        return None
    if len(members) < size:
        logger.warning("aggregate: ensemble_size=%d, but only %d finished trials with a model bundle: they are the "
                       "ensemble", size, len(members))
    first = members[0]["train"]
    out_uri = os.path.join(out_dir, "ensemble")
    made = ensemble.combine([storage.join(r["figures_uri"], bundle.FOLDER) for r in members], out_uri,
                            policy=threshold_policy, selection=selection, resamples=bootstrap,
                            base={"run_id": first.get("run_id", ""), "round": first.get("round", ""), "trial": "ensemble",
                                  "model_uri": out_uri, "finished_at": _now()})
    logger.info("aggregate: ensemble of %d trials (%s): score %.4f (best member %.4f), threshold %.3f",
                len(members), ", ".join(f"round {r['train'].get('round')} trial {r['train'].get('trial')}" for r in members),
                made["score"], float(first["score"]), made["threshold"])
    return {**made, "uri": out_uri}


def _publish_bundle(candidates: list[dict], results_uri: str, ensembled: dict | None = None) -> dict:
    """The run's model bundle (the ensemble when one was made, else the best of `candidates`, the
    trials with a bundle (_with_bundle), by the score)
    to RESULTS_URI/models/RUN_ID/ and, when it beats the one there, to RESULTS_URI/models/best/
    (neumo.bundle.publish), with the published best's model card as HTML ("card"); {} without a
    results_uri or a model bundle."""
    from neumo import bundle

    if not results_uri or not candidates:
        return {}
    best = max(candidates, key=lambda r: float(r["train"]["score"]))
    source = ensembled["uri"] if ensembled else storage.join(best["figures_uri"], bundle.FOLDER)
    out = bundle.publish(source, results_uri, best["train"].get("run_id", ""))
    card = storage.join(out["best"], bundle.CARD_HTML)
    return {**out, "card": storage.read_text(card) if storage.exists(card) else ""}


# --- prediction with a model bundle ---------------------------------------------------------

def predict_list(*, images_uri: str, out_dir: str, shards: int = D["shards"]) -> list[int]:
    """Every file under images_uri (a folder or gs:// prefix), listed as `neumo predict` lists a
    folder, in at most `shards` parts (out_dir/shard-NNNNN.json); the parts' indices, to loop over."""
    from neumo import predict as scoring

    parts = scoring.split(scoring.list_inputs([images_uri]), shards)
    for k, part in enumerate(parts):
        _write_json(storage.join(out_dir, f"shard-{k:05d}.json"), part)
    logger.info("predict: %d files under %s in %d part(s)", sum(map(len, parts)), images_uri, len(parts))
    return list(range(len(parts)))


def predict(*, bundle_uri: str, out_dir: str, inputs: list[str] | None = None, listing_dir: str = "",
            shard: int = 0) -> dict:
    """Score files with the model bundle at bundle_uri: `inputs` (folders, gs:// prefixes, files),
    or part `shard` of predict_list's output in listing_dir. Writes predictions.csv, one Grad-CAM
    overlay per image and index.html to out_dir; returns a summary."""
    from neumo import bundle as bundles
    from neumo import predict as scoring

    if listing_dir:
        items = _read_json(storage.join(listing_dir, f"shard-{_as_int(shard):05d}.json"))
    elif inputs:
        items = scoring.list_inputs(list(inputs))
    else:
        raise ValueError("nothing to score: give input folders, gs:// prefixes or files")
    loaded = bundles.load(bundle_uri)
    return scoring.write(loaded, scoring.score(loaded, items, out_dir), out_dir)


def predict_gather(*, parts: list[str], bundle_uri: str, out_dir: str, predictions_uri: str = D["predictions_uri"],
                   run_id: str = "") -> dict:
    """One predictions.csv, page and overlay folder in out_dir from the scored parts (predict's
    out_dirs, in order); copied to predictions_uri/RUN_ID/ when a predictions_uri is given."""
    from neumo import bundle as bundles
    from neumo import predict as scoring

    result = scoring.gather(parts, out_dir, bundles.read_info(bundle_uri))
    if predictions_uri:
        dest = storage.join(predictions_uri, run_id or "run")
        for uri in storage.list_files(out_dir):
            storage.write_bytes(storage.join(dest, storage.relative(uri, out_dir)), storage.read_bytes(uri))
        result["copied_to"] = dest
    return result
