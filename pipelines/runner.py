"""The command line every neumo pipeline shares: compile it, run it here (kfp.local), submit one
run to a cluster, or schedule recurring runs.

Parameter values come from a preset (`--preset`, default: the declared defaults), then a JSON file
(`--params FILE`), then `--set NAME=VALUE` flags, each parsed and checked by `neumo.parameters`
(unknown names, types, ranges) and the search space and trial configuration by `neumo.trial`,
before anything is compiled or run. The values are baked into the compiled YAML as the pipeline's
parameter defaults, so what you compile is what runs. Needs only `kfp` and `kfp-kubernetes`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "shared"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from components import images as placeholders  # noqa: E402
from neumo import parameters  # noqa: E402
from pipelines.placement import Images, Placement  # noqa: E402

logger = logging.getLogger("neumo.pipeline")

#: What `make push` records: the images it pushed for this commit (images/README.md).
PUSHED = ROOT / "images" / "pushed.json"


def git_tag() -> str:
    """The tag `make build push` gives this commit's images (the same `git describe`)."""
    try:
        done = subprocess.run(["git", "describe", "--tags", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)
    except OSError:
        return "dev"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "dev"


def resolve_images(registry: str | None, tag: str | None) -> Images:
    """The images to bake in: those `make push` recorded in images/pushed.json (unless a registry
    or tag is given), else REGISTRY/neumo-{cpu,gpu}:TAG with the registry's default and the tag
    from git, as `make build push` names them."""
    pushed = json.loads(PUSHED.read_text()) if registry is None and tag is None and PUSHED.exists() else {}
    registry = registry or pushed.get("registry") or placeholders.REGISTRY
    tag = tag or pushed.get("tag") or git_tag()
    return Images(**{f: pushed.get(f, f"{registry}/neumo-{f}:{tag}") for f in ("cpu", "gpu")})


def build_parser(doc: str, single: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if single:
        p.add_argument("--config", metavar="FILE", help="the trial configuration (JSON; configs/ has examples)")
    p.add_argument("--compile", nargs="?", const="", metavar="PATH", help="write the pipeline YAML (default: NAME.yaml)")
    p.add_argument("--local", action="store_true", help="run the pipeline here with kfp.local")
    p.add_argument("--preset", choices=sorted(parameters.PRESETS), default="default",
                   help="a named set of parameter values (neumo.parameters.PRESETS)")
    p.add_argument("--workdir", default=str(ROOT / "work" / "local"), help="local runs: artifacts, results")
    p.add_argument("--params", "--params-file", dest="params", metavar="FILE", help="a JSON file of parameter values")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="one parameter's value (JSON for search_space and config); repeatable")
    if not single:
        p.add_argument("--rounds", type=int, help="tuning rounds (compile time)")
        p.add_argument("--trials-per-round", "--trials", dest="trials_per_round", type=int,
                       help="trials per round (compile time)")
        p.add_argument("--parallelism", type=int, help="tasks of one loop running at once (compile time)")
    p.add_argument("--registry", help="image registry (default: images/pushed.json from `make push`, else "
                   f"{placeholders.REGISTRY})")
    p.add_argument("--image-tag", help="image tag (default: images/pushed.json, else `git describe`)")
    p.add_argument("--gpu-type", default=Placement.gpu_type)
    p.add_argument("--gpu-limit", type=int, default=Placement.gpu_limit)
    p.add_argument("--gpu-node-selector", default="=".join(Placement.gpu_node_selector), metavar="KEY=VALUE")
    p.add_argument("--retries", type=int, default=Placement.retries)
    cluster = p.add_argument_group("Kubeflow cluster (pipelines/submit.py; token from $KF_PIPELINES_TOKEN)")
    cluster.add_argument("--submit", action="store_true", help="compile, then create one run on the cluster")
    cluster.add_argument("--schedule", metavar="CRON", help="compile, then create a recurring run (6 cron fields, "
                         "seconds first: '0 0 2 * * 1' is Mondays 02:00); one run at a time, no catch-up")
    cluster.add_argument("--host", help="KFP API endpoint (default: $KF_PIPELINES_ENDPOINT, else kube config)")
    cluster.add_argument("--experiment", default="neumo", help="experiment name (created if absent)")
    cluster.add_argument("--run-name", help="run / recurring run name")
    cluster.add_argument("--pipeline-root", help="artifact root for the run, e.g. gs://BUCKET/pipeline-root")
    cluster.add_argument("--service-account", help="Kubernetes service account of the run's pods (neumo-pipeline: "
                         "manifests/)")
    cluster.add_argument("--namespace", help="multi-user Kubeflow: the profile namespace")
    return p


def user_values(args: argparse.Namespace) -> tuple[dict, dict]:
    """(every value: the preset, then --params FILE, then each --set; only what the user gave)."""
    given: dict = {}
    if args.params:
        try:
            from_file = json.loads(Path(args.params).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--params {args.params}: cannot read a JSON object of parameters ({err})") from None
        if not isinstance(from_file, dict):
            raise ValueError(f"--params {args.params}: expected a JSON object of parameters")
        given.update(from_file)
    for item in args.set:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes NAME=VALUE, got {item!r}")
        given[name] = text
    for name in ("rounds", "trials_per_round", "parallelism"):
        if getattr(args, name, None) is not None:
            given[name] = getattr(args, name)
    values = parameters.apply(parameters.preset(args.preset), given)
    return values, {k: values[k] for k in given}


def read_config(path: str) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--config {path}: cannot read a JSON trial configuration ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: must hold a JSON object of the trial's hyperparameters")
    return config


def check(values: dict) -> None:
    """The rules a run applies, applied now: the search space, and the trial configuration."""
    from neumo.trial import SearchSpace, TrialConfig

    SearchSpace.from_dict(values["search_space"])
    if values["config"]:
        TrialConfig.from_dict(values["config"])


def main(factory, *, name: str, doc: str, argv=None, single: bool = False) -> int:
    """The command line over a pipeline factory (`create_pipeline` of pipelines/full.py).
    `single`: one configuration (--config FILE), no tuning: a graph of one round of one trial."""
    args = build_parser(doc, single).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    remote = args.submit or args.schedule
    if args.compile is None and not args.local and not remote:
        raise SystemExit("nothing to do: give --compile [PATH], --local, --submit or --schedule CRON")
    if args.local and remote:
        raise SystemExit("--local runs here; --submit/--schedule send the pipeline to a cluster: choose one")
    key, sep, value = args.gpu_node_selector.partition("=")
    if not sep:
        raise SystemExit(f"--gpu-node-selector must be KEY=VALUE, got {args.gpu_node_selector!r}")
    try:
        values, given = user_values(args)
        if single:
            if not args.config:
                raise ValueError("--config FILE is required: the trial configuration to train (see configs/)")
            values["config"] = given["config"] = parameters.parse("config", read_config(args.config))
            values.update(rounds=1, trials_per_round=1, parallelism=1)
        check(values)
        # Retries are for preempted pods on a cluster; a local run fails fast instead.
        retries = 0 if args.local and args.compile is None else args.retries
        placement = Placement(gpu_type=args.gpu_type, gpu_limit=args.gpu_limit, gpu_node_selector=(key, value),
                              retries=retries)
    except ValueError as err:
        raise SystemExit(f"{name}: {err}") from None
    graph = {p.name: values.pop(p.name) for p in parameters.GRAPH}
    images = resolve_images(args.registry, args.image_tag)
    pipeline = factory(**graph, values=values, placement=placement, images=images, name=name)
    # the local runner takes the parameters as arguments; the compiled YAML has them as defaults
    if args.compile is not None or remote:
        compile_to(pipeline, args.compile or "", name, images, remote, args, given)
    if args.local:
        workdir = Path(args.workdir).resolve()
        values["results_uri"] = values["results_uri"] or str(workdir / "results")
        if not values["dataset_uri"]:
            raise SystemExit("dataset_uri is required: --set dataset_uri=PATH_OR_GS_URI (or --params FILE, e.g. "
                             "the one `neumo demo-data` writes)")
        run_local(pipeline, values, workdir)
    return 0


def compile_yaml(pipeline, path: str) -> None:
    """Write the YAML; byte-identical for the same inputs. (KFP's header comment prints dict
    defaults in protobuf's map order, which changes from one process to the next: sorted here.)"""
    import ast
    import re

    from kfp import compiler

    compiler.Compiler().compile(pipeline, path)
    header = re.compile(r"^(#\s+\w+: dict \[Default: )(\{.*\})(\])$")

    def sort_keys(line: str) -> str:
        m = header.match(line)
        if not m:
            return line
        value = ast.literal_eval(m.group(2))
        return m.group(1) + repr(dict(sorted(value.items()))) + m.group(3)

    text = Path(path).read_text()
    Path(path).write_text("\n".join(sort_keys(line) for line in text.split("\n")))


def compile_to(pipeline, path: str, name: str, images: Images, remote: bool, args, given: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        package = path or (os.path.join(tmp, f"{name}.yaml") if remote else f"{name}.yaml")
        compile_yaml(pipeline, package)
        if not remote or path:
            logger.info("wrote %s (images: %s, %s)", package, images.cpu, images.gpu)
        if remote:
            submit(package, args, {k: v for k, v in given.items() if k in {p.name for p in parameters.RUN_TIME}})


def submit(package: str, args, params: dict) -> None:
    from pipelines import submit as cluster_api

    cluster = dict(host=args.host, experiment=args.experiment, pipeline_root=args.pipeline_root,
                   service_account=args.service_account, namespace=args.namespace)
    try:
        if args.submit:
            cluster_api.submit(package, params, run_name=args.run_name, **cluster)
        if args.schedule:
            cluster_api.schedule(package, params, cron=args.schedule, name=args.run_name or Path(package).stem,
                                 **cluster)
    except ValueError as err:
        raise SystemExit(str(err)) from err


def run_local(pipeline, values: dict, workdir: Path) -> None:
    """Run the pipeline here through kfp.local (one subprocess per task, this Python)."""
    import warnings

    from kfp import local

    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    workdir.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "pipeline_root"),
               raise_on_error=True)
    pipeline(**values)
    results = values["results_uri"]
    logger.info("done. CSVs: %s/train_max_unsupervised.csv and %s/image_class_evaluation_unsupervised.csv; "
                "models, report and every artifact under %s", results, results, workdir / "pipeline_root")
