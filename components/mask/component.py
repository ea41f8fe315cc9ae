from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def mask(manifest: Input[Dataset], mask_model: Input[Model], masks: Output[Dataset]):
    """Lung masks for every manifest image: the seed's post-processing at the original size (holes
    filled, the two lungs kept), per-image QA (lung area fraction, components, flags) and a
    contact sheet of outlines."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    masks.metadata.update(stages.mask(manifest_dir=manifest.path, model_dir=mask_model.path, out_dir=masks.path,
                                       model_uri=mask_model.uri))
