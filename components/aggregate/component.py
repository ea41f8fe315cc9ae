from typing import List

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def aggregate(finished: List[str], history: Input[Dataset], results_uri: str, ensemble_size: int,
              threshold_policy: str, selection: str, bootstrap: int, tables: Output[Dataset], report: Output[HTML]):
    """Aggregate every trial of the run into the seed's two CSVs at the results URI
    (train_max_unsupervised.csv, image_class_evaluation_unsupervised.csv; earlier rows kept) and an
    HTML report with the leaderboard and plots; publish the run's model (the best trial, or with
    `ensemble_size` above 1 the ensemble of the best trials by the `selection` score)."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    summary = stages.aggregate(history_in=history.path, finished=finished, results_uri=results_uri,
                               out_dir=tables.path, report_path=report.path, ensemble_size=ensemble_size,
                               threshold_policy=threshold_policy, selection=selection, bootstrap=bootstrap)
    tables.metadata.update({k: v for k, v in summary.items() if v is not None})
