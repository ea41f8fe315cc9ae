from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import CPU_IMAGE, GPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def predict_list(images_uri: str, shards: int, listing: Output[Dataset]) -> list:
    """List every file under `images_uri` (a folder or gs:// prefix; hidden and system files
    skipped, non-images rejected, as ingest does) in at most `shards` parts; returns the parts'
    indices for the scoring loop."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    parts = stages.predict_list(images_uri=images_uri, shards=shards, out_dir=listing.path)
    listing.metadata["parts"] = len(parts)
    return parts


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def predict(bundle_uri: str, listing: Input[Dataset], shard: int, scores: Output[Dataset]):
    """Score one part of the listing with the model bundle: probability, decision at the bundle's
    threshold, OOD warning or the reason a file was not used (predictions.csv), one Grad-CAM
    overlay per image, index.html."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    summary = stages.predict(bundle_uri=bundle_uri, listing_dir=listing.path, shard=shard, out_dir=scores.path)
    scores.metadata.update({k: v for k, v in summary.items() if isinstance(v, int)})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def predict_gather(scores: Input[List[Dataset]], bundle_uri: str, predictions_uri: str, run_id: str,
                   predictions: Output[Dataset]):
    """Gather the scored parts into one predictions.csv, Grad-CAM overlay folder and index.html,
    the images sorted by probability (copied to predictions_uri/RUN_ID/ when given)."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    summary = stages.predict_gather(parts=[s.path for s in scores], bundle_uri=bundle_uri, out_dir=predictions.path,
                                    predictions_uri=predictions_uri, run_id=run_id)
    predictions.metadata.update({k: v for k, v in summary.items() if isinstance(v, int)})
