from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train(
    trial: dict,
    catalog: Input[Dataset],
    epochs: int,
    batch_size: int,
    patience: int,
    seed: int,
    run_id: str,
    results_uri: str,
    frozen_layers_count: str,
    threshold_policy: str,
    selection: str,
    classifier: Output[Model],
) -> str:
    """Train one classifier trial (`trial`: its configuration; model 1 or 2 on its variant's pretrained backbone, Adam, best
    epoch by the `selection` score, threshold chosen on the validation fold by `threshold_policy`). Returns its training-CSV row as JSON; a
    trial that fails returns a failed row with the reason instead of sinking the round. The training
    state is backed up under `results_uri` each epoch, so a preempted, retried pod resumes."""
    import json
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    row = stages.train(trial=trial, catalog_path=catalog.path, out_dir=classifier.path, model_uri=classifier.uri,
                       epochs=epochs, batch_size=batch_size, patience=patience, seed=seed, run_id=run_id,
                       results_uri=results_uri, frozen_layers_count=frozen_layers_count,
                       threshold_policy=threshold_policy, selection=selection)
    classifier.metadata.update(stages.trial_metadata(row))
    return json.dumps(row)
