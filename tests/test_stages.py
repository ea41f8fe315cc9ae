"""Stage functions: tuning history, failure tolerance and the search space declared once."""

import json

import pytest

from neumo import parameters, results, stages, trial, tuning


def _record(trial, round_index=0, status="ok", score=0.8, **config):
    base = {"pixels": 64, "mask": False, "model": 1, "frozen_layers": 0, "learning_rate": 0.001, "loss": "bce",
            "augmentation": "none", "class_weight": False}
    base.update(config)
    row = {"run_id": "r", "round": round_index, "trial": trial, "status": status,
           "error": "" if status == "ok" else "FloatingPointError: NaN", "score": score if status == "ok" else "",
           "model_uri": f"m{round_index}{trial}", **base}
    return json.dumps({"train": row, "eval": []})


SPACE = parameters.preset("smoke")["search_space"]


def test_default_space_is_declared_once():
    """The compiled pipeline's default search space is the declared one."""
    from pipelines.full import create_pipeline

    spec = create_pipeline().pipeline_spec
    default = spec.root.input_definitions.parameters["search_space"].default_value
    assert trial.SearchSpace.from_dict(dict(default.struct_value.items())) == \
        trial.SearchSpace.from_dict(parameters.DEFAULT_SEARCH_SPACE)


def test_suggest_continues_from_the_results_csv(tmp_path):
    """A scheduled run reads the training CSV at the results URI and never repeats a configuration."""
    previous = [json.loads(_record(i, model=1 + i % 2, frozen_layers=4 * (i % 2), learning_rate=10 ** -(2 + i / 4),
                                   score=0.5 + i / 20))["train"] for i in range(6)]
    results.append_rows(str(tmp_path / results.TRAIN_CSV), previous, results.TRAIN_COLUMNS)
    configs = stages.suggest(search_space=SPACE, finished=[], trials_per_round=4, history_out=str(tmp_path / "h.jsonl"),
                             results_uri=str(tmp_path), round_index=0)
    assert len(configs) == 4
    seen = {tuning.config_key(r) for r in previous}
    assert not seen & {tuning.config_key(c) for c in configs}
    assert [c["trial"] for c in configs] == [0, 1, 2, 3] and all(c["round"] == 0 for c in configs)


def test_history_accumulates_across_rounds(tmp_path):
    h1, h2 = str(tmp_path / "h1.jsonl"), str(tmp_path / "h2.jsonl")
    stages.suggest(search_space=SPACE, finished=[], trials_per_round=2, history_out=h1, round_index=0)
    stages.suggest(search_space=SPACE, history_in=h1, finished=[_record(0), _record(1, model=2)], trials_per_round=2,
                   history_out=h2, round_index=1)
    assert len(open(h2).read().splitlines()) == 2


def test_one_failed_trial_does_not_sink_the_round(tmp_path):
    configs = stages.suggest(search_space=SPACE, finished=[_record(0), _record(1, status="failed")], trials_per_round=2,
                             history_out=str(tmp_path / "h.jsonl"), round_index=1)
    assert configs


def test_a_round_where_every_trial_failed_stops_the_run(tmp_path):
    with pytest.raises(RuntimeError, match="every trial of round 0 failed.*NaN"):
        stages.suggest(search_space=SPACE, finished=[_record(0, status="failed"), _record(1, status="failed")],
                       trials_per_round=2, history_out=str(tmp_path / "h.jsonl"), round_index=1)


def test_aggregate_keeps_rows_even_when_the_last_round_failed(tmp_path):
    history = tmp_path / "h.jsonl"
    history.write_text(_record(0) + "\n")
    with pytest.raises(RuntimeError, match="every trial of round 1 failed"):
        stages.aggregate(history_in=str(history), finished=[_record(0, 1, "failed"), _record(1, 1, "failed")],
                         results_uri=str(tmp_path / "res"), out_dir=str(tmp_path / "out"))
    rows = results.read_rows(str(tmp_path / "res" / results.TRAIN_CSV))
    assert [r["status"] for r in rows] == ["ok", "failed", "failed"]
    assert rows[1]["error"] == "FloatingPointError: NaN"


def test_aggregate_appends_without_losing_earlier_rows(tmp_path):
    history = tmp_path / "h.jsonl"
    history.write_text(_record(0) + "\n")
    stages.aggregate(history_in=str(history), finished=[_record(1, model=2)], results_uri=str(tmp_path / "res"),
                     out_dir=str(tmp_path / "a"))
    first = (tmp_path / "res" / results.TRAIN_CSV).read_bytes()
    summary = stages.aggregate(history_in=str(history), finished=[_record(1, model=2, score=0.9)],
                               results_uri=str(tmp_path / "res"), out_dir=str(tmp_path / "b"))
    assert (tmp_path / "res" / results.TRAIN_CSV).read_bytes().startswith(first)
    assert summary["trials"] == 2 and summary["best_score"] == 0.9
    assert (tmp_path / "b" / "report.html").exists()


def test_failed_row_has_the_reason_and_the_configuration():
    row = stages.failed_row({"pixels": 64.0, "model": 2, "round": 1.0, "trial": 3.0}, "ValueError: boom")
    assert row["status"] == "failed" and row["error"] == "ValueError: boom"
    assert (row["round"], row["trial"], row["model"]) == (1, 3, 2)


def test_fingerprint_changes_with_the_data_only(tmp_path, gcs_bucket):
    from neumo import storage

    for base in (str(tmp_path / "d"), f"gs://{gcs_bucket}/d"):
        storage.write_bytes(storage.join(base, "train/NORMAL/a.png"), b"one")
        storage.write_bytes(storage.join(base, "train/NORMAL/b.png"), b"two")
        first = stages.fingerprint(dataset_uri=base)
        assert stages.fingerprint(dataset_uri=base) == first  # unchanged data: same key, the cache is reused
        storage.write_bytes(storage.join(base, "train/NORMAL/b.png"), b"three")
        assert stages.fingerprint(dataset_uri=base) != first  # a changed file: a new key, ingest reruns
        second = stages.fingerprint(dataset_uri=base)
        storage.write_bytes(storage.join(base, "train/NORMAL/c.png"), b"new")
        assert stages.fingerprint(dataset_uri=base) != second


def test_a_single_configuration_replaces_the_search(tmp_path):
    config = {"pixels": 64.0, "mask": False, "model": 2, "frozen_layers": 0, "learning_rate": 0.001, "loss": "focal",
              "augmentation": "none", "class_weight": True}
    batch = stages.suggest(search_space=SPACE, finished=[], trials_per_round=1, history_out=str(tmp_path / "h.jsonl"),
                           round_index=0, config=config)
    assert batch == [{**config, "pixels": 64, "round": 0, "trial": 0, "seed_offset": 0}]
    # an ensemble of seeds: the same configuration K times, the k-th trained with seed + k
    members = stages.suggest(search_space=SPACE, finished=[], trials_per_round=3, history_out=str(tmp_path / "h.jsonl"),
                             round_index=0, config=config)
    assert members == [{**config, "pixels": 64, "round": 0, "trial": k, "seed_offset": k} for k in range(3)]
    folds = {"train": {"NORMAL": 8, "PNEUMONIA": 8}, "valid": {"NORMAL": 2, "PNEUMONIA": 2}}
    (tmp_path / "summary.json").write_text(json.dumps({"with_mask": 0, "folds": folds}))
    assert stages.plan(search_space=SPACE, manifest_dir=str(tmp_path), config=config) == [{"pixels": 64, "mask": False}]
    with pytest.raises(ValueError, match="loss"):
        stages.plan(search_space=SPACE, manifest_dir=str(tmp_path), config={**config, "loss": "hinge"})


def test_warm_start_skips_rows_recorded_with_other_settings(tmp_path, caplog):
    """A score learnt under another pretraining task, threshold rule or clip is another experiment:
    round 0 does not learn from it (logged); rows from before a setting was recorded are kept."""
    good = json.loads(_record(0, score=0.7))["train"]
    ours = {"clahe_clip": 40.0, "acquisition_copies": 1, "pretrain_task": "restore", "pretrain_data": "unlabelled+train",
            "frozen_layers_count": "weighted", "threshold_policy": "youden", "acquisition": "tight", "selection": "auc"}
    rows = [dict(good, **ours), dict(good, learning_rate=0.002),  # recorded as this run / from before recording
            dict(good, **{**ours, "pretrain_task": "identity"}, learning_rate=0.003),
            dict(good, **{**ours, "threshold_policy": "0.5", "acquisition_copies": 0}, learning_rate=0.004),
            dict(good, **{**ours, "clahe_clip": 2.0}, learning_rate=0.005)]
    results.append_rows(str(tmp_path / results.TRAIN_CSV), rows, results.TRAIN_COLUMNS)
    counts = {}
    with caplog.at_level("WARNING", logger="neumo.stages"):
        stages.suggest(search_space=SPACE, finished=[], trials_per_round=2, history_out=str(tmp_path / "h.jsonl"),
                       results_uri=str(tmp_path), counts=counts, selection="auc", acquisition="tight")
    assert counts == {"used": 2, "skipped": 3}
    text = caplog.text
    assert "row 4: recorded with pretrain_task=identity (this run: restore)" in text
    assert "threshold_policy=0.5 (this run: youden)" in text and "acquisition_copies=0 (this run: 1)" in text
    assert "clahe_clip=2.0 (this run: 40.0)" in text
    # a run that selects by the shift score learns nothing from AUC scores, recorded or from before
    # the selection was recorded (whose score was the valid AUC)
    caplog.clear()
    with caplog.at_level("WARNING", logger="neumo.stages"):
        stages.suggest(search_space=SPACE, finished=[], trials_per_round=2, history_out=str(tmp_path / "h.jsonl"),
                       results_uri=str(tmp_path), counts=counts, selection="shift")
    assert counts == {"used": 0, "skipped": 5}
    assert caplog.text.count("selection=auc (this run: shift)") == 5


def test_warm_start_rows_that_cannot_be_used_are_skipped_with_a_reason(tmp_path, caplog):
    """Rows of the results CSV: a row cut short, an unparsable value, a score outside [0, 1] are
    skipped (one logged reason each, counted); Excel's TRUE is read as true, not as false."""
    good = json.loads(_record(0, score=0.7))["train"]
    rows = [dict(good, mask="TRUE", learning_rate=0.002), {k: v for k, v in good.items() if k != "loss"},
            dict(good, learning_rate="fast"), dict(good, score=7.5), dict(good, learning_rate=0.003)]
    results.append_rows(str(tmp_path / results.TRAIN_CSV), rows, results.TRAIN_COLUMNS)
    space = {**SPACE, "mask": [False, True]}
    counts = {}
    with caplog.at_level("WARNING", logger="neumo.stages"):
        stages.suggest(search_space=space, finished=[], trials_per_round=2, history_out=str(tmp_path / "h.jsonl"),
                       results_uri=str(tmp_path), counts=counts, selection="auc", acquisition="tight")
    assert counts == {"used": 2, "skipped": 3}
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 3 and any("score 7.5" in m for m in skipped) and any("row 4" in m for m in skipped)
    point = stages._trial_point(rows[0], "row 2")
    assert point["mask"] is True and point["score"] == 0.7
