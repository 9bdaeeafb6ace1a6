"""GEO-Bench task metrics, one definition shared by the DiFuser module, evaluation and benchmarks."""

from __future__ import annotations

from typing import Literal

from torchmetrics import ClasswiseWrapper, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
    MultilabelF1Score,
)

TaskType = Literal["classification", "multilabel", "segmentation"]


def task_metrics(
    task_type: TaskType, num_classes: int, class_names: list[str] | None, ignore_index: int | None
) -> MetricCollection:
    """GEO-Bench metrics: top-1 accuracy and macro F1 (classification); micro and macro F1 at sigmoid > 0.5
    (multi-label); mIoU and per-class IoU from one confusion matrix over the split with ``ignore_index`` pixels
    removed, and overall pixel accuracy (segmentation)."""
    if task_type == "classification":
        return MetricCollection(
            {
                "accuracy": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                "f1_macro": MulticlassF1Score(num_classes, average="macro"),
            }
        )
    if task_type == "multilabel":
        return MetricCollection(
            {
                "f1_micro": MultilabelF1Score(num_classes, threshold=0.5, average="micro"),
                "f1_macro": MultilabelF1Score(num_classes, threshold=0.5, average="macro"),
            }
        )
    labels = [name.replace(" ", "_") for name in (class_names or [str(c) for c in range(num_classes)])]
    return MetricCollection(
        {
            "miou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
            "iou": ClasswiseWrapper(
                MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index),
                labels=labels,
                prefix="iou_",
            ),
            "pixel_accuracy": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
        }
    )
