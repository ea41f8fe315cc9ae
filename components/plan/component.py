from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def plan(search_space: dict, manifest: Input[Dataset], mask_model_uri: str, depth: int, results_uri: str, config: dict,
         clahe_clip: float, acquisition_copies: int, acquisition: str) -> List[dict]:
    """Validate the search space against the ingested data, and the preprocessing settings, before
    any GPU time is spent, and list the data variants (pixels x mask) that preprocessing and
    pretraining must prepare (only the one `config` names, when a single configuration is trained)."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    return stages.plan(search_space=search_space, manifest_dir=manifest.path, mask_model_uri=mask_model_uri,
                       depth=depth, results_uri=results_uri, config=config, clahe_clip=clahe_clip,
                       acquisition_copies=acquisition_copies, acquisition=acquisition)
