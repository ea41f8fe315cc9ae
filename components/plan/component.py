from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def plan(search_space: dict, manifest: Input[Dataset], mask_model_uri: str = "", depth: int = 4,
         results_uri: str = "", config: dict = {}, clahe_clip: float = 0.0, acquisition_copies: int = 1) -> List[dict]:
    """Validate the search space against the ingested data, and the preprocessing settings, before
    any GPU time is spent, and list
    the data variants (pixels x mask) that preprocessing and pretraining must prepare (only the
    one `config` names, when a single configuration is trained)."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO)
    return stages.plan(search_space, manifest.path, mask_model_uri, depth, results_uri, config, clahe_clip or None,
                       acquisition_copies)
