"""Batch prediction with a model bundle: list the images under a folder or gs:// prefix, score them
in parts (a ParallelFor over the parts, `parallelism` at a time, on GPU nodes like the training
tasks), gather one predictions.csv with the Grad-CAM overlays and a page sorted by probability.

    python pipelines/predict.py --compile [PATH]
    python pipelines/predict.py --local --set bundle_uri=RESULTS/models/best --set images_uri=FOLDER
    python pipelines/predict.py --schedule "0 0 3 * * *" --host URL --set bundle_uri=gs://B/results/models/best \\
        --set images_uri=gs://B/incoming --set predictions_uri=gs://B/scores   # a nightly scoring run

Its parameters (bundle_uri, images_uri, predictions_uri, shards; parallelism at compile time) are
declared in `neumo.parameters` with the others and belong to this pipeline only. Every task is
uncached: a scheduled run scores the images there now with the bundle there now (aggregate
replaces models/best when a better model is trained). The rest of the command line is
pipelines/full.py's (pipelines/runner.py). Compiling needs only `kfp` and `kfp-kubernetes`.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "shared"):  # `neumo.parameters` is standard library only: no install needed
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from kfp import dsl  # noqa: E402

from components.predict.component import predict, predict_gather, predict_list  # noqa: E402
from neumo import parameters  # noqa: E402
from pipelines.placement import Images, Placement, place, with_image  # noqa: E402

CPU_COMPONENTS = {c.name: c for c in (predict_list, predict_gather)}
GPU_COMPONENTS = {c.name: c for c in (predict,)}
KIND = "predict"
RUN_TIME = tuple(p for p in parameters.of(KIND) if not p.graph)
DESCRIPTION = "Chest X-ray pneumonia: score a folder or bucket of images with a model bundle."


def signature(values: dict) -> inspect.Signature:
    """This pipeline's parameters, typed, with `values` as defaults (a required one without a value has none)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    required = [inspect.Parameter(p.name, kind, annotation=p.type) for p in RUN_TIME
                if p.required and not values.get(p.name)]
    optional = [inspect.Parameter(p.name, kind, annotation=p.type, default=values[p.name]) for p in RUN_TIME
                if not (p.required and not values.get(p.name))]
    return inspect.Signature(required + optional)


def create_pipeline(*, parallelism: int = parameters.default("parallelism"), values: dict | None = None,
                    placement: Placement | None = None, images: Images | None = None, name: str = "neumo-predict"):
    """The batch-prediction pipeline, its parameters defaulting to `values` (the declared defaults
    where absent); `parallelism`: scoring tasks running at once. Pure, like full.create_pipeline."""
    if not isinstance(parallelism, int) or parallelism < 1:
        raise ValueError(f"parallelism must be an integer >= 1, got {parallelism!r}")
    values = {**{p.name: parameters.default(p.name) for p in RUN_TIME}, **(values or {})}
    placement, images = placement or Placement(), images or Images()
    c = {**{n: with_image(comp, images.cpu) for n, comp in CPU_COMPONENTS.items()},
         **{n: with_image(comp, images.gpu) for n, comp in GPU_COMPONENTS.items()}}
    sig = signature(values)

    def graph(*args, **kwargs):
        p = sig.bind(*args, **kwargs).arguments
        listed = place(c["predict-list"](images_uri=p["images_uri"], shards=p["shards"]), placement)
        with dsl.ParallelFor(listed.outputs["Output"], parallelism=parallelism) as shard:
            scored = place(c["predict"](bundle_uri=p["bundle_uri"], listing=listed.outputs["listing"], shard=shard),
                           placement, gpu=True, retry=True)
        gathered = place(c["predict-gather"](scores=dsl.Collected(scored.outputs["scores"]), bundle_uri=p["bundle_uri"],
                                             predictions_uri=p["predictions_uri"],
                                             run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), placement)
        for task in (listed, scored, gathered):  # new images and a new best bundle under the same URIs
            task.set_caching_options(False)

    graph.__signature__ = sig
    graph.__name__ = name.replace("-", "_")
    graph.__doc__ = DESCRIPTION
    return dsl.pipeline(name=name, description=DESCRIPTION)(graph)


def main(argv=None) -> int:
    from pipelines import runner

    return runner.main(create_pipeline, name="neumo-predict", doc=__doc__, argv=argv, kind=KIND)


if __name__ == "__main__":
    sys.exit(main())
