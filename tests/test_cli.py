"""The `neumo` command: one subcommand per stage, and stages run outside Kubeflow."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from neumo import cli

STAGE_COMMANDS = ("ingest", "train-mask-model", "mask", "preprocess", "pretrain", "catalog", "suggest", "train",
                  "evaluate", "aggregate")


def test_help_lists_a_subcommand_per_stage():
    neumo = Path(sys.executable).parent / "neumo"
    done = subprocess.run([str(neumo), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for name in STAGE_COMMANDS + ("synthetic",):
        assert name in done.stdout, name


def test_a_bad_argument_is_a_clear_error(tmp_path, caplog):
    assert cli.main(["ingest", "--dataset-uri", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 2
    assert "no files under" in caplog.text


@pytest.mark.slow
def test_stages_chain_from_the_command_line(tmp_path, capsys):
    """synthetic -> ingest -> preprocess -> pretrain -> catalog -> suggest -> train -> evaluate -> aggregate."""
    w = str(tmp_path)

    def run(*args):
        assert cli.main(list(args)) == 0, args
        return json.loads(capsys.readouterr().out)

    run("synthetic", "--out", f"{w}/s", "--per-class", "12", "--size", "64")
    run("ingest", "--dataset-uri", f"{w}/s/images", "--pretrain-uri", f"{w}/s/nih", "--out", f"{w}/m")
    run("preprocess", "--manifest", f"{w}/m", "--pixels", "64", "--workers", "1", "--out", f"{w}/p")
    run("pretrain", "--data", f"{w}/p", "--depth", "2", "--filters", "4", "--pretrain-epochs", "1", "--out", f"{w}/b")
    run("catalog", "--variant", f"{w}/p", f"{w}/b", "--out", f"{w}/catalog.json")
    space = {"pixels": [64], "mask": [False], "model": [1, 2], "frozen_layers": [0], "learning_rate": [1e-3, 1e-2],
             "loss": ["bce"], "augmentation": ["none"], "class_weight": [False]}
    space_file = tmp_path / "space.json"
    space_file.write_text(json.dumps(space))
    configs = run("suggest", "--search-space", f"@{space_file}", "--trials-per-round", "1", "--out", f"{w}/c.json")
    assert len(configs) == 1
    config = configs[0]
    (tmp_path / "trial.json").write_text(json.dumps(config))
    row = run("train", "--trial", f"@{w}/trial.json", "--catalog", f"{w}/catalog.json", "--epochs", "1",
              "--out", f"{w}/t")
    assert row["status"] == "ok" and 0 <= row["val_auc"] <= 1
    evals = run("evaluate", "--model", f"{w}/t", "--catalog", f"{w}/catalog.json", "--train-row", f"{w}/t/row.json",
                "--bootstrap", "20", "--history", f"{w}/h.jsonl", "--out", f"{w}/e")
    assert {e["split"] for e in evals} == {"test", "val", "test+val", "valid"}
    same = run("compare", "--a", f"{w}/e", "--b", f"{w}/e", "--split", "valid", "--bootstrap", "50")
    assert same["mcnemar"]["p_value"] == 1.0 and same["auc"]["difference"] == 0
    summary = run("aggregate", "--history", f"{w}/h.jsonl", "--results-uri", f"{w}/results", "--out", f"{w}/r")
    assert summary["trials"] == 1
    assert (tmp_path / "results" / "train_max_unsupervised.csv").exists()
    assert (tmp_path / "r" / "report.html").read_text().count("<img") >= 1


def test_user_mistakes_are_one_line_and_exit_2(tmp_path, caplog, monkeypatch):
    """A manifest missing a column, --out that is a folder, a history record without its training
    row, gs:// without credentials: one line naming the file, row or key; exit 2; no traceback."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.csv").write_text("id,uri\na,b\n")
    (tmp_path / "m" / "summary.json").write_text('{"data_version": "x"}')
    cases = [
        (["preprocess", "--manifest", str(tmp_path / "m"), "--pixels", "64", "--out", str(tmp_path / "p")],
         "missing column(s) split"),
        (["synthetic", "--per-class", "2", "--size", "64", "--out", str(tmp_path / "s")], None),
        (["aggregate", "--history", str(tmp_path / "h.jsonl"), "--out", str(tmp_path / "a")], "line 1"),
        (["demo-data", "--out", str(tmp_path / "m")], "Is a directory"),
    ]
    (tmp_path / "h.jsonl").write_text('{"eval": []}\n')
    for argv, expected in cases:
        caplog.clear()
        code = cli.main(argv)
        if expected is None:
            assert code == 0
            continue
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert code == 2 and len(errors) == 1 and expected in errors[0].getMessage(), (argv, caplog.text)
        assert not errors[0].exc_info and "\n" not in errors[0].getMessage()
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    from neumo import storage

    storage.reset_client()
    caplog.clear()
    try:
        assert cli.main(["ingest", "--dataset-uri", "gs://neumo-no-bucket/x", "--out", str(tmp_path / "i")]) == 2
    finally:
        storage.reset_client()
    (error,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "credentials" in error.getMessage() or "no-such-key" in error.getMessage()
