from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train_mask_model(
    manifest: Input[Dataset],
    planned: list,
    mask_model_uri: str,
    mask_pixels: int,
    mask_epochs: int,
    mask_max_images: int,
    filters: int,
    seed: int,
    mask_model: Output[Model],
    scores: Output[Metrics],
):
    """Provide the lung-mask U-Net: import the given model (`.keras`, or the group's legacy Keras 2
    `.h5`) or, when none is given, train one on the dataset's image + mask pairs and report its
    Dice and IoU on held-out patients at the original image size. Does nothing when none of the
    `planned` variants is masked."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    info = stages.mask_model(manifest_dir=manifest.path, out_dir=mask_model.path, mask_model_uri=mask_model_uri,
                             mask_pixels=mask_pixels, mask_epochs=mask_epochs, mask_max_images=mask_max_images,
                             filters=filters, seed=seed, planned=planned)
    mask_model.metadata.update({k: v for k, v in info.items() if isinstance(v, (str, int, float))})
    for key in ("dice", "iou"):
        if key in info:
            scores.log_metric(key, info[key])
