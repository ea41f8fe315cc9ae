"""Pretraining on several nodes (neumo.trainjob, components/pretrain_job): the TrainJob and the
ClusterTrainingRuntime validate against the Trainer's schema, every node works out the same
TF_CONFIG, the launcher waits for the job and reports its failure in one line, and the compiled
pipeline carries the job's settings.

No cluster runs here: the Kubernetes calls are faked, and the operator is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
import yaml
from kubeflow_trainer_api import models as m
from pydantic import BaseModel

from components.images import GPU_IMAGE
from components.pretrain.component import pretrain
from components.pretrain_job import component as job_component
from neumo import cli, parameters, trainjob
from pipelines import full
from pipelines.placement import Placement
from tests.conftest import REPO_ROOT, compile_with_only_kfp

RUNTIME_YAML = REPO_ROOT / "manifests" / "overlays" / "trainer-runtime" / "clustertrainingruntime.yaml"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
SETTINGS = job_component.trainjob_settings(Placement(gpu_limit=4), "registry.example/neumo-gpu:t1", 2)
STAGE = {"pretrain_epochs": 3, "filters": 8, "depth": 3, "seed": 7, "pretrain_task": "restore",
         "pretrain_data": "unlabelled+train"}


# --- the CRDs' schema ---------------------------------------------------------------------------

def schema_errors(model: type[BaseModel], data: Any, path: str = "$") -> list[str]:
    """Where `data` strays from `model`'s schema: unknown fields (the CRDs are structural schemas
    without x-kubernetes-preserve-unknown-fields here, so the API server would prune them), missing
    required fields, wrong types.

    Why this is the CRD's OpenAPI schema: kubeflow-trainer-api's models are generated
    (openapi-generator) from the Trainer's OpenAPI spec, which controller-gen generates from the same
    Go types as the TrainJob and ClusterTrainingRuntime CRDs (and, inside them, JobSet's and
    Kubernetes' own types); the package's version is the Trainer release the operator overlay pins.
    The CRD YAML itself cannot be fetched in a test (no network). What the schema cannot say (the
    CRDs' CEL rules) is left to the API server."""
    if not isinstance(data, dict):
        return [f"{path}: expected an object, got {type(data).__name__}"]
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    errors = [f"{path}.{key}: unknown field" for key in data if key not in fields]
    for key, field in fields.items():
        if key in data:
            errors += _value_errors(field.annotation, data[key], f"{path}.{key}")
        elif field.is_required():
            errors.append(f"{path}.{key}: required")
    return errors


def _value_errors(kind: Any, value: Any, path: str) -> list[str]:
    origin, args = get_origin(kind), get_args(kind)
    if origin is Annotated:  # StrictStr, StrictInt, ...
        return _value_errors(args[0], value, path)
    if origin in (Union, types.UnionType):  # Optional[...]
        options = [a for a in args if a is not type(None)]
        found = [_value_errors(a, value, path) for a in options]
        return [] if value is None or any(not e for e in found) else found[0]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(value) for e in _value_errors(args[0], item, f"{path}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: expected a map"]
        return [e for k, v in value.items() for e in
                ([f"{path}: key {k!r} is not a string"] if not isinstance(k, str) else [])
                + _value_errors(args[1], v, f"{path}[{k!r}]")]
    if kind is Any:
        return []
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        if "actual_instance" in kind.model_fields:  # a oneOf (resource.Quantity: a string or a number)
            ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
            return [] if ok else [f"{path}: expected a quantity, got {value!r}"]
        return schema_errors(kind, value, path)
    expected = {str: str, int: int, bool: bool, float: (int, float), datetime: str}.get(kind)
    if expected is None:
        return [f"{path}: the test does not know the type {kind!r}"]
    if not isinstance(value, expected) or (kind is int and isinstance(value, bool)):
        return [f"{path}: expected {kind.__name__}, got {value!r}"]
    return []


def assert_valid(model: type[BaseModel], data: dict) -> None:
    assert schema_errors(model, data) == []
    assert model.from_dict(data).to_dict() == data, "the models' round trip changed the object"


def test_the_schema_check_refuses_unknown_and_missing_fields_and_wrong_types():
    """Negative control: the check really reads the schema."""
    job = trainjob.train_job(name="x", command=["neumo"], settings=SETTINGS).to_dict()
    job["spec"]["trainer"]["numNode"] = 2
    del job["spec"]["runtimeRef"]["name"]
    job["spec"]["trainer"]["args"] = [1]
    job["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] = True
    errors = schema_errors(m.TrainerV1alpha1TrainJob, job)
    assert "$.spec.trainer.numNode: unknown field" in errors
    assert "$.spec.runtimeRef.name: required" in errors
    assert any(e.startswith("$.spec.trainer.args[0]: expected str") for e in errors)
    assert any("resourcesPerNode.limits['nvidia.com/gpu']: expected a quantity" in e for e in errors)
    rt = trainjob.runtime().to_dict()
    rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0][
        "imagee"] = "x"
    assert schema_errors(m.TrainerV1alpha1ClusterTrainingRuntime, rt) == [
        "$.spec.template.spec.replicatedJobs[0].template.spec.template.spec.containers[0].imagee: unknown field"]


def test_the_runtime_validates_and_is_what_trainer_needs():
    rt = trainjob.runtime().to_dict()
    assert_valid(m.TrainerV1alpha1ClusterTrainingRuntime, rt)
    assert (rt["apiVersion"], rt["kind"], rt["metadata"]["name"]) == (
        "trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime", "neumo-tensorflow")
    policy = rt["spec"]["mlPolicy"]
    assert not {"torch", "mpi", "jax", "xgboost", "flux"} & set(policy), "the plain-ML policy: no framework plugin"
    jobs = rt["spec"]["template"]["spec"]["replicatedJobs"]
    assert [j["name"] for j in jobs] == ["node"]
    job = jobs[0]["template"]
    # Trainer finds the trainer step by this label, sets its parallelism/completions to numNodes and
    # puts the TrainJob's image, command, args, env and resources on the container named "node".
    assert job["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["backoffLimit"] == 0
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "node" and container["image"] == GPU_IMAGE
    fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert set(fields) == set(trainjob.JOBSET_ENV)
    assert [p["containerPort"] for p in container["ports"]] == [trainjob.TF_PORT]


def test_the_checked_in_runtime_is_the_current_rendering():
    assert yaml.safe_load(RUNTIME_YAML.read_text()) == trainjob.runtime().to_dict(), (
        "manifests/overlays/trainer-runtime is stale: cd shared && python -m neumo.trainjob runtime > "
        "../manifests/overlays/trainer-runtime/clustertrainingruntime.yaml")
    assert RUNTIME_YAML.read_text() == trainjob._render_runtime()


@pytest.mark.skipif(not VALIDATE.exists(), reason="kubernetes-validate is not installed (`make manifests-check`)")
def test_the_runtimes_job_is_a_valid_kubernetes_job(tmp_path):
    """The Job inside the JobSet, checked against Kubernetes' own OpenAPI schema (strict), as a
    batch/v1 Job: the part of the runtime that is core Kubernetes."""
    replicated = trainjob.runtime().to_dict()["spec"]["template"]["spec"]["replicatedJobs"][0]
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "node", **replicated["template"]["metadata"]},
           "spec": replicated["template"]["spec"]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    done = subprocess.run([str(VALIDATE), "--strict", "--quiet", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_train_job_validates_and_carries_the_settings():
    command = trainjob.pretrain_command(data_uri="gs://b/root/data", backbone_uri="gs://b/root/backbone", stage=STAGE)
    job = trainjob.train_job(name=trainjob.job_name("gs://b/root/backbone"), command=command, settings=SETTINGS,
                             service_account="neumo-pipeline").to_dict()
    assert_valid(m.TrainerV1alpha1TrainJob, job)
    spec = job["spec"]
    assert spec["runtimeRef"] == {"name": "neumo-tensorflow"}
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["image"] == "registry.example/neumo-gpu:t1"
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4"}
    assert trainer["resourcesPerNode"]["requests"] == {"nvidia.com/gpu": "4", "cpu": Placement.gpu_cpu_request,
                                                       "memory": Placement.gpu_memory_request}
    assert trainer["env"] == [{"name": trainjob.NODES_ENV, "value": "2"}]
    assert trainer["command"] == ["python", "-m", "neumo.trainjob", "node"] and trainer["args"] == command
    (patch,) = spec["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = replicated["template"]["spec"]["template"]["spec"]
    assert replicated["name"] == "node" and pod["serviceAccountName"] == "neumo-pipeline"
    assert pod["nodeSelector"] == dict([Placement.gpu_node_selector])
    key, value, effect = Placement.gpu_toleration
    assert pod["tolerations"] == [{"key": key, "operator": "Equal", "value": value, "effect": effect}]
    assert len(job["metadata"]["name"]) <= 30, "JobSet puts the name into every pod's hostname (63 at most)"


def test_the_nodes_run_the_pretrain_stage_with_the_steps_parameters():
    command = trainjob.pretrain_command(data_uri="gs://b/d", backbone_uri="gs://b/bb", stage=STAGE)
    assert command[:2] == ["neumo", "pretrain"]
    args = cli.build_parser().parse_args(command[1:])
    assert (args.data, args.out) == ("gs://b/d", "gs://b/bb")
    assert {k: getattr(args, k) for k in STAGE} == STAGE


def test_the_job_step_takes_what_the_pretrain_step_takes():
    one, many = pretrain.component_spec, job_component.pretrain_job.component_spec
    assert set(many.inputs) == set(one.inputs) | {"job"}
    assert set(many.outputs) == set(one.outputs) == {"backbone"}
    assert set(STAGE) == set(one.inputs) - {"data"} and set(STAGE) <= set(parameters.BY_NAME)
    assert job_component.SERVICE_ACCOUNT_ENV == trainjob.SERVICE_ACCOUNT_ENV


def test_the_job_name_is_stable_per_backbone():
    assert trainjob.job_name("gs://b/x") == trainjob.job_name("gs://b/x") != trainjob.job_name("gs://b/y")


# --- TF_CONFIG ----------------------------------------------------------------------------------

def node_env(index, nodes, **extra):
    env = {"NEUMO_JOBSET_NAME": "neumo-pretrain-abc", "NEUMO_REPLICATED_JOB": "node", "NEUMO_JOB_INDEX": "0",
           trainjob.NODES_ENV: str(nodes), trainjob.COMPLETION_INDEX_ENV: str(index)}
    return {**env, **extra}


@pytest.mark.parametrize("nodes", [2, 4])
def test_every_node_builds_the_same_cluster_and_its_own_task(nodes):
    configs = [trainjob.tf_config_from_jobset(node_env(i, nodes)) for i in range(nodes)]
    workers = [f"neumo-pretrain-abc-node-0-{i}.neumo-pretrain-abc:{trainjob.TF_PORT}" for i in range(nodes)]
    assert all(c["cluster"] == {"worker": workers} for c in configs)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(nodes)]


@pytest.mark.parametrize("env,match", [
    (node_env(0, 2, JOB_COMPLETION_INDEX=""), "JOB_COMPLETION_INDEX is not set"),
    ({k: v for k, v in node_env(0, 2).items() if k != "NEUMO_NUM_NODES"}, "NEUMO_NUM_NODES is not set"),
    (node_env(2, 2), r"JOB_COMPLETION_INDEX=2 is out of range for 2 nodes \(0 to 1\)"),
    (node_env(-1, 2), "out of range"),
    (node_env(0, 2, NEUMO_JOBSET_NAME=""), "NEUMO_JOBSET_NAME is not set"),
    (node_env(0, 2, NEUMO_NUM_NODES="two"), "NEUMO_NUM_NODES must be an integer, got 'two'"),
])
def test_a_node_outside_a_trainjob_is_refused_in_one_line(env, match):
    with pytest.raises(ValueError, match=match) as raised:
        trainjob.tf_config_from_jobset(env)
    assert "\n" not in str(raised.value)


def test_the_node_entrypoint_sets_tf_config_then_becomes_the_command(monkeypatch):
    for k, v in node_env(1, 2).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TF_CONFIG", "")  # recorded as absent before: restored (removed) after the test
    ran = []
    assert trainjob.main(["node", "neumo", "pretrain", "--data", "x"], execvp=lambda f, a: ran.append((f, a))) == 0
    assert ran == [("neumo", ["neumo", "pretrain", "--data", "x"])]
    assert json.loads(os.environ["TF_CONFIG"])["task"] == {"type": "worker", "index": 1}


def test_the_node_entrypoint_runs_the_command_in_its_place():
    """`python -m neumo.trainjob node COMMAND...` for real: COMMAND starts with TF_CONFIG set."""
    env = {**os.environ, **node_env(0, 2), "PYTHONPATH": str(REPO_ROOT / "shared")}
    done = subprocess.run([sys.executable, "-m", "neumo.trainjob", "node", sys.executable, "-c",
                           "import json, os; print(json.dumps(json.loads(os.environ['TF_CONFIG'])['task']))"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"type": "worker", "index": 0}


def test_the_node_entrypoint_refuses_outside_a_trainjob(monkeypatch, caplog):
    monkeypatch.delenv(trainjob.COMPLETION_INDEX_ENV, raising=False)
    assert trainjob.main(["node", "neumo"], execvp=lambda f, a: pytest.fail("must not run")) == 2
    assert "is not set" in caplog.text


# --- the launcher -------------------------------------------------------------------------------

def status(*conditions):
    return {"status": {"conditions": [{"type": t, "status": s, "reason": r, "message": msg}
                                      for t, s, r, msg in conditions]}}


class Clock:
    """A fake clock that sleep() advances."""

    def __init__(self):
        self.now, self.slept = 0.0, []

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def test_wait_returns_when_the_job_completes():
    """A read that did not get through (None) is tried again at the next poll."""
    answers = iter([{}, None, status(("Created", "True", "JobsCreationSucceeded", "")),
                    status(("Created", "True", "JobsCreationSucceeded", ""),
                           ("Complete", "True", "JobSetCompleted", "done"))])
    clock = Clock()
    job = trainjob.wait("j", lambda name: next(answers), poll_s=30, sleep=clock.sleep, clock=lambda: clock.now)
    assert trainjob.state(job) == ("Complete", "done") and clock.slept == [30, 30, 30]


def test_wait_reports_a_failed_job_with_its_message():
    failed = status(("Failed", "True", "JobSetFailed", "jobset failed: node-0 exited 2"))
    with pytest.raises(ValueError, match="TrainJob j failed: jobset failed: node-0 exited 2") as raised:
        trainjob.wait("j", lambda name: failed, sleep=pytest.fail)
    assert "\n" not in str(raised.value)


def test_wait_gives_up_after_the_timeout():
    clock = Clock()
    with pytest.raises(ValueError, match="TrainJob j did not finish within 100 s"):
        trainjob.wait("j", lambda name: status(("Created", "True", "JobsCreationSucceeded", "")), timeout_s=100,
                      poll_s=30, sleep=clock.sleep, clock=lambda: clock.now)
    assert clock.slept == [30, 30, 30, 10]


class FakeCluster:
    """create / read / delete, recording what the launcher asked for."""

    def __init__(self, answers, exists=False):
        self.answers, self.exists, self.created, self.deleted = iter(answers), exists, [], []

    def calls(self):
        def create(body):
            self.created.append(body)
            return not self.exists
        return create, lambda name: next(self.answers), self.deleted.append


def test_run_creates_the_job_and_waits_for_it(monkeypatch):
    monkeypatch.setenv(trainjob.SERVICE_ACCOUNT_ENV, "neumo-pipeline")
    fake = FakeCluster([status(("Complete", "True", "JobSetCompleted", ""))])
    trainjob.run(data_uri="gs://b/d", backbone_uri="gs://b/bb", stage=STAGE, settings=SETTINGS, calls=fake.calls())
    (body,) = fake.created
    assert body["metadata"]["name"] == trainjob.job_name("gs://b/bb") and not fake.deleted
    assert_valid(m.TrainerV1alpha1TrainJob, body)
    pod = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["template"]["spec"]["template"]["spec"]["serviceAccountName"] == "neumo-pipeline"


def test_run_waits_for_the_job_an_earlier_attempt_created():
    fake = FakeCluster([status(("Complete", "True", "JobSetCompleted", ""))], exists=True)
    trainjob.run(data_uri="gs://b/d", backbone_uri="gs://b/bb", stage=STAGE, settings=SETTINGS, calls=fake.calls())
    assert len(fake.created) == 1 and not fake.deleted


def test_run_deletes_a_failed_job_so_the_retry_starts_afresh():
    fake = FakeCluster([status(("Failed", "True", "JobSetFailed", "node-1 was preempted"))])
    with pytest.raises(ValueError, match="node-1 was preempted"):
        trainjob.run(data_uri="gs://b/d", backbone_uri="gs://b/bb", stage=STAGE, settings=SETTINGS, calls=fake.calls())
    assert fake.deleted == [trainjob.job_name("gs://b/bb")]


def test_the_cluster_calls_map_the_api_servers_answers(monkeypatch):
    """The one function that talks to Kubernetes, against a fake CustomObjectsApi: an existing job
    is not an error, a refusal is one line, a blip is tried again, a vanished job is an error."""
    import kubernetes
    from kubernetes.client.exceptions import ApiException

    class Api:
        answers: dict = {}

        def _answer(self, verb, *args, **kwargs):
            answer = self.answers[verb]
            if isinstance(answer, Exception):
                raise answer
            return answer

        def create_namespaced_custom_object(self, group, version, ns, plural, body):
            assert (group, version, ns, plural) == ("trainer.kubeflow.org", "v1alpha1", "neumo", "trainjobs")
            return self._answer("create")

        def get_namespaced_custom_object(self, group, version, ns, plural, name):
            return self._answer("read")

        def delete_namespaced_custom_object(self, group, version, ns, plural, name, propagation_policy):
            return self._answer("delete")

    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", Api)
    create, read, delete = trainjob.cluster("neumo")
    body = {"metadata": {"name": "j"}}
    Api.answers = {"create": {}, "read": {"status": {}}, "delete": ApiException(status=404, reason="Not Found")}
    assert create(body) is True and read("j") == {"status": {}} and delete("j") is None
    Api.answers = {"create": ApiException(status=409, reason="Conflict"),
                   "read": ApiException(status=503, reason="Service Unavailable")}
    assert create(body) is False and read("j") is None
    Api.answers = {"create": ApiException(status=403, reason="Forbidden"), "read": ApiException(status=404, reason="x")}
    with pytest.raises(ValueError, match="cannot create TrainJob j in neumo: 403 Forbidden"):
        create(body)
    with pytest.raises(ValueError, match="TrainJob j is gone from neumo"):
        read("j")


def test_the_namespace_outside_a_pod_is_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match="must run in a Kubernetes pod"):
        trainjob.namespace(str(tmp_path / "absent"))
    (tmp_path / "ns").write_text("neumo\n")
    assert trainjob.namespace(str(tmp_path / "ns")) == "neumo"


def test_fetch_copies_the_backbone_the_chief_wrote(gcs_bucket, tmp_path):
    from neumo import storage

    uri = f"gs://{gcs_bucket}/root/backbone"
    info = {"pixels": 64, "mask": False, "best_val_loss": None}
    storage.write_text(storage.join(uri, "pretrain.json"), json.dumps(info))
    storage.write_bytes(storage.join(uri, "autoencoder.keras"), b"model")
    local = tmp_path / "backbone"
    assert trainjob.fetch(uri, str(local)) == info
    assert (local / "autoencoder.keras").read_bytes() == b"model"


def test_fetch_refuses_a_job_that_wrote_nothing(tmp_path):
    with pytest.raises(ValueError, match="wrote no pretrain.json"):
        trainjob.fetch(str(tmp_path / "empty"), str(tmp_path / "out"))


# --- the compiled pipeline ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> tuple[dict, dict]:
    path = tmp_path_factory.mktemp("trainjob") / "p.yaml"
    assert full.main(["--compile", str(path), "--set", "pretrain_nodes=2", "--gpu-limit", "4", "--rounds", "1",
                      "--trials", "1", "--registry", "registry.example", "--image-tag", "t1"]) == 0
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform


def _task(spec: dict, name: str) -> dict | None:
    for comp in (spec["root"], *spec["components"].values()):
        if name in comp.get("dag", {}).get("tasks", {}):
            return comp["dag"]["tasks"][name]
    return None


def test_the_distributed_variant_launches_a_trainjob_instead_of_pretraining_in_its_pod(distributed):
    spec, platform = distributed
    assert _task(spec, "pretrain") is None
    task = _task(spec, "pretrain-job")
    settings = task["inputs"]["parameters"]["job"]["runtimeValue"]["constant"]
    assert settings["nodes"] == 2 and settings["gpus_per_node"] == 4
    assert settings["image"] == "registry.example/neumo-gpu:t1" and settings["gpu_type"] == Placement.gpu_type
    assert task["retryPolicy"]["maxRetryCount"] == Placement.retries
    label = spec["components"]["comp-pretrain-job"]["executorLabel"]
    container = spec["deploymentSpec"]["executors"][label]["container"]
    assert container["image"] == "registry.example/neumo-cpu:t1" and "accelerator" not in container["resources"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][label]
    assert k8s["fieldPathAsEnv"] == [{"fieldPath": "spec.serviceAccountName", "name": trainjob.SERVICE_ACCOUNT_ENV}]
    # the catalog takes the job step's backbone
    assert "pretrain-job" in yaml.safe_dump(spec["root"]["dag"]["tasks"]["catalog"])
    # and the TrainJob the step will create from these settings validates
    job = trainjob.train_job(name="x", command=["neumo"], settings=settings).to_dict()
    assert_valid(m.TrainerV1alpha1TrainJob, job)
    assert job["spec"]["trainer"]["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4"}


def test_one_node_keeps_the_pretrain_step(tmp_path):
    path = tmp_path / "p.yaml"
    assert full.main(["--compile", str(path), "--rounds", "1", "--trials", "1"]) == 0
    spec, _ = yaml.safe_load_all(path.read_text())
    assert _task(spec, "pretrain") is not None and _task(spec, "pretrain-job") is None


def test_the_distributed_variant_compiles_with_only_kfp(tmp_path):
    """compile_with_only_kfp with --set pretrain_nodes=2: the Trainer's models and every neumo
    module but the parameters stay out of a compile."""
    out = tmp_path / "p.yaml"
    compile_with_only_kfp(REPO_ROOT / "pipelines" / "full.py", out, ("--set", "pretrain_nodes=2", "--gpu-limit", "4"),
                          blocked=("kubeflow_trainer_api",))
    assert "pretrain-job" in out.read_text()
