"""The full neumo pipeline: ingest -> lung-mask model -> masks -> per variant (preprocess ->
pretrain) -> catalog -> R rounds of (suggest -> ParallelFor trials (train -> evaluate) -> Collected)
-> aggregate into the seed's two CSVs at the results URI.

    python pipelines/full.py --compile [PATH]          # write the YAML for Kubeflow
    python pipelines/full.py --local --preset demo     # run it here, through kfp.local
    python pipelines/full.py --submit --host URL       # one run on a cluster (pipelines/submit.py)
    python pipelines/full.py --schedule CRON --host URL  # a recurring run: one at a time, no catch-up

The parameters, their defaults and the presets are declared once, in `neumo.parameters`; every
`--set NAME=VALUE` is checked against them and baked into the compiled YAML's defaults. Rounds,
trials per round and the parallelism cap shape the graph (KFP v2 has no loops), so they are
compile-time options. Compiling needs only `kfp` and `kfp-kubernetes`.
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

from components.aggregate.component import aggregate  # noqa: E402
from components.catalog.component import catalog  # noqa: E402
from components.evaluate.component import evaluate  # noqa: E402
from components.fingerprint.component import fingerprint  # noqa: E402
from components.ingest.component import ingest  # noqa: E402
from components.mask.component import mask, mask_gather, mask_part  # noqa: E402
from components.plan.component import plan  # noqa: E402
from components.preprocess.component import (  # noqa: E402
    preprocess, preprocess_gather, preprocess_part, preprocess_parts)
from components.pretrain.component import pretrain  # noqa: E402
from components.pretrain_job.component import launched, pretrain_job, trainjob_settings  # noqa: E402
from components.suggest.component import suggest  # noqa: E402
from components.train.component import train  # noqa: E402
from components.train_mask_model.component import train_mask_model  # noqa: E402
from neumo import parameters  # noqa: E402
from pipelines.placement import Images, Placement, place, with_image  # noqa: E402

CPU_COMPONENTS = {c.name: c for c in (fingerprint, ingest, plan, preprocess, preprocess_parts, preprocess_part,
                                       preprocess_gather, mask_gather, catalog, suggest, aggregate)}
GPU_COMPONENTS = {c.name: c for c in (train_mask_model, mask, mask_part, pretrain, train, evaluate)}
#: CPU tasks that launch work on GPU nodes and wait for it (pretrain_nodes > 1: a Trainer TrainJob).
JOB_COMPONENTS = {c.name: c for c in (pretrain_job,)}
DESCRIPTION = ("Chest X-ray pneumonia: ingest, masks, preprocess, pretrain, Bayesian tuning of classifiers, "
               "evaluation, the seed's two CSVs.")


def signature(values: dict) -> inspect.Signature:
    """The pipeline's parameters, typed and in declaration order, with `values` as their defaults;
    a required parameter without a value has no default (a run must give it)."""
    required, optional = [], []
    for p in parameters.RUN_TIME:
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        if p.required and not values.get(p.name):
            required.append(inspect.Parameter(p.name, kind, annotation=p.type))
        else:
            optional.append(inspect.Parameter(p.name, kind, annotation=p.type, default=values[p.name]))
    return inspect.Signature(required + optional)


def lung_masks(c: dict, placement: Placement, shards: int, parallelism: int, **inputs):
    """The mask stage's task (its output "masks"): one GPU task; with shards > 1 a loop over the
    parts (GPU, `parallelism` at a time) gathered by a CPU task into the same output."""
    if shards == 1:
        return place(c["mask"](**inputs), placement, gpu=True, retry=True)
    with dsl.ParallelFor(list(range(shards)), parallelism=parallelism) as part:
        masked = place(c["mask-part"](part=part, parts=shards, **inputs), placement, gpu=True, retry=True)
    return place(c["mask-gather"](manifest=inputs["manifest"], parts=dsl.Collected(masked.outputs["masks"])),
                 placement)


def preprocessed(c: dict, given, placement: Placement, shards: int, parallelism: int, *, variant, **inputs):
    """A variant's preprocess task (its output "data"): one CPU task; with shards > 1 a loop over
    the parts (CPU, `parallelism` at a time) nested in the variant loop, gathered by a CPU task.
    The loop's items carry the variant (preprocess-parts): kfp.local hands a nested loop's task
    the inner item where it asks for the outer one."""
    if shards == 1:
        return place(given(c["preprocess"], variant=variant, **inputs), placement)
    items = place(c["preprocess-parts"](variant=variant, parts=shards), placement)
    with dsl.ParallelFor(items.output, parallelism=parallelism) as item:
        part = place(given(c["preprocess-part"], item=item, **inputs), placement)
    return place(c["preprocess-gather"](parts=dsl.Collected(part.outputs["data"])), placement)


def create_pipeline(*, rounds: int = parameters.default("rounds"),
                    trials_per_round: int = parameters.default("trials_per_round"),
                    parallelism: int = parameters.default("parallelism"),
                    preprocess_shards: int = parameters.default("preprocess_shards"),
                    pretrain_nodes: int = parameters.default("pretrain_nodes"), values: dict | None = None,
                    placement: Placement | None = None, images: Images | None = None, name: str = "neumo-full"):
    """The KFP pipeline for one graph shape, with `values` (parsed parameters; the declared
    defaults where absent) as its parameter defaults. Pure: the components are copied with the
    given images, nothing global changes. With the `config` parameter set, the run trains that one
    configuration instead of tuning."""
    for option, value in (("rounds", rounds), ("trials_per_round", trials_per_round), ("parallelism", parallelism),
                          ("preprocess_shards", preprocess_shards), ("pretrain_nodes", pretrain_nodes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{option} must be an integer >= 1, got {value!r}")
    values = {**parameters.defaults(graph=False), **(values or {})}
    placement, images = placement or Placement(), images or Images()
    c = {**{n: with_image(comp, images.cpu) for n, comp in CPU_COMPONENTS.items()},
         **{n: with_image(comp, images.gpu) for n, comp in GPU_COMPONENTS.items()},
         **{n: with_image(comp, images.cpu) for n, comp in JOB_COMPONENTS.items()}}
    sig = signature(values)

    def graph(*args, **kwargs):
        p = sig.bind(*args, **kwargs).arguments  # the pipeline's parameters, by name

        def given(component, **inputs):
            """The component's task: its inputs named like pipeline parameters take those, the rest as given."""
            names = set(component.component_spec.inputs or {})
            return component(**{**{k: v for k, v in p.items() if k in names}, **inputs})

        # Uncached: lists the data each run, so a changed file reruns ingest and all after it.
        version = place(given(c["fingerprint"]), placement).set_caching_options(False)
        data = place(given(c["ingest"], data_fingerprint=version.output), placement)
        manifest = data.outputs["manifest"]
        planned = place(given(c["plan"], manifest=manifest), placement)
        lung_model = place(given(c["train-mask-model"], manifest=manifest, planned=planned.output), placement,
                           gpu=True, retry=True)
        masks = lung_masks(c, placement, preprocess_shards, parallelism, manifest=manifest,
                           mask_model=lung_model.outputs["mask_model"])
        with dsl.ParallelFor(planned.output, parallelism=parallelism) as variant:
            prepared = preprocessed(c, given, placement, preprocess_shards, parallelism, manifest=manifest,
                                    masks=masks.outputs["masks"], variant=variant)
            if pretrain_nodes > 1:  # a TrainJob on pretrain_nodes GPU nodes; this CPU task launches and waits
                job = trainjob_settings(placement, images.gpu, pretrain_nodes)
                backbone = launched(place(given(c["pretrain-job"], data=prepared.outputs["data"], job=job), placement,
                                          retry=True))
            else:
                backbone = place(given(c["pretrain"], data=prepared.outputs["data"]), placement, gpu=True, retry=True)
        indexed = place(c["catalog"](data=dsl.Collected(prepared.outputs["data"]),
                                     backbones=dsl.Collected(backbone.outputs["backbone"])), placement)
        trials = indexed.outputs["catalog"]
        history, finished = None, []
        for round_index in range(rounds):
            earlier = {"history_in": history} if history is not None else {}
            proposal = place(given(c["suggest"], finished=finished, trials_per_round=trials_per_round,
                                   round_index=round_index, **earlier), placement)
            # Uncached: round 0 reads the training CSV at results_uri, so a scheduled run continues the
            # search; for the same history it proposes the same batch, whose finished trials are cache hits.
            proposal.set_display_name(f"suggest-round-{round_index}").set_caching_options(False)
            with dsl.ParallelFor(proposal.outputs["Output"], parallelism=parallelism) as proposed:
                trial = place(given(c["train"], trial=proposed, catalog=trials, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
                              placement, gpu=True, retry=True)
                scored = place(given(c["evaluate"], train_row=trial.outputs["Output"],
                                     classifier=trial.outputs["classifier"], catalog=trials), placement, gpu=True,
                               retry=True)
            history, finished = proposal.outputs["history_out"], dsl.Collected(scored.outputs["Output"])
        place(given(c["aggregate"], finished=finished, history=history), placement)

    graph.__signature__ = sig
    graph.__name__ = name.replace("-", "_")
    graph.__doc__ = DESCRIPTION
    return dsl.pipeline(name=name, description=DESCRIPTION)(graph)


def main(argv=None) -> int:
    from pipelines import runner

    return runner.main(create_pipeline, name="neumo-full", doc=__doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
