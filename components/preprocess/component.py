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
