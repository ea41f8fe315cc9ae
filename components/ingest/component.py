from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def ingest(
    dataset_uri: str,
    masks_uri: str,
    pretrain_uri: str,
    sample_per_class: int,
    seed: int,
    data_fingerprint: str,
    manifest: Output[Dataset],
    report: Output[Markdown],
):
    """Ingest and validate a chest X-ray dataset (Kaggle split/CLASS/file layout, folder or gs://),
    plus optional lung masks and an unlabelled pretraining set (NIH flat layout). Writes the
    manifest (id, split, fold, label, patient id, size, checksum, mask) with a seeded patient-level
    0.8/0.2 train/valid split, and a report accounting for every file. `data_fingerprint` (from the
    fingerprint stage) makes the cache key change whenever the data does."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    summary = stages.ingest(dataset_uri=dataset_uri, masks_uri=masks_uri, pretrain_uri=pretrain_uri,
                            sample_per_class=sample_per_class, seed=seed, out_dir=manifest.path, report_path=report.path)
    manifest.metadata.update({k: summary[k] for k in ("files", "accepted", "rejected", "duplicate", "data_version")})
    manifest.metadata["data_fingerprint"] = data_fingerprint
