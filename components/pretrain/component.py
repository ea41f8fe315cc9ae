from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def pretrain(data: Input[Dataset], pretrain_epochs: int, filters: int, depth: int, seed: int, pretrain_task: str,
             pretrain_data: str, backbone: Output[Model]):
    """Pretrain the U-Net autoencoder on the variant's unlabelled images (and its train fold, by
    `pretrain_data`): restoring corrupted inputs with the top skip dropped (ours), as a plain
    autoencoder (the seed's), or not at all (`pretrain_task`). The encoder is the classifiers'
    backbone; its layers are named for the classifier taps."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    info = stages.pretrain(variant_dir=data.path, out_dir=backbone.path, pretrain_epochs=pretrain_epochs,
                           filters=filters, depth=depth, seed=seed, pretrain_task=pretrain_task,
                           pretrain_data=pretrain_data)
    backbone.metadata.update({k: info[k] for k in ("pixels", "mask", "task", "data", "images", "epochs", "seconds")})
    if info["best_val_loss"] is not None:
        backbone.metadata["best_val_loss"] = info["best_val_loss"]
