"""CSV cells a spreadsheet would execute are escaped in every CSV the project writes, and read back exactly."""

import pytest

from neumo import cells, results

DANGEROUS = ["=cmd|' /C calc'!A0", "+HYPERLINK(\"http://x\")", "-2+3+cmd|' /C calc'!A0", "@SUM(1,2)", "\t=1", "'=x"]


@pytest.mark.parametrize("text", DANGEROUS + ["plain", "", "-0.5", "1e-3", "a=b"])
def test_escape_round_trips(text):
    escaped = cells.escape(text)
    assert cells.unescape(escaped) == text
    if text in DANGEROUS:
        assert escaped.startswith("'")  # a spreadsheet shows it as text
    else:
        assert escaped == text  # numbers and ordinary text untouched


def test_results_csv_escapes_and_reads_back(tmp_path):
    uri = str(tmp_path / results.TRAIN_CSV)
    rows = [{"run_id": name, "model_uri": f"gs://b/{name}", "score": -0.5} for name in DANGEROUS]
    results.append_rows(uri, rows, results.TRAIN_COLUMNS)
    import csv

    with open(tmp_path / results.TRAIN_CSV, newline="") as fh:
        stored = [row[0] for row in csv.reader(fh)][1:]
    assert stored == ["'" + name for name in DANGEROUS]  # what a spreadsheet sees: text
    back = results.read_rows(uri)
    assert [r["run_id"] for r in back] == DANGEROUS and all(r["score"] == "-0.5" for r in back)
    table = results.read_table(uri)
    assert list(table["run_id"]) == DANGEROUS
