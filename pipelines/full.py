"""The full neumo pipeline: ingest -> lung-mask model -> masks -> per variant (preprocess ->
pretrain) -> catalog -> R rounds of (suggest -> ParallelFor trials (train -> evaluate) -> Collected)
-> aggregate into the seed's two CSVs at the results URI.

    python pipelines/full.py --compile [PATH]          # write the YAML for Kubeflow
    python pipelines/full.py --local --preset demo     # run it here, through kfp.local
    python pipelines/full.py --submit --host URL       # one run on a cluster (pipelines/submit.py)
    python pipelines/full.py --schedule CRON --host URL  # a recurring run: one at a time, no catch-up

Compiling needs only `kfp` and `kfp-kubernetes`. Rounds, trials per round and the parallelism
cap shape the graph (KFP v2 has no loops), so they are compile-time options; everything else is a
pipeline parameter, overridable from the command line (`--set name=value`, `--params FILE`).
"""


import argparse
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kfp import compiler, dsl  # noqa: E402

from components import images  # noqa: E402
from components.aggregate.component import aggregate  # noqa: E402
from components.catalog.component import catalog  # noqa: E402
from components.evaluate.component import evaluate  # noqa: E402
from components.fingerprint.component import fingerprint  # noqa: E402
from components.ingest.component import ingest  # noqa: E402
from components.mask.component import mask  # noqa: E402
from components.plan.component import plan  # noqa: E402
from components.preprocess.component import preprocess  # noqa: E402
from components.pretrain.component import pretrain  # noqa: E402
from components.suggest.component import suggest  # noqa: E402
from components.train.component import train  # noqa: E402
from components.train_mask_model.component import train_mask_model  # noqa: E402
from pipelines.placement import Placement, place, set_image  # noqa: E402

logger = logging.getLogger("neumo.pipeline")

CPU_COMPONENTS = (fingerprint, ingest, plan, preprocess, catalog, suggest, aggregate)
GPU_COMPONENTS = (train_mask_model, mask, pretrain, train, evaluate)

# The seed's search space (../shared/docs/ARCHITECTURE.md) plus class weighting.
DEFAULT_SPACE = {
    "pixels": [256], "mask": [False, True], "model": [1, 2], "frozen_layers": [0, 4, 8, 12],
    "learning_rate": [1e-5, 1e-2], "loss": ["bce", "weighted_bce", "focal"],
    "augmentation": ["none", "light", "strong"], "class_weight": [False, True],
}

# Every pipeline parameter with its default; `--set name=value` overrides, types follow these.
DEFAULTS = {
    "dataset_uri": "", "results_uri": "", "masks_uri": "", "pretrain_uri": "", "mask_model_uri": "",
    "search_space": DEFAULT_SPACE, "sample_per_class": 0, "clahe_clip": 0.0, "acquisition_copies": 1,
    "mask_pixels": 256, "mask_epochs": 10, "mask_max_images": 0,
    "pretrain_epochs": 10, "filters": 16, "depth": 4,
    "epochs": 10, "batch_size": 8, "patience": 3, "bootstrap": 1000, "seed": 0,
    "config": {},  # one fixed trial configuration instead of tuning (pipelines/single.py)
}


def create_pipeline(rounds: int = 2, trials: int = 2, parallelism: int = 2, placement: "Placement | None" = None,
                    cpu_image: str = images.CPU_IMAGE, gpu_image: str = images.GPU_IMAGE, name: str = "neumo-full"):
    """Build the pipeline for a given graph shape; returns the KFP pipeline function. With the
    `config` parameter set, the run trains that one configuration instead of tuning."""
    if rounds < 1 or trials < 1 or parallelism < 1:
        raise ValueError(f"rounds, trials and parallelism must be >= 1, got {rounds}, {trials}, {parallelism}")
    placement = placement or Placement()
    set_image(CPU_COMPONENTS, cpu_image)
    set_image(GPU_COMPONENTS, gpu_image)

    @dsl.pipeline(name=name, description="Chest X-ray pneumonia: ingest, masks, preprocess, "
                  "pretrain, Bayesian tuning of classifiers, evaluation, the seed's two CSVs.")
    def full(
        dataset_uri: str,
        results_uri: str,
        masks_uri: str = "",
        pretrain_uri: str = "",
        mask_model_uri: str = "",
        search_space: dict = DEFAULT_SPACE,
        sample_per_class: int = 0,
        clahe_clip: float = 0.0,
        acquisition_copies: int = 1,
        mask_pixels: int = 256,
        mask_epochs: int = 10,
        mask_max_images: int = 0,
        pretrain_epochs: int = 10,
        filters: int = 16,
        depth: int = 4,
        epochs: int = 10,
        batch_size: int = 8,
        patience: int = 3,
        bootstrap: int = 1000,
        seed: int = 0,
        config: dict = {},
    ):
        # Uncached: lists the data each run, so a changed file reruns ingest and all after it.
        version = place(fingerprint(dataset_uri=dataset_uri, masks_uri=masks_uri, pretrain_uri=pretrain_uri),
                        placement).set_caching_options(False)
        data = place(ingest(dataset_uri=dataset_uri, masks_uri=masks_uri, pretrain_uri=pretrain_uri,
                            sample_per_class=sample_per_class, seed=seed, data_fingerprint=version.output), placement)
        manifest = data.outputs["manifest"]
        planned = place(plan(search_space=search_space, manifest=manifest, mask_model_uri=mask_model_uri, depth=depth,
                             results_uri=results_uri, config=config, clahe_clip=clahe_clip,
                             acquisition_copies=acquisition_copies), placement)
        lung_model = place(train_mask_model(manifest=manifest, variants=planned.output,
                                            mask_model_uri=mask_model_uri, pixels=mask_pixels, epochs=mask_epochs,
                                            filters=filters, max_images=mask_max_images, seed=seed),
                           placement, gpu=True, retry=True)
        masks = place(mask(manifest=manifest, mask_model=lung_model.outputs["mask_model"]), placement, gpu=True,
                      retry=True)
        with dsl.ParallelFor(planned.output, parallelism=parallelism) as variant:
            prepared = place(preprocess(manifest=manifest, masks=masks.outputs["masks"], variant=variant,
                                        clahe_clip=clahe_clip, acquisition_copies=acquisition_copies), placement)
            backbone = place(pretrain(data=prepared.outputs["data"], epochs=pretrain_epochs, filters=filters,
                                      depth=depth, seed=seed), placement, gpu=True, retry=True)
        variants = place(catalog(data=dsl.Collected(prepared.outputs["data"]),
                                 backbones=dsl.Collected(backbone.outputs["backbone"])), placement).outputs["variants"]
        history, finished = None, []
        for round_index in range(rounds):
            earlier = {"history_in": history} if history is not None else {}
            proposal = place(suggest(search_space=search_space, finished=finished, batch_size=trials, seed=seed,
                                     round_index=round_index, results_uri=results_uri, config=config, **earlier),
                             placement)
            # Uncached: round 0 reads the training CSV at results_uri, so a scheduled run continues the
            # search; for the same history it proposes the same batch, whose finished trials are cache hits.
            proposal.set_display_name(f"suggest-round-{round_index}").set_caching_options(False)
            with dsl.ParallelFor(proposal.outputs["Output"], parallelism=parallelism) as proposed:
                trial = place(train(config=proposed, variants=variants, epochs=epochs, batch_size=batch_size,
                                    patience=patience, clahe_clip=clahe_clip, seed=seed,
                                    run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, checkpoint_root=results_uri),
                              placement, gpu=True, retry=True)
                scored = place(evaluate(train_row=trial.outputs["Output"], model=trial.outputs["model"],
                                        variants=variants, bootstrap=bootstrap), placement, gpu=True, retry=True)
            history, finished = proposal.outputs["history_out"], dsl.Collected(scored.outputs["Output"])
        place(aggregate(finished=finished, history=history, results_uri=results_uri), placement)

    return full


# --- command line ---------------------------------------------------------------------------

def _coerce(name: str, text: str):
    """Parse `--set name=value` by the parameter's default type (JSON for dicts)."""
    if name not in DEFAULTS:
        raise SystemExit(f"unknown pipeline parameter {name!r}; parameters: {', '.join(sorted(DEFAULTS))}")
    default = DEFAULTS[name]
    try:
        if isinstance(default, dict):
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object")
            return value
        return type(default)(text)
    except ValueError as err:
        raise SystemExit(f"bad value for {name}: {text!r} ({err})") from err


def demo_params(workdir: Path) -> dict:
    """The embedded default: real Kermany + NIH images from ../shared/data when present, else
    synthetic ones made here; small settings so the whole pipeline runs in minutes on 2 cores."""
    shared = ROOT.parent / "shared" / "data"
    params = {
        "results_uri": str(workdir / "results"), "sample_per_class": 150, "mask_pixels": 128, "mask_epochs": 3,
        "mask_max_images": 160, "pretrain_epochs": 2, "filters": 8, "depth": 3, "epochs": 2, "patience": 2,
        "bootstrap": 200,
        "search_space": {**DEFAULT_SPACE, "pixels": [128], "frozen_layers": [0, 6], "learning_rate": [1e-4, 1e-2]},
    }
    if (shared / "kermany_224" / "train").is_dir():
        params.update(dataset_uri=str(shared / "kermany_224"), masks_uri=str(shared / "kermany_224_lung_masks"),
                      pretrain_uri=str(shared / "nih_sample"))
        logger.info("demo: real images from %s", shared)
    else:
        from neumo import synthetic

        data = workdir / "synthetic"
        if not (data / "images").is_dir():
            synthetic.write_kaggle(str(data / "images"), {"train": (60, 60), "val": (8, 8), "test": (20, 20)},
                                   size=256, seed=0, masks_uri=str(data / "masks"))
            synthetic.write_nih(str(data / "nih"), 40, size=256, seed=1)
        params.update(dataset_uri=str(data / "images"), masks_uri=str(data / "masks"), pretrain_uri=str(data / "nih"))
        logger.info("demo: ../shared/data is absent; synthetic images in %s", data)
    return params


def run_local(pipeline, params: dict, workdir: Path) -> None:
    """Run the pipeline here through kfp.local (one subprocess per task, this Python)."""
    import warnings

    from kfp import local

    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    workdir.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "pipeline_root"),
               raise_on_error=True)
    pipeline(**params)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile", nargs="?", const="neumo-full.yaml", metavar="PATH", help="write the pipeline YAML")
    p.add_argument("--local", action="store_true", help="run the pipeline here with kfp.local")
    p.add_argument("--preset", choices=["demo"], help="demo: the embedded default data and small settings")
    p.add_argument("--workdir", default=str(ROOT / "work" / "local"), help="local runs: artifacts, results")
    p.add_argument("--params", "--params-file", dest="params", metavar="FILE", help="a JSON file of pipeline parameters")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override one parameter")
    p.add_argument("--rounds", type=int, default=2, help="tuning rounds (compile time)")
    p.add_argument("--trials", type=int, default=2, help="trials per round (compile time)")
    p.add_argument("--parallelism", type=int, default=2, help="trials running at once (compile time)")
    p.add_argument("--name", default="neumo-full", help="the pipeline's name (compile time)")
    p.add_argument("--registry", default=images.REGISTRY)
    p.add_argument("--image-tag", default=images.TAG)
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
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    remote = args.submit or args.schedule
    if not args.compile and not args.local and not remote:
        raise SystemExit("nothing to do: give --compile [PATH], --local, --submit or --schedule CRON")
    if args.local and remote:
        raise SystemExit("--local runs here; --submit/--schedule send the pipeline to a cluster: choose one")
    key, sep, value = args.gpu_node_selector.partition("=")
    if not sep:
        raise SystemExit(f"--gpu-node-selector must be KEY=VALUE, got {args.gpu_node_selector!r}")
    # Retries are for preempted pods on a cluster; a local run fails fast instead.
    retries = 0 if args.local and not args.compile else args.retries
    placement = Placement(gpu_type=args.gpu_type, gpu_limit=args.gpu_limit, gpu_node_selector=(key, value),
                          retries=retries)
    pipeline = create_pipeline(args.rounds, args.trials, args.parallelism, placement,
                               f"{args.registry}/neumo-cpu:{args.image_tag}", f"{args.registry}/neumo-gpu:{args.image_tag}",
                               args.name)

    def user_params(params: dict) -> dict:
        """--params FILE, then each --set NAME=VALUE, over the given base."""
        if args.params:
            params.update(json.loads(Path(args.params).read_text()))
        for item in args.set:
            name, sep, text = item.partition("=")
            if not sep:
                raise SystemExit(f"--set takes NAME=VALUE, got {item!r}")
            params[name] = _coerce(name, text)
        return params

    if args.compile:
        compiler.Compiler().compile(pipeline, args.compile)
        logger.info("wrote %s", args.compile)
    if remote:
        import tempfile

        from pipelines import submit

        params = user_params({})
        cluster = dict(host=args.host, experiment=args.experiment, pipeline_root=args.pipeline_root,
                       service_account=args.service_account, namespace=args.namespace)
        with tempfile.TemporaryDirectory() as tmp:
            package = args.compile or os.path.join(tmp, "neumo-full.yaml")
            if not args.compile:
                compiler.Compiler().compile(pipeline, package)
            try:
                if args.submit:
                    submit.submit(package, params, run_name=args.run_name, **cluster)
                if args.schedule:
                    submit.schedule(package, params, cron=args.schedule, name=args.run_name or "neumo-full", **cluster)
            except ValueError as err:
                raise SystemExit(str(err)) from err
    if args.local:
        workdir = Path(args.workdir).resolve()
        params = user_params(demo_params(workdir) if args.preset == "demo" else {})
        params.setdefault("results_uri", str(workdir / "results"))
        if not params.get("dataset_uri"):
            raise SystemExit("dataset_uri is required: --set dataset_uri=PATH_OR_GS_URI (or --preset demo)")
        run_local(pipeline, params, workdir)
        results = params["results_uri"]
        logger.info("done. CSVs: %s/train_max_unsupervised.csv and %s/image_class_evaluation_unsupervised.csv; "
                    "models, report and every artifact under %s", results, results, workdir / "pipeline_root")
    return 0


if __name__ == "__main__":
    sys.exit(main())
