"""The seed's two result CSVs and the HTML report (shared/neumo/results.py)."""

import math

import numpy as np
import pytest

from neumo import results
from neumo.results import EVAL_COLUMNS, TRAIN_COLUMNS, append_rows, read_rows, write_report


def _train_row(trial: int, score=0.9, **extra) -> dict:
    row = {"run_id": "run-1", "round": trial // 4, "trial": trial, "status": "ok", "pixels": 256,
           "mask": trial % 2 == 0, "model": 1 + trial % 2, "frozen_layers": 4 * (trial % 3),
           "learning_rate": 10 ** (-5 + trial % 4), "loss": ["bce", "focal", "weighted_bce"][trial % 3],
           "augmentation": ["none", "light", "strong"][trial % 3], "class_weight": trial % 2 == 1,
           "epochs": 10, "val_auc": score, "score": score, "model_uri": f"/models/t{trial}.keras"}
    row.update(extra)
    return row


def _eval_rows(trial: int) -> list[dict]:
    return [{"run_id": "run-1", "round": trial // 4, "trial": trial, "model_uri": f"/models/t{trial}.keras",
             "split": split, "n": n, "auc": 0.91, "auc_low": 0.88, "auc_high": 0.94, "accuracy": 0.87,
             "sensitivity": 0.9, "specificity": 0.8, "precision": 0.85, "f1": 0.874, "loss": 0.31,
             "tn": 180, "fp": 54, "fn": 30, "tp": 360} for split, n in (("test", 624), ("val", 16))]


@pytest.fixture(params=["plain", "file_uri"])
def csv_uri(request, tmp_path):
    path = tmp_path / "out" / results.TRAIN_CSV
    return str(path) if request.param == "plain" else path.as_uri()


def test_file_names():
    assert results.TRAIN_CSV == "train_max_unsupervised.csv"
    assert results.EVAL_CSV == "image_class_evaluation_unsupervised.csv"
    assert len(set(TRAIN_COLUMNS)) == len(TRAIN_COLUMNS) == 43 and len(set(EVAL_COLUMNS)) == len(EVAL_COLUMNS) == 40


def test_append_creates_then_keeps_earlier_bytes(csv_uri):
    from neumo import storage

    append_rows(csv_uri, [_train_row(0), _train_row(1, score=None, status="failed", error="OOM, \"boom\"\nline 2")],
                TRAIN_COLUMNS)
    first = storage.read_bytes(csv_uri)
    assert first.startswith(",".join(TRAIN_COLUMNS).encode() + b"\n")
    append_rows(csv_uri, [_train_row(2, score=0.123456789012345)], TRAIN_COLUMNS)
    second = storage.read_bytes(csv_uri)
    assert second.startswith(first) and len(second) > len(first)
    assert second.count(b"run_id,round") == 1  # a single header

    rows = read_rows(csv_uri)
    assert [r["trial"] for r in rows] == ["0", "1", "2"]
    assert list(rows[0]) == TRAIN_COLUMNS
    assert rows[0]["mask"] == "True" and rows[1]["mask"] == "False"
    assert rows[0]["learning_rate"] == "1e-05" and float(rows[2]["score"]) == 0.123456789012345
    assert rows[1]["score"] == "" and rows[1]["error"] == "OOM, \"boom\"\nline 2"
    assert rows[0]["data_version"] == ""  # missing keys are empty cells


def test_numpy_values_are_plain_cells(tmp_path):
    uri = str(tmp_path / "e.csv")
    append_rows(uri, [{"split": "test", "n": np.int64(624), "auc": np.float64(0.5), "accuracy": np.float32(0.25),
                       "tp": np.bool_(True), "loss": math.nan}], EVAL_COLUMNS)
    row = read_rows(uri)[0]
    assert (row["n"], row["auc"], row["accuracy"], row["tp"], row["loss"]) == ("624", "0.5", "0.25", "True", "nan")


def test_unknown_keys_are_dropped_with_a_warning(tmp_path, caplog):
    uri = str(tmp_path / "t.csv")
    with caplog.at_level("WARNING", logger="neumo.results"):
        append_rows(uri, [_train_row(0, surprise=1)], TRAIN_COLUMNS)
    assert "surprise" in caplog.text
    assert "surprise" not in (tmp_path / "t.csv").read_text()
    assert read_rows(uri)[0]["trial"] == "0"


def test_a_header_with_every_column_is_kept_and_mapped_by_name(tmp_path):
    path = tmp_path / "old.csv"
    old = ("legacy_note," + ",".join(reversed(TRAIN_COLUMNS)) + "\r\n" + "kept" + "," * len(TRAIN_COLUMNS)).encode()
    path.write_bytes(old)  # CRLF, no final newline, another column order and one more column
    append_rows(str(path), [_train_row(9, score=0.75)], TRAIN_COLUMNS)
    data = path.read_bytes()
    assert data.startswith(old) and data.count(b"\r\n") == 3
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["old.csv"]  # nothing to migrate
    last = read_rows(str(path))[-1]
    assert last["trial"] == "9" and last["score"] == "0.75" and last["legacy_note"] == ""


def test_an_older_header_is_migrated_and_its_bytes_kept_in_a_dated_copy(tmp_path, caplog):
    """A CSV from an older neumo lacks today's columns: its bytes go to a dated copy, byte for byte,
    and the file gets the union of the columns, so neither an old value nor a new column is lost."""
    path = tmp_path / "old.csv"
    old = b"trial,score,legacy_note\r\n7,0.5,kept\r\n8,0.6,\"a, \"\"quoted\"\" note\""  # CRLF, no final newline
    path.write_bytes(old)
    with caplog.at_level("WARNING", logger="neumo.results"):
        append_rows(str(path), [_train_row(9, score=0.75)], TRAIN_COLUMNS)
    copies = sorted(p for p in tmp_path.iterdir() if p.name != "old.csv" and not p.name.startswith("."))
    assert len(copies) == 1 and copies[0].name.startswith("old.before-") and copies[0].suffix == ".csv"
    assert copies[0].read_bytes() == old
    rows = read_rows(str(path))
    header = path.read_bytes().split(b"\r\n")[0].decode().split(",")
    assert header[:3] == ["trial", "score", "legacy_note"] and set(header) == {"legacy_note", *TRAIN_COLUMNS}
    assert [(r["trial"], r["score"], r["legacy_note"]) for r in rows] == [
        ("7", "0.5", "kept"), ("8", "0.6", 'a, "quoted" note'), ("9", "0.75", "")]
    assert rows[0]["run_id"] == "" and rows[2]["run_id"] == "run-1" and rows[2]["loss"] == "bce"
    assert "migrating" in caplog.text and "run_id" in caplog.text and copies[0].name in caplog.text
    # appending again with the same columns adds a row and makes no second copy
    append_rows(str(path), [_train_row(10)], TRAIN_COLUMNS)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2 and len(read_rows(str(path))) == 4


def test_empty_existing_file_gets_a_header(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    append_rows(str(path), [], EVAL_COLUMNS)
    assert path.read_text() == ",".join(EVAL_COLUMNS) + "\n"
    assert read_rows(str(path)) == []


def test_read_rows_of_a_missing_file_is_empty(tmp_path):
    assert read_rows(str(tmp_path / "nope.csv")) == []


def _report(tmp_path, train, evals) -> str:
    uri = str(tmp_path / "report" / "index.html")
    write_report(uri, train, evals)
    return (tmp_path / "report" / "index.html").read_text()


def test_report_without_rows(tmp_path):
    text = _report(tmp_path, [], [])
    assert "no finished trials" in text.lower() and "<html" in text


def test_report_with_only_failed_trials(tmp_path):
    text = _report(tmp_path, [_train_row(0, score=None, status="failed", error="CUDA <oom>")], [])
    assert "no finished trials" in text.lower()
    assert "Failed trials" in text and "CUDA &lt;oom&gt;" in text


def test_report_with_one_row(tmp_path):
    text = _report(tmp_path, [_train_row(0, score=0.9)], _eval_rows(0))
    assert "Leaderboard" in text and text.count("<img") == 2 and "data:image/png;base64," in text
    assert "624" in text and "test" in text


def test_report_with_many_rows_from_csvs(tmp_path):
    train_uri, eval_uri = str(tmp_path / results.TRAIN_CSV), str(tmp_path / results.EVAL_CSV)
    rng = np.random.default_rng(0)
    train = [_train_row(t, score=float(rng.uniform(0.6, 0.95))) for t in range(20)]
    train[5].update(score=None, status="failed", error="Traceback: ValueError('bad shape')")
    append_rows(train_uri, train, TRAIN_COLUMNS)
    append_rows(eval_uri, [e for t in range(20) if t != 5 for e in _eval_rows(t)], EVAL_COLUMNS)
    text = _report(tmp_path, read_rows(train_uri), read_rows(eval_uri))
    assert "Leaderboard" in text and text.count("<img") == 2
    best = max((r for r in train if r["score"] is not None), key=lambda r: r["score"])
    assert f"{best['score']:.4g}" in text
    assert "bad shape" in text
    assert text.count("<td>test</td>") == results.LEADERBOARD_SIZE  # one test evaluation per leader


def _run_rows(run_id: str, trials: range, scores) -> tuple[list[dict], list[dict]]:
    train = [_train_row(t, score=s, run_id=run_id, model_uri=f"/models/{run_id}/t{t}.keras") for t, s in zip(trials, scores)]
    evals = [{**e, "run_id": run_id, "model_uri": f"/models/{run_id}/t{t}.keras"} for t in trials for e in _eval_rows(t)]
    return train, evals


def test_the_report_of_a_second_run_covers_the_whole_history(tmp_path):
    """Two runs appended to the CSVs: the report covers both, marks the second, names the score
    and says where the best model (from the first run) is."""
    train_uri, eval_uri = str(tmp_path / results.TRAIN_CSV), str(tmp_path / results.EVAL_CSV)
    first = _run_rows("run-1", range(4), [0.7, 0.95, 0.8, 0.75])
    second = _run_rows("run-2", range(3), [0.85, None, 0.9])
    second[0][1].update(status="failed", error="ValueError: second run failure")
    for train, evals in (first, second):
        append_rows(train_uri, train, TRAIN_COLUMNS)
        append_rows(eval_uri, [e for e in evals if e["trial"] != 1 or e["run_id"] == "run-1"], EVAL_COLUMNS)
    uri = str(tmp_path / "report.html")
    write_report(uri, results.read_table(train_uri), results.read_table(eval_uri), current_run="run-2",
                 history_uri=str(tmp_path))
    text = (tmp_path / "report.html").read_text()
    assert "7 trial(s) in 2 run(s), 6 finished" in text
    assert "AUC on the valid fold" in text and "20%" in text
    assert "/models/run-1/t1.keras" in text and "(an earlier run)" in text  # the best model: where it is
    assert "rank 2 of 6" in text  # this run's best (0.9) is second to the first run's 0.95
    assert text.count('<tr class="current">') == 2 + 2 * 2 + 1 + 1  # leaderboard, its evaluations, runs, failed
    assert "run-1" in text and "second run failure" in text
    assert text.count("<img") == 2
    assert "What the splits mean" in text and "Absent in this run" in text and "<code>valid</code>" in text


def test_the_report_from_rows_without_a_history_marks_nothing(tmp_path):
    text = _report(tmp_path, [_train_row(0, score=0.9)], _eval_rows(0))
    assert 'class="current"' not in text and "this run" not in text.lower()


def test_a_split_absent_from_the_data_is_listed_never_duplicated(tmp_path):
    """Old rows pooling an empty test split (test+val = val again) are left out; the report says
    there is no test split."""
    evals = [e for e in _eval_rows(0) if e["split"] == "val"]
    evals += [{**evals[0], "split": "test+val"}, {**evals[0], "split": "valid", "n": 1000}]
    text = _report(tmp_path, [_train_row(0, score=0.9)], evals)
    assert "<td>test+val</td>" not in text and text.count("<td>val</td>") == 1
    assert "no test split in this dataset" in text
    assert "1 earlier pooled evaluation row(s)" in text


@pytest.mark.parametrize("counts,expected", [
    ({"test": 624, "val": 16, "valid": 1046}, ["test", "val", "test+val", "valid"]),
    ({"test": 0, "val": 16, "valid": 1046}, ["val", "valid"]),  # no test split: no test+val (it would repeat val)
    ({"test": 6, "valid": 5}, ["test", "valid"]),  # no val folder at all
    ({}, []),
])
def test_splits_present_pools_only_whole_parts(counts, expected):
    from neumo import stages

    assert stages.splits_present(counts) == expected


def test_the_report_defines_every_evaluated_split():
    from neumo import stages

    assert list(results.SPLIT_MEANING) == list(stages.EVAL_SPLITS)


def test_aggregate_reports_the_whole_history(tmp_path):
    """A second scheduled run's report (stages.aggregate) includes the first run's trials."""
    import json

    from neumo import stages

    for run, scores in (("run-1", [0.95, 0.7]), ("run-2", [0.8, 0.85])):
        train, evals = _run_rows(run, range(2), scores)
        finished = [json.dumps({"train": t, "eval": [e for e in evals if e["trial"] == t["trial"]],
                                "figures_uri": ""}) for t in train]
        summary = stages.aggregate(history_in="", finished=finished, results_uri=str(tmp_path / "res"),
                                   out_dir=str(tmp_path / run))
    assert summary["trials"] == 2 and summary["best_score"] == 0.85  # this run's summary
    text = (tmp_path / "run-2" / "report.html").read_text()
    assert "4 trial(s) in 2 run(s)" in text and "/models/run-1/t0.keras" in text and "(an earlier run)" in text
    assert text.count('<tr class="current">') >= 2
    assert len(results.read_rows(str(tmp_path / "run-2" / results.TRAIN_CSV))) == 2  # the copies: this run's rows
