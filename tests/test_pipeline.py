"""The full pipeline: compiled structure, compiling with only kfp, and a whole local run."""

import csv
import json
import re
import subprocess
import sys

import pytest
import yaml

from neumo import parameters
from tests.conftest import REPO_ROOT, compile_with_only_kfp

STAGES = {"fingerprint", "ingest", "plan", "train-mask-model", "mask", "preprocess", "pretrain", "catalog", "suggest", "train",
          "evaluate", "aggregate"}
GPU_STAGES = {"train-mask-model", "mask", "pretrain", "train", "evaluate"}


def _compile(tmp_path, *args):
    from pipelines import full

    path = tmp_path / "p.yaml"
    assert full.main(["--compile", str(path), *args]) == 0
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform


def _tasks(spec):
    """Every task of the pipeline, nested loops included: {task name: (component name, task dict)}."""
    found = {}
    for comp in (spec["root"], *spec["components"].values()):
        for name, task in comp.get("dag", {}).get("tasks", {}).items():
            found[name] = (task["componentRef"]["name"], task)
    return found


def _base(name):
    return name.rsplit("-", 1)[0] if name.rsplit("-", 1)[-1].isdigit() else name


def test_every_stage_loops_and_rounds(tmp_path):
    spec, _ = _compile(tmp_path, "--rounds", "3", "--trials", "4", "--parallelism", "2")
    tasks = _tasks(spec)
    stage_tasks = {n for n in tasks if not n.startswith("for-loop")}
    assert {_base(n) for n in stage_tasks} == STAGES
    assert sum(_base(n) == "suggest" for n in stage_tasks) == 3
    assert sum(_base(n) == "train" for n in stage_tasks) == 3
    loops = {n: t for n, (_, t) in tasks.items() if n.startswith("for-loop")}
    assert len(loops) == 1 + 3  # the variants loop and one per round
    assert all(t["iteratorPolicy"]["parallelismLimit"] == 2 for t in loops.values())
    aggregate = tasks["aggregate"][1]
    assert "finished" in aggregate["inputs"]["parameters"]


def test_rounds_are_suggest_parallelfor_collected_with_retries(tmp_path):
    """R rounds unrolled: suggest -> ParallelFor (capped) over its configurations -> Collected into the
    next suggest (or aggregate); trials retry after preemption."""
    spec, _ = _compile(tmp_path, "--rounds", "3", "--trials", "2", "--parallelism", "1")
    root = spec["root"]["dag"]["tasks"]
    suggests = ["suggest", "suggest-2", "suggest-3"]
    for i, name in enumerate(suggests):
        loop = next(n for n, t in root.items() if n.startswith("for-loop")
                    and t.get("parameterIterator", {}).get("items", {}).get("inputParameter", "").endswith(f"{name}-Output"))
        assert root[loop]["iteratorPolicy"]["parallelismLimit"] == 1
        comp = spec["components"][root[loop]["componentRef"]["name"]]
        assert comp["outputDefinitions"]["parameters"], "the loop's evaluations are collected"
        consumer = root[suggests[i + 1]] if i + 1 < len(suggests) else root["aggregate"]
        collected = consumer["inputs"]["parameters"]["finished"]["taskOutputParameter"]
        assert collected["producerTask"] == loop
        for task in comp["dag"]["tasks"].values():
            assert task["retryPolicy"]["maxRetryCount"] == 2
    assert "finished" not in root["suggest"]["inputs"]["parameters"] or \
        root["suggest"]["inputs"]["parameters"]["finished"].get("runtimeValue")


def test_caching_follows_the_data(tmp_path):
    """The fingerprint of the data runs uncached and feeds ingest's cache key; suggest is uncached
    (it reads the results CSV); the rest is cached."""
    spec, _ = _compile(tmp_path)
    root = spec["root"]["dag"]["tasks"]
    assert root["fingerprint"]["cachingOptions"] == {} and root["suggest"]["cachingOptions"] == {}
    assert root["ingest"]["cachingOptions"] == {"enableCache": True}
    source = root["ingest"]["inputs"]["parameters"]["data_fingerprint"]["taskOutputParameter"]
    assert source["producerTask"] == "fingerprint"


def test_accelerators_on_gpu_tasks_only(tmp_path):
    spec, platform = _compile(tmp_path, "--gpu-type", "NVIDIA_L4", "--gpu-node-selector", "pool=gpu-l4")
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, (comp, _) in _tasks(spec).items():
        if name.startswith("for-loop"):
            continue
        exec_name = spec["components"][comp]["executorLabel"]
        resources = executors[exec_name]["container"].get("resources", {})
        if _base(name) in GPU_STAGES:
            assert resources["accelerator"]["resourceType"] == "NVIDIA_L4", name
            assert k8s[exec_name]["nodeSelector"]["labels"] == {"pool": "gpu-l4"}, name
            assert k8s[exec_name]["tolerations"], name
        else:
            assert "accelerator" not in resources, name
            assert exec_name not in k8s, name


def test_compiling_needs_only_kfp(tmp_path):
    """Compile in a fresh interpreter where TensorFlow, Keras, OpenCV, numpy and every neumo module
    but the standard-library-only declaration of parameters and trials cannot be imported."""
    compile_with_only_kfp(REPO_ROOT / "pipelines" / "full.py", tmp_path / "only-kfp.yaml")
    assert (tmp_path / "only-kfp.yaml").stat().st_size > 10_000


def test_bad_compile_options_fail_clearly(tmp_path):
    from pipelines import full

    with pytest.raises(ValueError, match="rounds"):
        full.create_pipeline(rounds=0)
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        full.main(["--compile", str(tmp_path / "x.yaml"), "--gpu-node-selector", "nokey"])
    with pytest.raises(SystemExit, match="unknown pipeline parameter"):
        full.main(["--compile", str(tmp_path / "x.yaml"), "--set", "pixles=128"])


TINY_SPACE = '{"mask": [false, true]}'  # the smoke preset's space, masked and not


def _run_local(tmp_path, data, workdir, rounds, results, preset=("--preset", "smoke")):
    """`pipelines/full.py --local` on the smoke preset (or `preset`) as a person runs it; the lines it printed."""
    args = ["--local", *preset, "--workdir", str(workdir), "--rounds", str(rounds), "--trials", "2",
            "--set", f"dataset_uri={data / 'images'}", "--set", f"masks_uri={data / 'masks'}",
            "--set", f"pretrain_uri={data / 'nih'}", "--set", f"results_uri={results}",
            "--set", f"search_space={TINY_SPACE}"]
    done = subprocess.run([sys.executable, str(REPO_ROOT / "pipelines" / "full.py"), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout.splitlines()


def _check_the_output_is_for_people(lines):
    """A local run shows the project's lines: few, "task k of n" for every task, the log path last."""
    from tests.test_local_run import _started

    text = "\n".join(lines)
    assert len(lines) < 150, text
    started = _started(lines)
    assert "aggregate" in started, text
    n = len(started)  # once plan and suggest have listed the loops' items, n is known (no '+')
    assert re.search(rf"task {n} of {n}: \S+ finished in", text), text
    assert lines[-1].endswith(".log") and "full log: " in lines[-1]
    assert "Traceback" not in text and "KFP Executor" not in text and "Executing task" not in text


@pytest.mark.slow
def test_whole_pipeline_runs_locally_and_a_second_run_continues(tmp_path):
    """ingest -> masks -> variants -> pretrain -> 2 rounds x 2 trials -> evaluate -> both CSVs; then a
    second run on the same results URI reads that history and tries only new configurations."""
    from neumo import results, synthetic

    data = tmp_path / "data"
    synthetic.write_kaggle(str(data / "images"), {"train": (14, 14), "val": (3, 3), "test": (4, 4)}, size=96,
                           seed=0, masks_uri=str(data / "masks"))
    synthetic.write_nih(str(data / "nih"), 8, size=96, seed=1)
    out = tmp_path / "results"
    _check_the_output_is_for_people(_run_local(tmp_path, data, tmp_path / "run", 2, out))
    with open(out / results.TRAIN_CSV) as fh:
        train_rows = list(csv.DictReader(fh))
    assert len(train_rows) == 4
    assert {(r["round"], r["trial"]) for r in train_rows} == {("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")}
    hyper = ("pixels", "mask", "model", "frozen_layers", "learning_rate", "loss", "augmentation", "class_weight")
    filled = hyper + ("status", "epochs", "train_loss", "val_loss", "val_auc", "threshold", "score", "model_uri",
                      "data_version", "run_id", "duration_s")
    for row in train_rows:
        assert row["status"] == "ok", row["error"]
        assert all(row[k] != "" for k in filled), {k: row[k] for k in filled}
    configs = {tuple(r[k] for k in hyper) for r in train_rows}
    assert len(configs) == 4  # no configuration tried twice
    with open(out / results.EVAL_CSV) as fh:
        eval_rows = list(csv.DictReader(fh))
    assert len(eval_rows) == 4 * 4
    assert {r["split"] for r in eval_rows} == {"test", "val", "test+val", "valid"}
    for row in eval_rows:
        assert all(row[k] != "" for k in ("n", "loss", "accuracy", "auc", "sensitivity", "specificity", "tn", "tp"))

    ours = {"pretrain_task": "restore", "pretrain_data": "unlabelled+train", "acquisition_copies": "1",
            "threshold_policy": "youden", "frozen_layers_count": "weighted"}
    assert all({k: r[k] for k in ours} == ours for r in train_rows)

    # the second run is the group's own experiment (`--preset seed`) at the smoke preset's sizes
    first_bytes = (out / results.TRAIN_CSV).read_bytes()
    smoke = {k: v for k, v in parameters.PRESETS["smoke"].items() if k != "search_space"}
    (tmp_path / "tiny.json").write_text(json.dumps({**smoke, "search_space": {"pixels": [64]}}))
    _run_local(tmp_path, data, tmp_path / "run2", 1, out, ("--preset", "seed", "--params", str(tmp_path / "tiny.json")))
    assert (out / results.TRAIN_CSV).read_bytes().startswith(first_bytes)  # earlier rows kept byte for byte
    with open(out / results.TRAIN_CSV) as fh:
        all_rows = list(csv.DictReader(fh))
    assert len(all_rows) == 6 and len({r["run_id"] for r in all_rows}) == 2
    assert len({tuple(r[k] for k in hyper) for r in all_rows}) == 6  # the second run repeated nothing
    (log,) = (tmp_path / "run2" / "logs").glob("run-*.log")  # round 0 did not learn from the other experiment
    assert log.read_text().count("recorded with acquisition_copies=1 (this run: 0)") == 4
    seeds = {"pretrain_task": "identity", "pretrain_data": "unlabelled", "acquisition_copies": "0",
             "threshold_policy": "0.5", "frozen_layers_count": "keras", "class_weight": "False"}
    for row in all_rows[4:]:
        assert row["status"] == "ok", row["error"]
        assert {k: row[k] for k in seeds} == seeds and row["threshold"] == "0.5"


def test_the_seed_preset_compiles_the_groups_experiment(tmp_path):
    spec, _ = _compile(tmp_path, "--preset", "seed")
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["search_space"]["pixels"] == [256, 512] and defaults["search_space"]["class_weight"] == [False]
    assert (defaults["pretrain_task"], defaults["pretrain_data"]) == ("identity", "unlabelled")
    assert (defaults["acquisition_copies"], defaults["threshold_policy"], defaults["frozen_layers_count"]) == (
        0, "0.5", "keras")


@pytest.mark.slow
def test_the_recommended_model_trains_by_one_command(tmp_path):
    """configs/recommended.json, at a tiny size with the same file's structure, by the README's one
    command: the trial trained once per ensemble member (seed, seed + 1), each row recording the
    file's settings, the ensemble evaluated (trial "ensemble") and published as the run's model."""
    from neumo import bundle, results, synthetic

    recommended = json.loads((REPO_ROOT / "configs" / "recommended.json").read_text())
    tiny = {"pretrain_epochs": 1, "epochs": 1, "patience": 1, "ensemble_size": 2, "tta_copies": 1}
    small = {"filters": 4, "depth": 3, "bootstrap": 20}  # sizes the file leaves at their defaults
    config = {**recommended, "trial": {**recommended["trial"], "pixels": 64},
              "parameters": {**recommended["parameters"], **{k: v for k, v in tiny.items()
                                                             if k in recommended["parameters"]}, **small}}
    assert set(config) == set(recommended) and set(recommended["parameters"]) <= set(config["parameters"])
    (tmp_path / "recommended.json").write_text(json.dumps(config))
    data = tmp_path / "data"
    synthetic.write_kaggle(str(data / "images"), {"train": (12, 12), "val": (2, 2), "test": (3, 3)}, size=64, seed=0)
    synthetic.write_nih(str(data / "nih"), 6, size=64, seed=1)
    args = ["--config", str(tmp_path / "recommended.json"), "--local", "--workdir", str(tmp_path / "run"),
            "--set", f"dataset_uri={data / 'images'}", "--set", f"pretrain_uri={data / 'nih'}"]
    done = subprocess.run([sys.executable, str(REPO_ROOT / "pipelines" / "single.py"), *args], capture_output=True,
                          text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "run" / "results"
    with open(out / results.TRAIN_CSV) as fh:
        rows = list(csv.DictReader(fh))
    members = config["parameters"]["ensemble_size"]
    assert [r["seed"] for r in rows] == [str(k) for k in range(members)]
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert all(row[k] == str(config["trial"][k]) for k in ("pixels", "model", "frozen_layers", "loss", "augmentation"))
        for name in ("acquisition", "selection", "threshold_policy", "acquisition_copies", "pretrain_task"):
            assert row[name] == str(config["parameters"][name]), name
        assert float(row["score"]) == float(row["shift_score"])
    with open(out / results.EVAL_CSV) as fh:
        evals = list(csv.DictReader(fh))
    ensemble = [e for e in evals if e["trial"] == "ensemble"]
    assert {e["split"] for e in ensemble} == {"test", "val", "test+val", "valid"}
    assert all(e["threshold_policy"] == config["parameters"]["threshold_policy"] for e in ensemble)
    info = bundle.read_info(str(out / "models" / "best"))
    assert info["kind"] == "ensemble" and len(info["members"]) == members
