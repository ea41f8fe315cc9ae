"""The preprocessing benchmark's arithmetic on made-up timings (no images decoded)."""

import pytest

from benchmarks import preprocess_bench as pb


def test_summary_reports_speedup_efficiency_cpu_and_main_share(capsys):
    best = {"bare": {"wall": 10.0, "main_cpu": 10.0, "child_cpu": 0.0},
            1: {"wall": 20.0, "main_cpu": 20.0, "child_cpu": 0.0},
            2: {"wall": 12.5, "main_cpu": 4.0, "child_cpu": 18.0}}
    fields = pb.summary("made up", 1000, 512, 2, best, (1.0, 2.0))
    assert fields["one_worker"] == 50.0 and fields["n_workers"] == 80.0
    assert fields["speedup"] == pytest.approx(1.6) and fields["efficiency"] == pytest.approx(0.8)
    assert fields["cpu_ms_per_image"] == {"bare": 10.0, "1": 20.0, "2": 22.0}
    assert fields["cpu_ratio"] == pytest.approx(1.1) and fields["cpu_ratio_without_start"] == pytest.approx(1.0)
    assert fields["main_cpu_share"]["2"] == pytest.approx(4 / 22, abs=1e-3)
    assert fields["cores_busy"] == pytest.approx(22 / 12.5, abs=0.01)
    assert fields["ceiling_efficiency"] == pytest.approx(2 / 22 * 1000 / 100, abs=1e-3)  # 90.9 images/s vs 2 x 50
    assert "efficiency 0.80" in capsys.readouterr().out


def test_calibration_lists_the_images_enough_times(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(pb, "stage_runner", lambda paths, repeat, pixels, out: calls.append(repeat) or (lambda w: None))
    cpu = iter([3.0, 2.5])
    monkeypatch.setattr(pb, "measured", lambda fn: {"wall": 9.0, "main_cpu": next(cpu) - 0.5, "child_cpu": 0.5})
    assert pb.calibrate(["a.png"], 512, 20.0, str(tmp_path)) == 9  # ceil(1.1 x 20 / 2.5): the smaller CPU time
    assert calls == [1]


def test_manifest_ids_are_distinct_per_repeat():
    rows = pb.manifest(["/x/a.png", "/x/b.png"], 3)
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
