from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate(
    train_row: str,
    model: Input[Model],
    variants: Input[Dataset],
    predictions: Output[Dataset],
    metrics: Output[Metrics],
    roc: Output[ClassificationMetrics],
    bootstrap: int = 1000,
) -> str:
    """Evaluate a trained trial on the seed's test splits (test, val, test+val) and our validation
    fold at the threshold stored with the model: loss, accuracy, AUC with a 95% bootstrap
    interval, sensitivity, specificity, precision, F1, confusion matrix, per-image predictions, and
    ROC, confusion-matrix and Grad-CAM pictures beside them. Returns the trial record (training row + evaluation rows) as JSON."""
    import json
    import logging
    import math

    from neumo import stages

    logging.basicConfig(level=logging.INFO)
    row = json.loads(train_row)
    if row["status"] != "ok":
        return json.dumps({"train": row, "eval": []})
    record = stages.evaluate(model.path, variants.path, row, predictions.path, bootstrap, predictions.uri)
    shown = next((e for e in record["eval"] if e["split"] != "valid"), record["eval"][0] if record["eval"] else None)
    if shown:
        for key in ("accuracy", "auc", "sensitivity", "specificity", "precision", "f1", "loss"):
            if math.isfinite(shown[key]):  # KFP metadata cannot hold NaN (e.g. precision with no positives)
                metrics.log_metric(f"{shown['split']}_{key}", float(shown[key]))
        curve = record["roc"][shown["split"]]
        roc.log_roc_curve(curve["fpr"], curve["tpr"], curve["thresholds"])
        roc.log_confusion_matrix(["NORMAL", "PNEUMONIA"], [[shown["tn"], shown["fp"]], [shown["fn"], shown["tp"]]])
    return json.dumps({k: record[k] for k in ("train", "eval", "figures_uri")})
