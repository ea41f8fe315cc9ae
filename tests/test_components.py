"""The components called as KFP calls them (their Python functions over artifact objects): each
translates KFP types, calls one stage by keyword, and fills its outputs' metadata."""

import json

import pytest
from kfp import dsl

from neumo import parameters, stages, synthetic
from neumo.trial import KEYS

D = parameters.defaults()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("components")
    synthetic.write_kaggle(str(root / "images"), {"train": (6, 6), "test": (2, 2)}, size=64, seed=0)
    return root


def _artifact(kind, path):
    return kind(uri=str(path))


def test_fingerprint_ingest_and_plan(dataset, tmp_path):
    from components.fingerprint.component import fingerprint
    from components.ingest.component import ingest
    from components.plan.component import plan

    version = fingerprint.python_func(dataset_uri=str(dataset / "images"), masks_uri="", pretrain_uri="")
    assert version == stages.fingerprint(dataset_uri=str(dataset / "images"))
    manifest, report = _artifact(dsl.Dataset, tmp_path / "m"), _artifact(dsl.Markdown, tmp_path / "report.md")
    ingest.python_func(dataset_uri=str(dataset / "images"), masks_uri="", pretrain_uri="", sample_per_class=0,
                       seed=0, data_fingerprint=version, manifest=manifest, report=report)
    assert manifest.metadata["accepted"] == 16 and manifest.metadata["data_fingerprint"] == version
    assert (tmp_path / "report.md").read_text().startswith("# Ingest report")
    space = parameters.preset("smoke")["search_space"]
    planned = plan.python_func(search_space=space, manifest=manifest, mask_model_uri="", depth=3, results_uri="",
                               config={}, clahe_clip=0.0, acquisition_copies=1, acquisition="tight")
    assert planned == [{"pixels": 64, "mask": False}]
    with pytest.raises(ValueError, match="acquisition_copies"):
        plan.python_func(search_space=space, manifest=manifest, mask_model_uri="", depth=3, results_uri="",
                         config={}, clahe_clip=0.0, acquisition_copies=9, acquisition="tight")
    with pytest.raises(ValueError, match="acquisition"):
        plan.python_func(search_space=space, manifest=manifest, mask_model_uri="", depth=3, results_uri="",
                         config={}, clahe_clip=0.0, acquisition_copies=1, acquisition="sideways")


SETTINGS = ("clahe_clip", "acquisition_copies", "pretrain_task", "pretrain_data", "frozen_layers_count",
            "threshold_policy", "acquisition", "selection")


def test_suggest_and_aggregate(tmp_path):
    from components.aggregate.component import aggregate
    from components.suggest.component import suggest

    history = _artifact(dsl.Dataset, tmp_path / "history.jsonl")
    configs = suggest.python_func(search_space=parameters.preset("smoke")["search_space"], finished=[],
                                  trials_per_round=3, seed=0, round_index=0, results_uri="", config={},
                                  history_out=history, **{k: parameters.default(k) for k in SETTINGS})
    assert [c["trial"] for c in configs] == [0, 1, 2] and all(set(KEYS) <= set(c) for c in configs)
    row = {"run_id": "r", "round": 0, "trial": 0, "status": "ok", "score": 0.75, "model_uri": "m", **configs[0]}
    tables, report = _artifact(dsl.Dataset, tmp_path / "tables"), _artifact(dsl.HTML, tmp_path / "report.html")
    aggregate.python_func(finished=[json.dumps({"train": row, "eval": []})], history=history,
                          results_uri=str(tmp_path / "results"), tables=tables, report=report,
                          **{k: parameters.default(k) for k in ("ensemble_size", "threshold_policy", "selection",
                                                                "bootstrap")})
    assert tables.metadata["trials"] == 1 and tables.metadata["best_score"] == 0.75
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "results" / "train_max_unsupervised.csv").exists()


def test_evaluate_passes_a_failed_trial_on():
    """A failed trial has no model: evaluate hands its row on with no evaluation rows."""
    from components.evaluate.component import evaluate

    row = stages.failed_row({"pixels": 64.0, "round": 1.0, "trial": 2.0}, "ValueError: boom")
    out = evaluate.python_func(train_row=json.dumps(row), classifier=dsl.Model(uri="/nonexistent/model"),
                               catalog=dsl.Dataset(uri="/nonexistent/catalog"), bootstrap=D["bootstrap"],
                               tta_copies=D["tta_copies"],
                               predictions=dsl.Dataset(uri="/nonexistent/p"), metrics=dsl.Metrics(uri="/nonexistent/x"),
                               roc=dsl.ClassificationMetrics(uri="/nonexistent/r"))
    assert json.loads(out) == {"train": row, "eval": [], "figures_uri": ""}


def test_shown_metrics_leave_out_what_kfp_cannot_hold():
    record = {"eval": [{"split": "valid", "n": 4, "loss": 0.1, "accuracy": 1.0, "auc": 1.0, "sensitivity": 1.0,
                        "specificity": 1.0, "precision": float("nan"), "f1": 1.0, "tn": 4, "fp": 0, "fn": 0, "tp": 0}],
              "roc": {"valid": {"fpr": [0, 1], "tpr": [0, 1], "thresholds": [1, 0]}}}
    shown = stages.shown_metrics(record)
    assert "valid_precision" not in shown["metrics"] and shown["metrics"]["valid_auc"] == 1.0
    assert shown["confusion"] == (["NORMAL", "PNEUMONIA"], [[4, 0], [0, 0]])
    assert stages.shown_metrics({"eval": [], "roc": {}}) is None
