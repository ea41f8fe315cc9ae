"""GPU placement, resources, retries and images in the compiled pipeline, read back from the YAML.

The pipeline is compiled through `pipelines.full.main(["--compile", ...])` with non-default
placement options, and both YAML documents are checked: the pipeline spec (images, resources,
accelerators, retry policies) and the Kubernetes platform spec (node selectors, tolerations).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipelines import full
from pipelines.placement import Placement

# The pipeline's own lists decide; the stages named in the design must be among them.
GPU_STAGES = set(full.GPU_COMPONENTS)
CPU_STAGES = set(full.CPU_COMPONENTS)
REGISTRY, TAG = "registry.example/team", "t-0a1b2c3-dirty"
SELECTOR = ("cloud.google.com/gke-accelerator", "nvidia-l4")
GPU_LIMIT, RETRIES = 2, 3


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    path = tmp_path_factory.mktemp("placement") / "neumo-full.yaml"
    assert full.main(["--compile", str(path), "--registry", REGISTRY, "--image-tag", TAG, "--gpu-type", "nvidia.com/gpu",
                      "--gpu-limit", str(GPU_LIMIT), "--gpu-node-selector", "=".join(SELECTOR),
                      "--retries", str(RETRIES), "--rounds", "2", "--trials", "2"]) == 0
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    assert len(docs) == 2, "expected the pipeline spec and the platform spec"
    return docs[0], docs[1]


def _tasks(spec: dict) -> list[tuple[str, dict, str]]:
    """Every container task in every DAG (root and loop bodies): (stage, task, executor label)."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    out = []
    for dag in dags:
        for name, task in dag["tasks"].items():
            component = spec["components"][task["componentRef"]["name"]]
            if "executorLabel" in component:
                out.append((re.sub(r"-\d+$", "", name), task, component["executorLabel"]))
    return out


def test_the_design_stages_are_on_the_right_kind_of_node():
    assert {"train-mask-model", "mask", "pretrain", "train", "evaluate"} <= GPU_STAGES
    assert {"ingest", "plan", "preprocess", "catalog", "suggest", "aggregate"} <= CPU_STAGES


def test_every_stage_is_in_the_graph_on_exactly_one_kind_of_node(compiled):
    """Some stages are in the graph only for some shapes (the shard tasks of preprocess_shards > 1,
    the pretrain-job of pretrain_nodes > 1): the default graph has the design's stages, each on one
    kind of node."""
    stages = {stage for stage, _, _ in _tasks(compiled[0])}
    design = {"fingerprint", "ingest", "plan", "train-mask-model", "mask", "preprocess", "pretrain", "catalog",
              "suggest", "train", "evaluate", "aggregate"}
    assert design <= stages <= GPU_STAGES | CPU_STAGES and not GPU_STAGES & CPU_STAGES


def test_gpu_stages_get_accelerator_node_selector_toleration_and_retries(compiled):
    spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    key, value, effect = Placement.gpu_toleration
    seen = set()
    for stage, task, label in _tasks(spec):
        if stage not in GPU_STAGES:
            continue
        seen.add(stage)
        container = executors[label]["container"]
        accelerator = container["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu" and int(accelerator["resourceCount"]) == GPU_LIMIT, label
        assert k8s[label]["nodeSelector"]["labels"] == dict([SELECTOR]), label
        assert {"key": key, "operator": "Equal", "value": value, "effect": effect} in k8s[label]["tolerations"], label
        assert task["retryPolicy"]["maxRetryCount"] == RETRIES, stage
        assert container["image"] == f"{REGISTRY}/neumo-gpu:{TAG}"
    assert seen == GPU_STAGES & {stage for stage, _, _ in _tasks(spec)}


def test_cpu_stages_get_no_gpu_placement(compiled):
    spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for stage, task, label in _tasks(spec):
        if stage not in CPU_STAGES:
            continue
        assert "accelerator" not in executors[label]["container"]["resources"], label
        assert "nodeSelector" not in k8s.get(label, {}) and "tolerations" not in k8s.get(label, {}), label
        assert "retryPolicy" not in task, stage
        assert executors[label]["container"]["image"] == f"{REGISTRY}/neumo-cpu:{TAG}"


def test_every_task_requests_cpu_and_memory(compiled):
    executors = compiled[0]["deploymentSpec"]["executors"]
    for label, executor in executors.items():
        resources = executor["container"]["resources"]
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"], label
    gpu = {label for stage, _, label in _tasks(compiled[0]) if stage in GPU_STAGES}
    for label in gpu:
        resources = executors[label]["container"]["resources"]
        assert (resources["resourceCpuRequest"], resources["resourceMemoryRequest"]) == (
            Placement.gpu_cpu_request, Placement.gpu_memory_request)


def test_images_carry_the_tag_and_never_latest(compiled):
    images = {e["container"]["image"] for e in compiled[0]["deploymentSpec"]["executors"].values()}
    assert images == {f"{REGISTRY}/neumo-cpu:{TAG}", f"{REGISTRY}/neumo-gpu:{TAG}"}
    assert not any(image.endswith(":latest") for image in images)


def test_components_install_nothing_when_they_start(compiled):
    """The image carries every dependency: no `pip install` in any task's command."""
    for label, executor in compiled[0]["deploymentSpec"]["executors"].items():
        command = " ".join(executor["container"].get("command", []) + executor["container"].get("args", []))
        assert "pip install" not in command, label


def test_bad_node_selector_is_refused():
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        full.main(["--compile", "/dev/null", "--gpu-node-selector", "no-equals-sign"])


def test_gpu_limit_4_reaches_every_gpu_stage_and_each_node_of_the_distributed_pretraining(tmp_path):
    """`--gpu-limit 4 --set pretrain_nodes=2`: every GPU stage requests 4 GPUs; pretraining is the
    pretrain-job step instead, a CPU task whose TrainJob asks 4 GPUs of each of its 2 nodes."""
    path = tmp_path / "neumo-full.yaml"
    assert full.main(["--compile", str(path), "--gpu-limit", "4", "--set", "pretrain_nodes=2", "--rounds", "1",
                      "--trials", "1"]) == 0
    spec, _ = yaml.safe_load_all(path.read_text())
    executors = spec["deploymentSpec"]["executors"]
    stages = {stage: (task, label) for stage, task, label in _tasks(spec)}
    assert "pretrain" not in stages and set(stages) <= GPU_STAGES | CPU_STAGES | set(full.JOB_COMPONENTS)
    assert {"train-mask-model", "mask", "train", "evaluate"} <= set(stages)
    for stage in GPU_STAGES & set(stages):
        accelerator = executors[stages[stage][1]]["container"]["resources"]["accelerator"]
        assert (accelerator["resourceType"], int(accelerator["resourceCount"])) == ("nvidia.com/gpu", 4), stage
    task, label = stages["pretrain-job"]
    assert "accelerator" not in executors[label]["container"]["resources"]
    job = task["inputs"]["parameters"]["job"]["runtimeValue"]["constant"]
    assert (job["nodes"], job["gpus_per_node"], job["gpu_type"]) == (2, 4, "nvidia.com/gpu")
