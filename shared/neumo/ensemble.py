"""Ensembles of model bundles: K member models whose pneumonia probabilities are averaged, written as
one bundle (neumo.bundle, "kind": "ensemble") that `neumo predict`, aggregate's publishing and the
model card use like a single model's.

An ensemble is made from its members' bundles alone: each carries evaluate's per-image predictions
(predictions.csv: test, val, valid and the valid images' acquisition-shifted copies), so the
ensemble's probabilities on those images are the members' means, without running a model. Its
threshold is chosen again on the averaged valid probabilities, by the same policy a trial's is
(an average of models is another model), and so are its shift score and its temperature.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import numpy as np

from neumo import bundle, evaluation, parameters, shifts

logger = logging.getLogger(__name__)

#: The splits evaluation.split_rows reports on (with "test+val" pooled from test and val).
EVALUATED = ("test", "val", "valid")
VALID, SHIFTED = "valid", "shifted"


def _check_arguments(policy: str, selection: str, member_uris: list[str], out_uri: str) -> None:
    policies, selections = parameters.BY_NAME["threshold_policy"].choices, parameters.BY_NAME["selection"].choices
    if policy not in policies:
        raise ValueError(f"threshold policy must be one of {', '.join(policies)}, got {policy!r}")
    if selection not in selections:
        raise ValueError(f"selection must be one of {', '.join(selections)}, got {selection!r}")
    if len(member_uris) < 2:
        raise ValueError(f"an ensemble needs at least 2 member bundles, got {len(member_uris)}"
                         f"{': ' + member_uris[0] if member_uris else ''}")
    twice = sorted({u for u in member_uris if member_uris.count(u) > 1})
    if twice:
        raise ValueError(f"a member bundle is given twice: {', '.join(twice)}")
    out = out_uri.rstrip("/")
    inside = [u for u in member_uris if u.rstrip("/") == out or u.startswith(out + "/")]
    if inside:
        raise ValueError(f"{inside[0]}: a member bundle cannot be (inside) the ensemble's output {out_uri}, which "
                         "is replaced: write the ensemble elsewhere")


def _read_member(uri: str) -> tuple[dict, dict[str, dict[str, tuple[int, float]]]]:
    """(bundle.json, {split: {id: (target, probability)}}) of a member; ValueError naming it when it
    is not a single bundle with predictions.csv."""
    info = bundle.read_info(uri)
    if bundle.kind(info) != bundle.SINGLE:
        raise ValueError(f"{uri}: the bundle is itself an ensemble: give its member bundles instead")
    table: dict[str, dict[str, tuple[int, float]]] = defaultdict(dict)
    for r in bundle.read_predictions(uri, info):
        table[r["split"]][r["id"]] = (r["target"], r["probability"])
    if not table.get(VALID):
        raise ValueError(f"{uri}: its predictions.csv has no valid-fold rows, which choose the ensemble's threshold")
    return info, dict(table)


def _check_same_data(uris: list[str], tables: list[dict]) -> None:
    """Every member was evaluated on the same valid fold, with the same labels (else they were
    trained on other data or another split, and their probabilities cannot be averaged)."""
    first = tables[0][VALID]
    for uri, table in zip(uris[1:], tables[1:]):
        valid = table[VALID]
        if set(valid) != set(first):
            raise ValueError(f"{uri}: its valid fold holds other images than {uris[0]}'s ({len(valid)} and "
                             f"{len(first)}, {len(set(valid) & set(first))} shared): members must come from the same "
                             "data and split")
        if any(valid[i][0] != first[i][0] for i in first):
            raise ValueError(f"{uri}: its valid fold labels some images otherwise than {uris[0]}'s: members must come "
                             "from the same data")


def average(uris: list[str], tables: list[dict]) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """{split: (ids, targets, mean probabilities)} over the members (`tables`: _read_member's), for
    the images every member has, in the first member's order; a split one member lacks is dropped
    for all (logged), and so are images not every member has."""
    splits = [s for s in tables[0] if all(s in t for t in tables)]
    for s in sorted({s for t in tables for s in t} - set(splits)):
        lacking = [u for u, t in zip(uris, tables) if s not in t]
        logger.warning("ensemble: split %r left out: member(s) %s have no prediction on it", s, ", ".join(lacking))
    out = {}
    for s in splits:
        ids = [i for i in tables[0][s] if all(i in t[s] for t in tables[1:])]
        dropped = len({i for t in tables for i in t[s]}) - len(ids)
        if dropped:
            logger.warning("ensemble: %d %s image(s) left out: not every member has a prediction for them", dropped, s)
        targets = np.array([tables[0][s][i][0] for i in ids], np.int64)
        probs = np.mean([[t[s][i][1] for i in ids] for t in tables], axis=0) if ids else np.zeros(0)
        out[s] = (ids, targets, np.asarray(probs, np.float64))
    return out


def by_shift(ids: list[str], targets: np.ndarray, probs: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The shifted copies' (targets, probabilities) by shift name (shifts.shift_of their ids), in the
    order of shifts.SHIFTS, then any other name."""
    names = np.array([shifts.shift_of(i) for i in ids])
    order = [n for n in shifts.SHIFTS if (names == n).any()] + sorted(set(names) - set(shifts.SHIFTS) - {""})
    return {n: (targets[names == n], probs[names == n]) for n in order}


def _member_summary(uri: str, info: dict) -> dict:
    trial = info.get("trial") or {}
    return {"uri": uri, **{k: trial.get(k) for k in ("run_id", "round", "trial", "score")},
            "tta_copies": int((info.get("test_time_augmentation") or {}).get("copies", 0)),
            "threshold": info["decision"]["threshold"]}


def _first_ood(uri: str, info: dict) -> dict | None:
    """The first member's OOD reference (the ensemble's check), for the card."""
    import json

    if not info.get("ood"):
        return None
    return json.loads(bundle.read_file(uri, info, info["ood"]["file"]))


def combine(member_uris: list[str], out_uri: str, *, policy: str, selection: str, resamples: int,
            base: dict | None = None) -> dict:
    """Write the ensemble of the bundles at `member_uris` (folders or gs://) to `out_uri`: their
    probabilities averaged per image (predictions.csv), the threshold chosen on the averaged valid
    fold by `policy` (pooled_shifts: with its averaged shifted copies), the shift score, the
    evaluation rows (trial "ensemble", `resamples` bootstrap draws), a temperature fitted on the
    averaged valid fold, a model card, and every member bundle inside (bundle.write_ensemble).
    `selection` ("shift" or "auc") says which score the ensemble's "trial" records (what publishing
    compares); `base`: run_id and round of the evaluation rows. ValueError in one line, naming the
    member, for fewer than 2 members, a member without predictions.csv (a bundle from before format
    version 2) or members evaluated on other valid images.
    Returns {"info", "eval_rows", "roc", "score", "shift_score", "threshold"}."""
    from neumo import modelcard, training

    member_uris = [str(u) for u in member_uris]
    _check_arguments(policy, selection, member_uris, str(out_uri))
    base = dict(base or {})
    read = [_read_member(u) for u in member_uris]
    infos, tables = [i for i, _ in read], [t for _, t in read]
    _check_same_data(member_uris, tables)
    averaged = average(member_uris, tables)
    _, valid_t, valid_p = averaged[VALID]
    shifted = by_shift(*averaged[SHIFTED]) if SHIFTED in averaged else {}
    chosen = training.Selection.of(valid_t, valid_p, shifted, policy)
    threshold, score = float(chosen.threshold), float(chosen.score(selection))
    temperature = evaluation.fit_temperature(valid_t, valid_p)
    rows, roc = evaluation.split_rows(
        {s: averaged[s][1] for s in EVALUATED if s in averaged}, {s: averaged[s][2] for s in EVALUATED if s in averaged},
        threshold, resamples=resamples, policy=policy, temperature=temperature,
        base={"run_id": base.get("run_id", ""), "round": base.get("round", ""), "trial": "ensemble", "model_uri": out_uri,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    predictions = [{"id": i, "split": s, "target": int(y), "probability": float(p), "predicted": int(p >= threshold)}
                   for s, (ids, t, probs) in averaged.items() for i, y, p in zip(ids, t, probs)]
    versions = sorted({str(i.get("data_version", "")) for i in infos})
    if len(versions) > 1:
        logger.warning("ensemble: the members record other data versions (%s); their valid folds hold the same images",
                       ", ".join(versions))
    summaries = [_member_summary(u, i) for u, i in zip(member_uris, infos)]
    info = {
        "format": bundle.FORMAT, "version": bundle.VERSION, "kind": bundle.ENSEMBLE,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "decision": {"threshold": threshold, "policy": policy, "positive": "PNEUMONIA", "negative": "NORMAL",
                     "chosen_on": "valid fold (the members' averaged probabilities)"},
        "calibration": {"temperature": float(temperature), "fitted_on": "valid fold"},
        "test_time_augmentation": {"applied": "inside each member, with its own copies, before the members are averaged",
                                   "copies_per_member": [m["tta_copies"] for m in summaries]},
        "trial": {"score": score, "selection": selection, "shift_score": float(chosen.shift["shift_score"]),
                  "worst_shift": chosen.shift["worst_shift"], "run_id": base.get("run_id")},
        "member_trials": summaries,
        "data_version": infos[0].get("data_version", ""),
        "git_revision": base.get("git_revision", "") or os.environ.get("NEUMO_GIT_REVISION", ""),
        "image": base.get("image", "") or os.environ.get("NEUMO_IMAGE", ""),
        "evaluation": rows, "predictions": bundle.PREDICTIONS, "model_card": bundle.CARD_MD,
    }
    ood = _first_ood(member_uris[0], infos[0])
    card = {"info": info, "members": infos, "evaluation": {"eval": rows}, "predictions": predictions, "ood": ood}
    files = {bundle.PREDICTIONS: bundle.predictions_csv(predictions),
             bundle.RELIABILITY: bundle.reliability_png(predictions),
             bundle.CARD_MD: modelcard.ensemble_markdown(**card, reliability=bundle.RELIABILITY).encode(),
             bundle.CARD_HTML: modelcard.ensemble_html(**card).encode()}
    written = bundle.write_ensemble(out_uri, member_uris=member_uris, files=files, info=info)
    valid_auc = next((r["auc"] for r in rows if r["split"] == VALID), float("nan"))
    logger.info("ensemble of %d: valid AUC %.4f, shift score %.4f (worst: %s), threshold %.3f (%s): %s",
                len(member_uris), valid_auc, chosen.shift["shift_score"], chosen.shift["worst_shift"], threshold, policy,
                out_uri)
    return {"info": written, "eval_rows": rows, "roc": roc, "score": score,
            "shift_score": float(chosen.shift["shift_score"]), "threshold": threshold}
