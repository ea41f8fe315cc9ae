from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train_mask_model(
    manifest: Input[Dataset],
    mask_model: Output[Model],
    scores: Output[Metrics],
    variants: list = [],
    mask_model_uri: str = "",
    pixels: int = 256,
    epochs: int = 10,
    filters: int = 16,
    max_images: int = 0,
    seed: int = 0,
):
    """Provide the lung-mask U-Net: import the given model (`.keras`, or the group's legacy Keras 2
    `.h5`) or, when none is given, train one on the dataset's image + mask pairs and report its
    Dice and IoU on held-out patients at the original image size. Does nothing when none of the
    planned `variants` is masked."""
    import logging

    from neumo import stages
    from neumo.masking import MaskModelConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = MaskModelConfig(pixels=pixels, epochs=epochs, filters=filters, max_images=max_images, seed=seed)
    info = stages.mask_model(manifest.path, mask_model.path, mask_model_uri, config,
                              needed=any(v["mask"] for v in variants))
    mask_model.metadata.update({k: v for k, v in info.items() if isinstance(v, (str, int, float))})
    for key in ("dice", "iou"):
        if key in info:
            scores.log_metric(key, info[key])
