from kfp import dsl

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def fingerprint(dataset_uri: str, masks_uri: str, pretrain_uri: str) -> str:
    """A fingerprint of the input data from one listing (names, sizes, generations; nothing is
    read). It runs uncached on every run and feeds ingest, so ingest and everything after it are
    taken from the cache while the data is unchanged, and rerun as soon as a file changes."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    return stages.fingerprint(dataset_uri=dataset_uri, masks_uri=masks_uri, pretrain_uri=pretrain_uri)
