from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def catalog(data: Input[List[Dataset]], backbones: Input[List[Model]], catalog: Output[Dataset]):
    """Index the prepared variants: pair each variant's data with its pretrained backbone by
    (pixels, mask), so every trial finds the pair its configuration names."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    entries = stages.catalog(variants=[{"uri": a.uri, **a.metadata} for a in data],
                             backbones=[{"uri": a.uri, **a.metadata} for a in backbones], out_path=catalog.path)
    catalog.metadata["variants"] = len(entries)
