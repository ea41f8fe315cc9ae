from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import CPU_IMAGE, GPU_IMAGE


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


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def mask_part(manifest: Input[Dataset], mask_model: Input[Model], part: int, parts: int,
              masks: Output[Dataset]):
    """Lung masks and QA rows of part `part` of `parts` of the manifest's rows
    (contiguous, in manifest order), with a part record for mask_gather."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    masks.metadata.update(stages.mask(manifest_dir=manifest.path, model_dir=mask_model.path, out_dir=masks.path,
                                       model_uri=mask_model.uri, part=part, parts=parts))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def mask_gather(manifest: Input[Dataset], parts: Input[List[Dataset]], masks: Output[Dataset]):
    """The mask parts gathered into the output one pod would have written: every mask, QA in
    manifest order, the contact sheet, masks.json last."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    masks.metadata.update(stages.mask_gather(parts=[p.path for p in parts], manifest_dir=manifest.path,
                                             out_dir=masks.path))
