from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def pretrain(data: Input[Dataset], pretrain_epochs: int, filters: int, depth: int, seed: int, backbone: Output[Model]):
    """Pretrain the U-Net autoencoder on the variant's unlabelled images by restoring corrupted
    inputs (intensity change, in-painting, out-painting) with the top skip dropped, so the encoder,
    the classifiers' backbone, learns anatomy. Encoder layers are named for the classifier taps."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    info = stages.pretrain(variant_dir=data.path, out_dir=backbone.path, pretrain_epochs=pretrain_epochs,
                           filters=filters, depth=depth, seed=seed)
    backbone.metadata.update({k: info[k] for k in ("pixels", "mask", "images", "best_val_loss", "seconds")})
