from kfp import dsl, kubernetes
from kfp.dsl import Dataset, Input, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def pretrain_job(data: Input[Dataset], pretrain_epochs: int, filters: int, depth: int, seed: int, pretrain_task: str,
                 pretrain_data: str, job: dict, backbone: Output[Model]):
    """The pretrain stage on several GPU nodes: create a Kubeflow Trainer TrainJob that runs it
    under MultiWorkerMirroredStrategy (`job`: nodes, GPUs per node, image, placement; set at
    compile time by `trainjob_settings`), wait for it, then hand its backbone on with the same
    metadata as the one-pod pretrain step. The nodes read the variant from, and write the
    backbone to, the artifacts' URIs themselves."""
    import logging

    from neumo import trainjob

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    stage = {"pretrain_epochs": pretrain_epochs, "filters": filters, "depth": depth, "seed": seed,
             "pretrain_task": pretrain_task, "pretrain_data": pretrain_data}
    trainjob.run(data_uri=data.uri, backbone_uri=backbone.uri, stage=stage, settings=job)
    info = trainjob.fetch(backbone.uri, backbone.path)
    backbone.metadata.update({k: info[k] for k in ("pixels", "mask", "task", "data", "images", "epochs", "seconds")})
    backbone.metadata["nodes"] = int(job["nodes"])
    if info["best_val_loss"] is not None:
        backbone.metadata["best_val_loss"] = info["best_val_loss"]


def trainjob_settings(placement, image: str, nodes: int) -> dict:
    """The TrainJob's compile-time settings (the `job` input): `nodes` nodes in the GPU `image`, each
    with what `placement` gives a GPU stage (GPU type and count, CPU and memory, node selector,
    toleration)."""
    key, value, effect = placement.gpu_toleration
    return {"nodes": nodes, "image": image, "gpu_type": placement.gpu_type, "gpus_per_node": placement.gpu_limit,
            "cpu": placement.gpu_cpu_request, "memory": placement.gpu_memory_request,
            "node_selector": dict([placement.gpu_node_selector]),
            "tolerations": [{"key": key, "operator": "Equal", "value": value, "effect": effect}]}


#: neumo.trainjob.SERVICE_ACCOUNT_ENV (a compile imports no neumo module but the parameters; a test checks they agree)
SERVICE_ACCOUNT_ENV = "NEUMO_SERVICE_ACCOUNT"


def launched(task):
    """The pretrain-job task, told its own service account (the downward API), which its TrainJob's
    nodes run as: the same Workload Identity reaches the same bucket."""
    kubernetes.use_field_path_as_env(task, env_name=SERVICE_ACCOUNT_ENV, field_path="spec.serviceAccountName")
    return task
