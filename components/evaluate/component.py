from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate(
    train_row: str,
    classifier: Input[Model],
    catalog: Input[Dataset],
    bootstrap: int,
    tta_copies: int,
    predictions: Output[Dataset],
    metrics: Output[Metrics],
    roc: Output[ClassificationMetrics],
) -> str:
    """Evaluate a trained trial on the seed's test splits (test, val, test+val) and our validation
    fold at the threshold stored with the model: loss, accuracy, AUC with a 95% bootstrap
    interval, sensitivity, specificity, precision, F1, confusion matrix, per-image predictions, and
    ROC, confusion-matrix and Grad-CAM pictures beside them, and the model bundle (`tta_copies`
    test-time augmentation views averaged when above 0). Returns the trial record (training
    row + evaluation rows) as JSON."""
    import json
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    record = stages.evaluate(model_dir=classifier.path, catalog_path=catalog.path, train_row=json.loads(train_row),
                             out_dir=predictions.path, bootstrap=bootstrap, out_uri=predictions.uri,
                             tta_copies=tta_copies)
    shown = stages.shown_metrics(record)
    if shown:
        for name, value in shown["metrics"].items():
            metrics.log_metric(name, value)
        roc.log_roc_curve(*shown["roc"])
        roc.log_confusion_matrix(*shown["confusion"])
    return stages.trial_record(record)
