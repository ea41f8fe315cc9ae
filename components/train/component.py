from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train(
    config: dict,
    variants: Input[Dataset],
    model: Output[Model],
    epochs: int = 10,
    batch_size: int = 8,
    patience: int = 3,
    clahe_clip: float = 0.0,
    seed: int = 0,
    run_id: str = "",
    checkpoint_root: str = "",
) -> str:
    """Train one classifier trial (model 1 or 2 on its variant's pretrained backbone, Adam, best
    epoch kept, threshold chosen on the validation fold). Returns its training-CSV row as JSON; a
    trial that fails returns a failed row with the reason instead of sinking the round. The training
    state is backed up under `checkpoint_root` each epoch, so a preempted, retried pod resumes."""
    import json
    import logging

    from neumo import stages
    from neumo.training import TrainSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, patience=patience, seed=seed)
    try:
        row = stages.train(config, variants.path, model.path, model.uri, settings, run_id, clahe_clip or None, seed,
                           checkpoint_root)
    except Exception as err:  # a trial's failure (NaN loss, out of memory, bad config) must not sink the round
        logging.exception("trial failed")
        row = stages.failed_row(config, f"{type(err).__name__}: {err}", run_id, seed)
    model.metadata.update({k: row[k] for k in ("status", "pixels", "mask", "model") if k in row})
    if isinstance(row.get("score"), float) and row["score"] == row["score"]:  # NaN cannot be metadata
        model.metadata["score"] = row["score"]
    return json.dumps(row)
