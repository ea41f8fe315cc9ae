"""Send a compiled pipeline to a Kubeflow Pipelines cluster: one run now, or a recurring run.

    python pipelines/full.py --submit --host https://KFP --experiment neumo \\
        --set dataset_uri=gs://BUCKET/chest_xray --set results_uri=gs://BUCKET/results
    python pipelines/full.py --schedule "0 0 2 * * 1" --host https://KFP --params-file params.json

Talks to the KFP v2 REST API through `kfp.Client` only (healthz, experiments, runs, recurring
runs): the whole compiled YAML (pipeline spec and platform spec) travels inside the request, so no
pipeline is uploaded first. Authentication: the bearer token in $KF_PIPELINES_TOKEN when set (what
the proxy in front of KFP accepts, e.g. an IAP ID token), otherwise whatever `kfp.Client` finds by
itself (a port-forwarded host needs none). Needs only `kfp`.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import yaml

logger = logging.getLogger("neumo.submit")

TOKEN_ENV = "KF_PIPELINES_TOKEN"


def client(host: str | None = None, namespace: str | None = None):
    """A `kfp.Client` for host (None: $KF_PIPELINES_ENDPOINT or kube config), token from $KF_PIPELINES_TOKEN."""
    import kfp

    kwargs = {"namespace": namespace} if namespace else {}
    with warnings.catch_warnings():  # "only works with KFP v2.0.0-beta.2 and later": manifests/README.md asks >= 2.5
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=host, existing_token=os.environ.get(TOKEN_ENV) or None, **kwargs)


def pipeline_inputs(package_path: str | Path) -> dict[str, bool]:
    """The compiled pipeline's parameters: name -> required (no default)."""
    with open(package_path) as fh:
        spec = next(yaml.safe_load_all(fh))
    params = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    return {name: not p.get("isOptional", False) for name, p in params.items()}


def check_params(package_path: str | Path, params: dict) -> dict:
    """Fail early, with the names, on unknown or missing parameters (the server would, later and vaguer)."""
    inputs = pipeline_inputs(package_path)
    unknown = sorted(set(params) - set(inputs))
    if unknown:
        raise ValueError(f"unknown pipeline parameter(s) {', '.join(unknown)}; parameters: {', '.join(sorted(inputs))}")
    missing = sorted(name for name, required in inputs.items() if required and params.get(name) in (None, ""))
    if missing:
        raise ValueError(f"missing required pipeline parameter(s): {', '.join(missing)} (--set NAME=VALUE)")
    return params


def check_cron(cron: str) -> str:
    """KFP schedules take 6 fields, seconds first (robfig/cron): '0 0 2 * * *' is 02:00 every day."""
    fields = cron.split()
    if len(fields) == 5:
        raise ValueError(f"KFP cron expressions have 6 fields, seconds first: did you mean '0 {cron}'?")
    if len(fields) != 6:
        raise ValueError(f"cron expression must have 6 space-separated fields (seconds first), got {cron!r}")
    return " ".join(fields)


def submit(package_path: str | Path, params: dict, host: str | None = None, experiment: str = "neumo",
           run_name: str | None = None, pipeline_root: str | None = None, service_account: str | None = None,
           namespace: str | None = None) -> str:
    """Create one run of the compiled pipeline in experiment (created if absent); returns the run id."""
    check_params(package_path, params)
    kfp_client = client(host, namespace)
    result = kfp_client.create_run_from_pipeline_package(
        str(package_path), arguments=params, run_name=run_name, experiment_name=experiment,
        namespace=namespace or None, pipeline_root=pipeline_root or None, service_account=service_account or None)
    logger.info("submitted run %s in experiment %r", result.run_id, experiment)
    return result.run_id


def schedule(package_path: str | Path, params: dict, host: str | None = None, experiment: str = "neumo",
             cron: str = "0 0 2 * * 1", name: str = "neumo-full", pipeline_root: str | None = None,
             service_account: str | None = None, namespace: str | None = None) -> str:
    """Create a recurring run (one at a time, no backfill of missed slots); returns its id."""
    cron = check_cron(cron)
    check_params(package_path, params)
    kfp_client = client(host, namespace)
    experiment_id = kfp_client.create_experiment(experiment, namespace=namespace or None).experiment_id
    recurring = kfp_client.create_recurring_run(
        experiment_id=experiment_id, job_name=name, cron_expression=cron, max_concurrency=1, no_catchup=True,
        params=params, pipeline_package_path=str(package_path), pipeline_root=pipeline_root or None,
        service_account=service_account or None)
    logger.info("scheduled recurring run %s (%r, cron %r) in experiment %r", recurring.recurring_run_id, name, cron,
                experiment)
    return recurring.recurring_run_id
