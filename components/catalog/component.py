from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def catalog(data: Input[List[Dataset]], backbones: Input[List[Model]], variants: Output[Dataset]):
    """Index the prepared variants: pair each variant's data with its pretrained backbone by
    (pixels, mask), so every trial finds the pair its configuration names."""
    from neumo import stages

    def describe(artifacts):
        return [{"uri": a.uri, "pixels": a.metadata["pixels"], "mask": a.metadata["mask"]} for a in artifacts]

    entries = stages.catalog(describe(data), describe(backbones), variants.path)
    variants.metadata["variants"] = len(entries)
