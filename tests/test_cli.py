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
