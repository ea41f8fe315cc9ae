"""The cost model's arithmetic, output and refusals, on made-up rates (no training, no TensorFlow)."""

import json

import pytest

from benchmarks import cost_model as cm

RATES = cm.Rates({(m, p): r for p, k in ((256, 4.0), (512, 1.0)) for m, r in
                  (("unet", 10 * k), ("clf1", 20 * k), ("clf2", 40 * k))}, "test device", 0.01, "given")
FREE = cm.Cluster(nvlink_latency_us=0.0, network_latency_us=0.0, nvlink_gbs=1e12, network_gbs=1e12)
MB = 8e6


def _project(exp=None, g=1, n=1, **kw):
    return cm.project(exp or cm.Experiment(), RATES, cm.Cluster(), g, n, MB, MB, **kw)


def test_doubling_the_images_doubles_pretraining_and_preprocessing():
    one, two = _project(), _project(cm.Experiment(nih_images=2 * 112_120))
    assert two["stages"]["pretrain"]["wall_h"] == pytest.approx(2 * one["stages"]["pretrain"]["wall_h"])
    assert two["stages"]["pretrain"]["gpu_h"] == pytest.approx(2 * one["stages"]["pretrain"]["gpu_h"])
    pre = [r["stages"]["preprocess"]["cpu_core_s"] for r in (one, two)]
    images = [n + 5_216 + 640 for n in (112_120, 224_240)]
    assert pre[1] / pre[0] == pytest.approx(images[1] / images[0])


def test_one_pretraining_variant_by_hand():
    exp = cm.Experiment()
    job = cm.pretrain_job(512, False, exp, RATES, cm.Cluster(), MB)
    by_hand = 10 * (112_120 * 0.9 + 112_120 * 0.1 / 3) / 10.0  # unet at 512 px: 10 images/s
    assert job.seconds == pytest.approx(by_hand) and job.step_seconds == pytest.approx(8 / 10)


def test_k_gpus_at_efficiency_e_take_time_over_k_e():
    job = cm.Job("j", 1000.0, step_seconds=0.1, model_bytes=MB)
    cluster = cm.Cluster()
    e = cm.efficiency(0.1, MB, 4, 8, cluster)
    assert 0 < e < cluster.dp_fraction
    assert cm.job_seconds_on(job, 4, 8, cluster) == pytest.approx(1000 / (4 * e))
    assert cm.efficiency(0.1, MB, 4, 8, FREE) == pytest.approx(FREE.dp_fraction)  # free communication
    assert cm.efficiency(0.1, MB, 1, 8, cluster) == 1.0
    assert cm.job_seconds_on(cm.Job("predict", 1000.0), 4, 8, cluster) == 250.0  # no gradients: perfect


def test_nodes_add_the_network_term():
    c = cm.Cluster()
    inside = cm.allreduce_seconds(MB, 8, 1, c)
    assert inside == pytest.approx(2 * 7 / 8 * MB / 150e9 + 2 * 7 * 10e-6)
    assert cm.allreduce_seconds(MB, 8, 2, c) - inside == pytest.approx(2 * 1 / 2 * MB / 25e9 + 2 * 1 * 30e-6)
    assert cm.placement(16, 8) == (8, 2) and cm.placement(4, 8) == (4, 1)
    assert cm.efficiency(0.01, MB, 16, 8, c) < cm.efficiency(0.01, MB, 8, 8, c)


def test_schedule_packs_longest_first_and_counts_gpu_time():
    jobs = [cm.Job("a", 4.0), cm.Job("b", 1.0), cm.Job("c", 1.0), cm.Job("d", 1.0), cm.Job("e", 1.0)]
    out = cm.schedule(jobs, 2, 8, cm.Cluster(), cap=4, data_parallel=False)
    assert out["wall_s"] == 4.0 and out["gpu_s"] == 8.0 and out["at_once"] == 2
    split = cm.schedule([cm.Job("a", 8.0)], 4, 8, cm.Cluster(), cap=4, data_parallel=True)
    assert split["gpus_per_job"] == 4 and split["wall_s"] == 2.0


def test_tuning_is_rounds_in_turn_and_capped_by_the_round():
    exp = cm.Experiment()
    one, four, eight = (_project(g=g) for g in (1, 4, 8))
    trial = [cm.trial_seconds(p, exp, RATES, cm.Cluster()) for p in (512, 256)]
    assert one["stages"]["tuning"]["wall_s"] == pytest.approx(5 * 2 * sum(trial))
    assert four["stages"]["tuning"]["wall_s"] == pytest.approx(5 * max(trial))  # 4 trials at once
    assert eight["stages"]["tuning"]["wall_s"] == four["stages"]["tuning"]["wall_s"]  # the round of 4 caps it
    assert eight["stages"]["tuning"]["gpu_s"] == pytest.approx(one["stages"]["tuning"]["gpu_s"])


def test_pixel_rule_and_provenance():
    rates = cm.Rates({("unet", 128): 16.0})
    assert rates.at("unet", 128) == (16.0, "measured at 128 px")
    rate, how = rates.at("unet", 512)
    assert rate == pytest.approx(1.0) and "scaled from 128" in how
    with pytest.raises(cm.BadInput):
        rates.at("clf1", 128)


def _rates_file(tmp_path, rows, **extra):
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({"device": "jax on gpu: H200", "batch": 8, "results": rows, **extra}))
    return str(path)


def _rows(policy, scale=1.0):
    return [{"model": m, "pixels": p, "policy": policy, "images_s": scale * r}
            for (m, p), r in RATES.images_s.items()]


def test_rates_file_prefers_mixed_precision(tmp_path):
    path = _rates_file(tmp_path, _rows("float32") + _rows("mixed_float16", 3.0), preprocess_cpu_s=0.02)
    rates = cm.read_rates(path, "auto")
    assert rates.images_s[("unet", 512)] == 30.0 and "mixed_float16" in rates.device
    assert rates.preprocess_cpu_s == 0.02
    assert cm.read_rates(path, "float32").images_s[("unet", 512)] == 10.0


def test_main_writes_the_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cm, "gradient_bytes", lambda: (MB, MB))
    out = tmp_path / "out.json"
    rc = cm.main(["--rates", _rates_file(tmp_path, _rows("float32")), "--preprocess-ms", "10",
                  "--json", str(out), "--configs", "1x1", "8x2", "--epochs", "5"])
    assert rc == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 3 and rows[1].startswith("| 1 (1x1)") and rows[2].startswith("| 16 (8x2)")
    assert "MEASURED" in text and "ASSUMED" in text and "PROJECTED" in text
    data = json.loads(out.read_text())
    assert data["experiment"]["epochs"] == 5 and data["experiment"]["nih_images"] == 112_120
    assert [r["gpus"] for r in data["projected"]] == [1, 16]
    assert set(data["projected"][0]["stages"]) == set(cm.STAGES)
    assert data["measured"]["preprocess_source"] == "given with --preprocess-ms"


@pytest.mark.parametrize("args, rows", [
    (["--rates", "/nonexistent/rates.json"], None),
    (["--rates", "RATES", "--policy", "bfloat16"], "float32"),
    (["--rates", "RATES"], []),
    (["--rates", "RATES", "--configs", "8by2"], "float32"),
    (["--rates", "RATES", "--epochs", "0"], "float32"),
    (["--rates", "RATES", "--dp-fraction", "1.5"], "float32"),
    (["--rates", "RATES", "--epochs", "many"], "float32"),
    (["--measure-pixels", "100"], None),
])
def test_bad_input_is_refused_in_one_line(tmp_path, monkeypatch, capsys, args, rows):
    monkeypatch.setattr(cm, "gradient_bytes", lambda: (MB, MB))
    if rows is not None:
        path = _rates_file(tmp_path, _rows(rows) if rows else [])
        args = [path if a == "RATES" else a for a in args]
    assert cm.main([*args, "--preprocess-ms", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cost_model: ")


def test_bad_json_is_refused(tmp_path):
    path = tmp_path / "rates.json"
    path.write_text("{not json")
    with pytest.raises(cm.BadInput, match="cannot read"):
        cm.read_rates(str(path), "auto")
