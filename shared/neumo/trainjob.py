"""Pretraining on several nodes: a Kubeflow Trainer (v2) TrainJob that runs `neumo pretrain` on
`pretrain_nodes` GPU nodes under TensorFlow's MultiWorkerMirroredStrategy, launched and waited for
by the pipeline's pretrain-job step (components/pretrain_job), which then hands the backbone on.

Why a TrainJob on our own runtime: Trainer v2 has no TensorFlow plugin (the TFJob of the Training
Operator v1 is deprecated, kubeflow/trainer#2699), and its migration path for TensorFlow is the
plain-ML policy with TF_CONFIG set by the job itself. So the ClusterTrainingRuntime
`neumo-tensorflow` (`runtime()`; manifests/overlays/trainer-runtime holds it rendered) has one
Indexed replicated job, "node", labelled as the TrainJob's trainer step: Trainer sets its
parallelism and completions to the TrainJob's numNodes and puts the TrainJob's image, command,
args, env and resources on its "node" container. JobSet names the pods
`<jobset>-<replicated job>-<job index>-<completion index>` on the subdomain `<jobset>` (a headless
service), so every node can work out every other node's address: `tf_config_from_jobset()`, run
by `python -m neumo.trainjob node COMMAND...` before TensorFlow starts.

The Kubernetes objects are built from the Trainer's own API models (kubeflow-trainer-api, generated
from the CRDs' OpenAPI schema), not from hand-written dicts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
#: The ClusterTrainingRuntime every neumo TrainJob runs on (manifests/overlays/trainer-runtime).
RUNTIME = "neumo-tensorflow"
#: Trainer's name for the trainer step's replicated job and container, and the label that marks it.
NODE = "node"
ANCESTOR_LABEL, ANCESTOR_TRAINER = "trainer.kubeflow.org/trainjob-ancestor-step", "trainer"
#: The runtime's default image; every TrainJob sets its own (the GPU image of the compiled pipeline).
RUNTIME_IMAGE = "ghcr.io/neumo-project/neumo-gpu:unset"
#: The port MultiWorkerMirroredStrategy's workers talk on (TensorFlow's customary one).
TF_PORT = 2222
#: What a node reads to build TF_CONFIG: the node count (the TrainJob's env), the JobSet's names
#: (the runtime's env, from the pod's JobSet labels) and the Indexed Job's completion index (Kubernetes).
NODES_ENV, COMPLETION_INDEX_ENV = "NEUMO_NUM_NODES", "JOB_COMPLETION_INDEX"
JOBSET_ENV = {"NEUMO_JOBSET_NAME": "jobset.sigs.k8s.io/jobset-name",
              "NEUMO_REPLICATED_JOB": "jobset.sigs.k8s.io/replicatedjob-name",
              "NEUMO_JOB_INDEX": "jobset.sigs.k8s.io/job-index"}
#: The launcher pod's service account (the component gets it through the downward API); the nodes
#: run as the same one, so they reach the bucket with the same Workload Identity.
SERVICE_ACCOUNT_ENV = "NEUMO_SERVICE_ACCOUNT"
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
#: Who owns the runtime patches neumo puts on a TrainJob (node selector, tolerations, account).
PATCH_MANAGER = "neumo.io/pipeline"
#: How long the launcher waits for a TrainJob by default, and how often it looks.
TIMEOUT_S, POLL_S = 24 * 3600, 30.0


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None or value == "":
        raise ValueError(f"{name} is not set: run this as a node of a TrainJob on the {RUNTIME} runtime "
                         "(manifests/README.md)")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def tf_config_from_jobset(env: Mapping[str, str]) -> dict:
    """TF_CONFIG for this node of the TrainJob: every node a worker (MultiWorkerMirroredStrategy;
    worker 0 is the chief), addressed by the DNS name JobSet gives its pod, this node the one at
    its completion index."""
    nodes, index = _env_int(env, NODES_ENV), _env_int(env, COMPLETION_INDEX_ENV)
    missing = [name for name in JOBSET_ENV if not env.get(name)]
    if missing:
        raise ValueError(f"{missing[0]} is not set: run this as a node of a TrainJob on the {RUNTIME} runtime "
                         "(manifests/README.md)")
    if nodes < 1:
        raise ValueError(f"{NODES_ENV} must be >= 1, got {nodes}")
    if not 0 <= index < nodes:
        raise ValueError(f"{COMPLETION_INDEX_ENV}={index} is out of range for {nodes} nodes (0 to {nodes - 1})")
    jobset, replicated, job = (env[name] for name in JOBSET_ENV)
    workers = [f"{jobset}-{replicated}-{job}-{i}.{jobset}:{TF_PORT}" for i in range(nodes)]
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}


def runtime(image: str = RUNTIME_IMAGE):
    """The ClusterTrainingRuntime `neumo-tensorflow`: a JobSet of one Indexed job, "node", whose pods
    run `python -m neumo.trainjob node ...` with the JobSet's names in their environment. One pod per
    node; a failed pod fails the job (backoffLimit 0: MultiWorkerMirroredStrategy cannot carry on
    without a worker), and the launcher's retry starts a new TrainJob."""
    from kubeflow_trainer_api import models as m

    field = lambda path: m.IoK8sApiCoreV1EnvVarSource(field_ref=m.IoK8sApiCoreV1ObjectFieldSelector(field_path=path))
    env = [m.IoK8sApiCoreV1EnvVar(name=name, value_from=field(f"metadata.labels['{label}']"))
           for name, label in JOBSET_ENV.items()]
    container = m.IoK8sApiCoreV1Container(
        name=NODE, image=image, command=["python", "-m", "neumo.trainjob", "node"], env=env,
        ports=[m.IoK8sApiCoreV1ContainerPort(name="tf-worker", container_port=TF_PORT, protocol="TCP")])
    job = m.IoK8sApiBatchV1JobTemplateSpec(
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(labels={ANCESTOR_LABEL: ANCESTOR_TRAINER}),
        spec=m.IoK8sApiBatchV1JobSpec(
            completion_mode="Indexed", parallelism=1, completions=1, backoff_limit=0,
            template=m.IoK8sApiCoreV1PodTemplateSpec(spec=m.IoK8sApiCoreV1PodSpec(
                restart_policy="Never", containers=[container]))))
    jobset = m.JobsetV1alpha2JobSetSpec(
        network=m.JobsetV1alpha2Network(enable_dns_hostnames=True, publish_not_ready_addresses=True),
        replicated_jobs=[m.JobsetV1alpha2ReplicatedJob(name=NODE, replicas=1, template=job)])
    return m.TrainerV1alpha1ClusterTrainingRuntime(
        api_version=f"{GROUP}/{VERSION}", kind="ClusterTrainingRuntime",
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=RUNTIME, labels={"trainer.kubeflow.org/framework": "tensorflow"}),
        spec=m.TrainerV1alpha1TrainingRuntimeSpec(
            ml_policy=m.TrainerV1alpha1MLPolicy(num_nodes=1),
            template=m.TrainerV1alpha1JobSetTemplateSpec(spec=jobset)))


def pretrain_command(*, data_uri: str, backbone_uri: str, stage: Mapping[str, object]) -> list[str]:
    """What every node runs: the `neumo pretrain` stage on the variant at `data_uri`, writing the
    backbone at `backbone_uri` (its chief does), with the stage's parameters (`stage`, by name)."""
    args = ["neumo", "pretrain", "--data", data_uri, "--out", backbone_uri]
    for name, value in stage.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    return args


def job_name(backbone_uri: str) -> str:
    """The TrainJob's name: the same for the same backbone, so a retried launcher finds the job
    its earlier attempt created; short, as JobSet puts it into every pod's hostname."""
    return "neumo-pretrain-" + hashlib.sha256(backbone_uri.encode()).hexdigest()[:10]


def train_job(*, name: str, command: list[str], settings: Mapping, service_account: str = ""):
    """The TrainJob: `settings["nodes"]` nodes of the `neumo-tensorflow` runtime, each with
    `settings["gpus_per_node"]` GPUs and the CPU and memory of a GPU stage, in `settings["image"]`,
    placed on the GPU node pool (node selector, tolerations) like the pipeline's GPU stages."""
    from kubeflow_trainer_api import models as m

    nodes = int(settings["nodes"])
    if nodes < 1:
        raise ValueError(f"a TrainJob needs at least one node, got {nodes}")
    q = m.IoK8sApimachineryPkgApiResourceQuantity
    gpus = {settings["gpu_type"]: q(str(int(settings["gpus_per_node"])))}  # a KFP dict constant has floats
    resources = m.IoK8sApiCoreV1ResourceRequirements(
        limits=gpus, requests={**gpus, "cpu": q(settings["cpu"]), "memory": q(settings["memory"])})
    trainer = m.TrainerV1alpha1Trainer(
        image=settings["image"], command=["python", "-m", "neumo.trainjob", "node"], args=command,
        num_nodes=nodes, resources_per_node=resources, env=[m.IoK8sApiCoreV1EnvVar(name=NODES_ENV, value=str(nodes))])
    pod = m.TrainerV1alpha1PodSpecPatch(
        node_selector=dict(settings["node_selector"]) or None,
        tolerations=[m.IoK8sApiCoreV1Toleration(**t) for t in settings["tolerations"]] or None,
        service_account_name=service_account or None)
    patch = m.TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER, training_runtime_spec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=m.TrainerV1alpha1JobSetTemplatePatch(spec=m.TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[
                m.TrainerV1alpha1ReplicatedJobPatch(name=NODE, template=m.TrainerV1alpha1JobTemplatePatch(
                    spec=m.TrainerV1alpha1JobSpecPatch(template=m.TrainerV1alpha1PodTemplatePatch(spec=pod))))]))))
    return m.TrainerV1alpha1TrainJob(
        api_version=f"{GROUP}/{VERSION}", kind="TrainJob",
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=name, labels={"app.kubernetes.io/part-of": "neumo"}),
        spec=m.TrainerV1alpha1TrainJobSpec(runtime_ref=m.TrainerV1alpha1RuntimeRef(name=RUNTIME), trainer=trainer,
                                           runtime_patches=[patch]))


def state(job: Mapping) -> tuple[str, str]:
    """("Complete" | "Failed" | "Running", message) from a TrainJob's status conditions."""
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []}
    for kind in ("Failed", "Complete"):
        c = conditions.get(kind)
        if c and c.get("status") == "True":
            return kind, c.get("message") or c.get("reason") or ""
    return "Running", ""


def wait(name: str, read: Callable[[str], Mapping | None], *, timeout_s: float = TIMEOUT_S, poll_s: float = POLL_S,
         sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> Mapping:
    """Poll the TrainJob `name` until it completes (returned) or fails or runs past `timeout_s`
    (ValueError: one line, with the job's own message). `read` returns None when it could not
    read the job this time (the next poll tries again)."""
    start, seen = clock(), None
    while True:
        job = read(name)
        if job is not None:
            conditions = tuple((c.get("type"), c.get("status"), c.get("reason")) for c in
                               (job.get("status") or {}).get("conditions") or [])
            if conditions != seen:
                logger.info("TrainJob %s: %s", name, ", ".join(f"{t}={s} ({r})" for t, s, r in conditions) or "pending")
                seen = conditions
            kind, message = state(job)
            if kind == "Complete":
                return job
            if kind == "Failed":
                raise ValueError(f"TrainJob {name} failed: {message or 'no message'} "
                                 f"(kubectl describe trainjob {name})")
        elapsed = clock() - start
        if elapsed >= timeout_s:
            raise ValueError(f"TrainJob {name} did not finish within {timeout_s:.0f} s")
        sleep(min(poll_s, timeout_s - elapsed))


def namespace(path: str = NAMESPACE_FILE) -> str:
    """The namespace this pod runs in (where its TrainJob goes)."""
    try:
        with open(path) as fh:
            return fh.read().strip()
    except FileNotFoundError:
        raise ValueError(f"no {path}: the pretrain-job step must run in a Kubernetes pod") from None


def cluster(ns: str) -> tuple[Callable, Callable, Callable]:
    """The launcher's only Kubernetes calls, with the pod's in-cluster credentials: create a
    TrainJob (False when one of that name exists already), read one (None when the API server
    did not answer this time: a blip must not fail hours of training), delete one."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    config.load_incluster_config()
    api = client.CustomObjectsApi()

    def create(body: dict) -> bool:
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
        except ApiException as err:
            if err.status == 409:
                return False
            raise ValueError(f"cannot create TrainJob {body['metadata']['name']} in {ns}: {err.status} {err.reason}: "
                             f"{err.body}") from None
        return True

    def read(name: str) -> Mapping | None:
        try:
            return api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                raise ValueError(f"TrainJob {name} is gone from {ns} (deleted by someone else?)") from None
            if err.status not in (429, 500, 502, 503, 504):
                raise
            logger.warning("reading TrainJob %s: %s %s; trying again", name, err.status, err.reason)
        except HTTPError as err:
            logger.warning("reading TrainJob %s: %s; trying again", name, err)
        return None

    def delete(name: str) -> None:
        try:
            api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, propagation_policy="Background")
        except ApiException as err:
            if err.status != 404:
                raise

    return create, read, delete


def run(*, data_uri: str, backbone_uri: str, stage: Mapping[str, object], settings: Mapping,
        calls: tuple[Callable, Callable, Callable] | None = None, **wait_options) -> Mapping:
    """Create the TrainJob that pretrains the backbone of the variant at `data_uri` into
    `backbone_uri`, wait for it and return it; a job of the same name (an earlier attempt of this
    step) is waited for instead. A failed or timed-out job is deleted (its GPUs freed, its name free
    for the step's retry) and raises ValueError. `calls`: create, read, delete (default: `cluster`)."""
    name = job_name(backbone_uri)
    body = train_job(name=name, command=pretrain_command(data_uri=data_uri, backbone_uri=backbone_uri, stage=stage),
                     settings=settings, service_account=os.environ.get(SERVICE_ACCOUNT_ENV, "")).to_dict()
    create, read, delete = calls or cluster(namespace())
    if create(body):
        logger.info("created TrainJob %s: %d nodes x %d %s, backbone to %s", name, settings["nodes"],
                    settings["gpus_per_node"], settings["gpu_type"], backbone_uri)
    else:
        logger.info("TrainJob %s exists already (an earlier attempt of this step): waiting for it", name)
    try:
        return wait(name, read, **wait_options)
    except ValueError:
        logger.info("deleting TrainJob %s", name)
        delete(name)
        raise


def fetch(backbone_uri: str, local_dir: str) -> dict:
    """Copy the backbone the TrainJob's chief wrote at `backbone_uri` into `local_dir` (the step's
    output artifact folder, which KFP uploads to that same URI when the step ends) and return its
    pretrain.json; ValueError when the job wrote none."""
    from neumo import storage

    files = storage.list_files(backbone_uri)
    if not any(storage.relative(uri, backbone_uri) == "pretrain.json" for uri in files):
        raise ValueError(f"the TrainJob finished but wrote no pretrain.json at {backbone_uri}")
    for uri in files:
        target = os.path.join(local_dir, *storage.relative(uri, backbone_uri).split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        storage.download(uri, target)
    logger.info("backbone: %d files from %s", len(files), backbone_uri)
    with open(os.path.join(local_dir, "pretrain.json")) as fh:
        return json.load(fh)


def _render_runtime() -> str:
    import yaml

    header = ("# Rendered by `python -m neumo.trainjob runtime` from neumo.trainjob.runtime() (the Trainer's API\n"
              "# models); tests/test_trainjob.py checks the two agree. Do not edit by hand.\n")
    return header + yaml.safe_dump(runtime().to_dict(), sort_keys=False)


def main(argv: list[str] | None = None, execvp: Callable = os.execvp) -> int:
    """`node COMMAND...`: set TF_CONFIG for this node of the TrainJob, then become COMMAND (so
    TensorFlow starts with it set). `runtime`: print the ClusterTrainingRuntime's YAML."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if argv == ["runtime"]:
        print(_render_runtime(), end="")
        return 0
    if len(argv) < 2 or argv[0] != "node":
        logger.error("usage: python -m neumo.trainjob node COMMAND [ARG...] | python -m neumo.trainjob runtime")
        return 2
    try:
        tf_config = tf_config_from_jobset(os.environ)
    except ValueError as err:
        logger.error("%s", err)
        return 2
    os.environ["TF_CONFIG"] = json.dumps(tf_config)
    logger.info("worker %d of %d: %s", tf_config["task"]["index"], len(tf_config["cluster"]["worker"]),
                " ".join(argv[1:]))
    execvp(argv[1], argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
