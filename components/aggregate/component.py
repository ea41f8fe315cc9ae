from typing import List

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def aggregate(finished: List[str], history: Input[Dataset], results_uri: str, tables: Output[Dataset],
              report: Output[HTML]):
    """Aggregate every trial of the run into the seed's two CSVs at the results URI
    (train_max_unsupervised.csv, image_class_evaluation_unsupervised.csv; earlier rows kept) and an
    HTML report with the leaderboard and plots."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    summary = stages.aggregate(history_in=history.path, finished=finished, results_uri=results_uri,
                               out_dir=tables.path, report_path=report.path)
    tables.metadata.update({k: v for k, v in summary.items() if v is not None})
