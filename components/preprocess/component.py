from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preprocess(
    manifest: Input[Dataset],
    masks: Input[Dataset],
    variant: dict,
    clahe_clip: float,
    acquisition_copies: int,
    acquisition: str,
    data: Output[Dataset],
):
    """The seed's preprocessing for one (pixels, mask) variant: lung mask applied when asked, grey,
    resize, CLAHE (clip 0 = OpenCV's default), stored as uint8 shards per fold; the z-score is
    applied when training reads them. `acquisition_copies` extra copies of each train image pass
    through a random other acquisition (`acquisition`: tight or varied) before the chain; the valid
    images are also stored under each acquisition shift of the suite (the "shifted" fold)."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    info = stages.preprocess(manifest_dir=manifest.path, variant=variant, out_dir=data.path, masks_dir=masks.path,
                             clahe_clip=clahe_clip, acquisition_copies=acquisition_copies, acquisition=acquisition)
    data.metadata.update({"pixels": info["pixels"], "mask": info["mask"], "data_version": info["data_version"],
                          "acquisition_copies": info["acquisition_copies"],
                          "acquisition": info["acquisition"], "images": sum(info["counts"].values())})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preprocess_parts(variant: dict, parts: int) -> list:
    """The items of one variant's preprocess loop, one per part of `parts`: each carries its variant."""
    from neumo import stages

    return stages.preprocess_parts(variant=variant, parts=parts)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preprocess_part(
    manifest: Input[Dataset],
    masks: Input[Dataset],
    item: dict,
    clahe_clip: float,
    acquisition_copies: int,
    acquisition: str,
    data: Output[Dataset],
):
    """One part of a variant's preprocessing (`item`: its variant, part and parts): its contiguous
    share of the variant's shards, written as one pod would write them, and a part record."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    record = stages.preprocess(manifest_dir=manifest.path, variant=item["variant"], out_dir=data.path,
                               masks_dir=masks.path, clahe_clip=clahe_clip, acquisition_copies=acquisition_copies,
                               acquisition=acquisition, part=item["part"], parts=item["parts"])
    data.metadata.update({k: record[k] for k in ("part", "parts", "images")})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preprocess_gather(parts: Input[List[Dataset]], data: Output[Dataset]):
    """A variant's parts gathered into the folder one pod would have written (variant.json last)."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    info = stages.preprocess_gather(parts=[p.path for p in parts], out_dir=data.path)
    data.metadata.update({"pixels": info["pixels"], "mask": info["mask"], "data_version": info["data_version"],
                          "acquisition_copies": info["acquisition_copies"],
                          "acquisition": info["acquisition"], "images": sum(info["counts"].values())})
