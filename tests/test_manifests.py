"""The Kubernetes manifests: kustomize builds them, the Kubernetes schemas accept them (strict),
and they say what the pipeline needs (identity, least privilege, GPU quota, trial priority, the
GPU node pool that pipelines/placement.py targets).

Offline tools only: `kubectl kustomize` renders base/ and overlays/gke/ (skipped, with the reason,
when kubectl is absent); `kubernetes-validate --strict` checks every object against the
Kubernetes OpenAPI schemas (skipped when absent: `make manifests-check` installs it). No API
server runs here, so admission (quota use, RBAC in action) is not exercised.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.placement import Placement

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
BASE, GKE = MANIFESTS / "base", MANIFESTS / "overlays" / "gke"
STANDALONE = MANIFESTS / "overlays" / "gke-standalone"
TRAINER_OPERATOR = MANIFESTS / "overlays" / "trainer-operator"
TRAINER_RUNTIME = MANIFESTS / "overlays" / "trainer-runtime"
KUBECTL = shutil.which("kubectl")
_beside = Path(sys.executable).parent / "kubernetes-validate"
VALIDATE = str(_beside) if _beside.exists() else shutil.which("kubernetes-validate")

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: kustomize output not built "
                                   "(the raw base files are still validated one by one)")
needs_validate = pytest.mark.skipif(VALIDATE is None, reason="kubernetes-validate is not installed "
                                    "(`make manifests-check` installs it into .venv)")


def kustomize(folder: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def validate(paths: list[Path]) -> None:
    out = subprocess.run([VALIDATE, "--strict", "--quiet", *map(str, paths)], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def raw_base() -> list[dict]:
    docs = []
    for path in sorted(BASE.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


@needs_validate
def test_every_base_file_validates_strictly(tmp_path):
    files = [p for p in sorted(BASE.glob("*.yaml")) if p.name != "kustomization.yaml"]
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in files), "a base file is missing from kustomization.yaml"
    validate(files)


@needs_validate
def test_strict_validation_rejects_a_misspelt_field(tmp_path):
    """Negative control: the validator really checks fields (a typo in a quota must fail)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: ResourceQuota\nmetadata:\n  name: x\nspec:\n  hardd:\n    pods: '1'\n")
    with pytest.raises(AssertionError, match="hardd"):
        validate([bad])


@needs_kubectl
@needs_validate
@pytest.mark.parametrize("folder", [BASE, GKE, STANDALONE], ids=["base", "overlays/gke", "overlays/gke-standalone"])
def test_kustomize_output_validates_strictly(folder, tmp_path):
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(kustomize(folder)))
    validate([rendered])


def _check_objects(objects: dict[tuple[str, str], dict], namespace: str | None = "neumo"):
    """namespace: where kustomize put the objects (None: the raw base files, which leave it to kustomize)."""
    assert objects[("Namespace", namespace or "neumo")]
    for (kind, name), doc in objects.items():
        if kind not in {"Namespace", "PriorityClass"}:
            assert doc["metadata"].get("namespace") == namespace, (kind, name)

    sa = objects[("ServiceAccount", "neumo-pipeline")]
    assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")

    rules = objects[("Role", "neumo-pipeline")]["rules"]
    def verbs(group: str, resource: str) -> set[str]:
        return {v for r in rules if group in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]}
    assert {"create", "patch"} <= verbs("argoproj.io", "workflowtaskresults")
    assert {"get", "list", "watch"} == verbs("", "pods")
    assert verbs("", "pods/log") == {"get"}
    # pretrain_nodes > 1: the pretrain-job step creates a TrainJob, waits for it, deletes it when it failed
    assert verbs("trainer.kubeflow.org", "trainjobs") == {"create", "get", "list", "watch", "delete"}
    everything = {v for r in rules for v in r["verbs"]} | {res for r in rules for res in r["resources"]}
    assert "*" not in everything and "secrets" not in everything
    assert all("delete" not in r["verbs"] or r["resources"] == ["trainjobs"] for r in rules), "delete: trainjobs only"
    binding = objects[("RoleBinding", "neumo-pipeline")]
    assert binding["roleRef"]["name"] == "neumo-pipeline"
    subject = {"kind": "ServiceAccount", "name": "neumo-pipeline"} | ({"namespace": namespace} if namespace else {})
    assert binding["subjects"] == [subject]

    trial = objects[("PriorityClass", "neumo-tuning-trial")]
    assert trial["value"] < 0 and trial["preemptionPolicy"] == "Never" and not trial.get("globalDefault")

    quota = objects[("ResourceQuota", "neumo-gpu")]["spec"]["hard"]
    assert int(quota["requests.nvidia.com/gpu"]) >= 1
    assert not {"requests.cpu", "requests.memory", "cpu", "memory"} & set(quota)  # KFP driver pods set none

    requirements = objects[("ConfigMap", "neumo-cluster-requirements")]["data"]
    assert tuple(int(x) for x in requirements["kfp-backend-min-version"].split(".")) >= (2, 5)
    return requirements


def test_raw_base_says_what_the_pipeline_needs():
    _check_objects(by_kind(raw_base()), namespace=None)


@needs_kubectl
def test_base_renders_into_the_neumo_namespace():
    requirements = _check_objects(by_kind(kustomize(BASE)))
    assert requirements["gpu-node-selector"] == "=".join(Placement.gpu_node_selector)
    assert requirements["gpu-toleration"] == "{}={}:{}".format(*Placement.gpu_toleration)
    assert requirements["gpu-resource"] == Placement.gpu_type


@needs_kubectl
def test_gke_overlay_sets_workload_identity_quota_and_the_node_pool_placement_targets():
    base, gke = by_kind(kustomize(BASE)), by_kind(kustomize(GKE))
    requirements = _check_objects(gke)
    annotation = "iam.gke.io/gcp-service-account"
    assert (gke[("ServiceAccount", "neumo-pipeline")]["metadata"]["annotations"][annotation]
            != base[("ServiceAccount", "neumo-pipeline")]["metadata"]["annotations"][annotation])
    assert "PROJECT_ID" not in gke[("ServiceAccount", "neumo-pipeline")]["metadata"]["annotations"][annotation]
    assert gke[("ResourceQuota", "neumo-gpu")]["spec"]["hard"] != base[("ResourceQuota", "neumo-gpu")]["spec"]["hard"]
    # The node pool the overlay documents is the one the compiled pipeline selects and tolerates by default.
    assert requirements["gpu-node-selector"] == "=".join(Placement.gpu_node_selector)
    assert requirements["gpu-toleration"] == "{}={}:{}".format(*Placement.gpu_toleration)
    assert requirements["kfp-backend-min-version"] == base[("ConfigMap", "neumo-cluster-requirements")]["data"][
        "kfp-backend-min-version"]  # merged, not replaced


@needs_kubectl
def test_standalone_overlay_moves_everything_into_kfps_namespace():
    """Standalone KFP runs pipeline pods in `kubeflow`: the service account and its binding follow."""
    gke, standalone = by_kind(kustomize(GKE)), by_kind(kustomize(STANDALONE))
    _check_objects(standalone, namespace="kubeflow")
    annotation = "iam.gke.io/gcp-service-account"
    assert (standalone[("ServiceAccount", "neumo-pipeline")]["metadata"]["annotations"][annotation]
            == gke[("ServiceAccount", "neumo-pipeline")]["metadata"]["annotations"][annotation])


def test_the_trainer_operator_is_pinned_to_the_release_of_the_models_neumo_builds_trainjobs_from():
    """The operator overlay fetches Kubeflow Trainer at a release tag (not a branch), the one
    whose API models (kubeflow-trainer-api) build and check neumo's TrainJobs; the cluster
    requirements name the same release and the runtime neumo's TrainJobs ask for."""
    from importlib.metadata import version

    from neumo import trainjob

    (remote,) = yaml.safe_load((TRAINER_OPERATOR / "kustomization.yaml").read_text())["resources"]
    assert remote.startswith("https://github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=v")
    tag = remote.rsplit("?ref=", 1)[1]
    assert tag == "v" + version("kubeflow-trainer-api")
    requirements = by_kind(raw_base())[("ConfigMap", "neumo-cluster-requirements")]["data"]
    assert requirements["kubeflow-trainer-version"] == tag
    assert requirements["trainer-runtime"] == trainjob.RUNTIME


@needs_kubectl
def test_the_trainer_runtime_overlay_renders_the_runtime():
    """The ClusterTrainingRuntime is not a core kind (kubernetes-validate has no schema for it):
    tests/test_trainjob.py checks it against the Trainer's own schema; here, that kustomize renders
    it, cluster-scoped, labelled as neumo's."""
    from neumo import trainjob

    (runtime,) = kustomize(TRAINER_RUNTIME)
    expected = trainjob.runtime().to_dict()
    expected["metadata"]["labels"]["app.kubernetes.io/part-of"] = "neumo"
    assert runtime == expected and "namespace" not in runtime["metadata"]
