"""What you compile is what runs: values checked and baked into the YAML, the same bytes for the same
inputs, the images `make push` made, a single run's configuration kept."""

import json
import subprocess
import sys

import pytest
import yaml

from neumo import parameters
from pipelines import full, runner, single
from tests.conftest import REPO_ROOT


def _defaults(path):
    spec = next(yaml.safe_load_all(path.read_text()))
    return {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}


def test_overrides_are_checked_and_baked_into_the_yaml(tmp_path):
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"epochs": 4, "search_space": {"pixels": [128], "loss": ["focal"]}}))
    path = tmp_path / "p.yaml"
    assert full.main(["--compile", str(path), "--params", str(params), "--set", "epochs=3",
                      "--set", "dataset_uri=gs://b/data", "--set", "clahe_clip=2"]) == 0
    baked = _defaults(path)
    assert baked["epochs"] == 3 and baked["clahe_clip"] == 2.0 and baked["dataset_uri"] == "gs://b/data"
    assert baked["search_space"]["pixels"] == [128] and baked["search_space"]["loss"] == ["focal"]
    assert baked["search_space"]["model"] == [1, 2]  # the dimensions not named come from the default
    assert baked["results_uri"] is None  # still required: a run must say where results go


@pytest.mark.parametrize("argv,match", [
    (["--set", "nonexistent=1"], "unknown pipeline parameter 'nonexistent'"),
    (["--set", "epochs=abc"], "bad value for epochs"),
    (["--set", 'search_space={"pixel": [64]}'], "unknown dimension"),
    (["--set", 'search_space={"pixels": [100]}'], "pixels"),
    (["--set", 'search_space={"loss": ["hinge"]}'], "loss"),
    (["--set", 'config={"pixels": 64}'], "lacks"),
    (["--preset", "nope"], "invalid choice"),
    (["--set", "preprocess_shards=0"], "preprocess_shards must be an integer >= 1"),
    (["--set", "pretrain_nodes=-1"], "pretrain_nodes must be an integer >= 1"),
    (["--set", "rounds=0"], "rounds must be an integer >= 1"),
])
def test_a_bad_value_fails_the_compile_with_its_name(tmp_path, argv, match, capsys):
    with pytest.raises(SystemExit) as raised:
        full.main(["--compile", str(tmp_path / "x.yaml"), *argv])
    assert match in str(raised.value) + capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_the_same_inputs_compile_to_the_same_bytes(tmp_path):
    """Separate processes (protobuf's map order changes from one process to the next)."""
    outputs = []
    for i in range(3):
        path = tmp_path / f"p{i}.yaml"
        done = subprocess.run([sys.executable, str(REPO_ROOT / "pipelines" / "full.py"), "--compile", str(path),
                               "--image-tag", "t1", "--set", 'search_space={"pixels": [64, 128]}'],
                              capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(path.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_compile_names_the_images_make_push_made(tmp_path, monkeypatch, caplog):
    pushed = tmp_path / "pushed.json"
    pushed.write_text(json.dumps({"registry": "r.example/neumo", "tag": "v9-1-gabc", "cpu": "r.example/neumo/neumo-cpu:v9-1-gabc",
                                  "gpu": "r.example/neumo/neumo-gpu:v9-1-gabc"}))
    monkeypatch.setattr(runner, "PUSHED", pushed)
    path = tmp_path / "p.yaml"
    with caplog.at_level("INFO", logger="neumo.pipeline"):
        assert full.main(["--compile", str(path)]) == 0
    images = {e["container"]["image"] for e in next(yaml.safe_load_all(path.read_text()))["deploymentSpec"]["executors"].values()}
    assert images == {"r.example/neumo/neumo-cpu:v9-1-gabc", "r.example/neumo/neumo-gpu:v9-1-gabc"}
    assert "r.example/neumo/neumo-gpu:v9-1-gabc" in caplog.text  # compile says which images it baked in
    monkeypatch.setattr(runner, "PUSHED", tmp_path / "absent.json")
    tag = runner.git_tag()
    assert runner.resolve_images(None, None).cpu == f"ghcr.io/neumo-project/neumo-cpu:{tag}"  # as `make build` tags


def test_trials_per_round_is_named_for_what_it_is(tmp_path):
    spec = next(yaml.safe_load_all((_compile_default(tmp_path)).read_text()))
    suggest_inputs = spec["components"]["comp-suggest"]["inputDefinitions"]["parameters"]
    assert "trials_per_round" in suggest_inputs and "batch_size" not in suggest_inputs


def _compile_default(tmp_path):
    path = tmp_path / "d.yaml"
    assert full.main(["--compile", str(path)]) == 0
    return path


def test_single_has_its_own_help_and_keeps_its_configuration(tmp_path):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "pipelines" / "single.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--config" in done.stdout and "single training run" in done.stdout
    path = tmp_path / "s.yaml"
    assert single.main(["--config", str(REPO_ROOT / "configs" / "trial.json"), "--compile", str(path)]) == 0
    baked = _defaults(path)
    assert baked["config"] == json.loads((REPO_ROOT / "configs" / "trial.json").read_text())
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({**baked["config"], "augmentation": "stronk"}))
    with pytest.raises(SystemExit, match="augmentation"):
        single.main(["--config", str(typo), "--compile", str(tmp_path / "t.yaml")])
    with pytest.raises(SystemExit, match="--config FILE is required"):
        single.main(["--compile", str(tmp_path / "t.yaml")])


def test_every_example_configuration_is_a_valid_trial():
    from neumo.trial import TrialConfig

    configs = sorted((REPO_ROOT / "configs").glob("*.json"))
    assert configs
    for path in configs:
        trial, params = runner.read_config(str(path))
        TrialConfig.from_dict(trial)
        parameters.apply(parameters.defaults(), params)


def test_a_configuration_with_parameters_is_read_strictly(tmp_path):
    recommended = json.loads((REPO_ROOT / "configs" / "recommended.json").read_text())
    trial, params = runner.read_config(str(REPO_ROOT / "configs" / "recommended.json"))
    assert trial == recommended["trial"] and params == recommended["parameters"]
    for bad, match in (({**recommended, "extra": 1}, "unknown key"),
                       ({**recommended, "parameters": {"epochs": "many"}}, "parameters.epochs"),
                       ({**recommended, "parameters": {"threshold_policy": "median"}}, "parameters.threshold_policy"),
                       ({**recommended, "parameters": {"rounds": 3}}, "cannot set"),
                       ({**recommended, "trial": [1]}, "JSON objects")):
        path = tmp_path / "c.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            runner.read_config(str(path))
    # the file's parameters are baked into the YAML; --set overrides them
    out = tmp_path / "r.yaml"
    assert single.main(["--config", str(REPO_ROOT / "configs" / "recommended.json"), "--set", "epochs=2",
                        "--compile", str(out)]) == 0
    text = out.read_text()
    assert "#    epochs: int [Default: 2.0]" in text and "#    pretrain_epochs: int [Default: 3.0]" in text
    assert "#    ensemble_size: int [Default: 2.0]" in text and "threshold_policy: str [Default: 'pooled_shifts']" in text


def test_help_lists_every_parameter_with_its_default():
    text = runner.parameter_list()
    for p in parameters.PARAMETERS:
        assert f"  {p.name} = " in text, p.name
