"""GEO-Bench prediction pictures: what a classifier or segmenter said about a few test images, beside the truth.

One row per sample: the image (RGB, the shared percentile stretch of ``figures.forecast.stretch``) then, for
classification, the true and predicted labels written under it (multi-label: every label scored above
``threshold``, with its probability; single-label: the top class and its probability); for segmentation, the true
mask, the predicted mask and their agreement, in one categorical colour map with ignored pixels in the nodata grey.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

from figures.forecast import DPI, NODATA_COLOUR, TILE_INCHES, Picture, _bare, _tile, stretch

LABEL_WIDTH = 34
"""Characters per line of the label text under a classification tile."""
MAX_LABELS = 4
"""Labels listed per line (truth or prediction); more are counted, not named."""


def _label_text(names: Sequence[str], scores: Sequence[float] | None = None) -> str:
    shown = [
        name if scores is None else f"{name} ({score:.2f})"
        for name, score in zip(names, scores or [None] * len(names), strict=True)
    ][:MAX_LABELS]
    if len(names) > MAX_LABELS:
        shown.append(f"+{len(names) - MAX_LABELS} more")
    return "; ".join(shown) if shown else "none"


def classification_lines(
    label: Tensor, logits: Tensor, class_names: Sequence[str], multilabel: bool, threshold: float = 0.5
) -> tuple[str, str]:
    """The truth and the prediction of one sample as text: ``label`` is a class index (or a multi-hot vector)
    and ``logits`` ``(K,)``."""
    if multilabel:
        probabilities = logits.float().sigmoid()
        truth = [class_names[i] for i in torch.nonzero(label).flatten().tolist()]
        order = [i for i in probabilities.argsort(descending=True).tolist() if probabilities[i] > threshold]
        return _label_text(truth), _label_text(
            [class_names[i] for i in order], [float(probabilities[i]) for i in order]
        )
    probabilities = logits.float().softmax(dim=-1)
    top = int(probabilities.argmax())
    return class_names[int(label)], _label_text([class_names[top]], [float(probabilities[top])])


def _class_colours(num_classes: int) -> ListedColormap:
    base = colormaps["tab20"] if num_classes > 10 else colormaps["tab10"]
    colours = [base(i % base.N) for i in range(num_classes)]
    return ListedColormap(colours).with_extremes(bad=NODATA_COLOUR)


def geobench_panel(
    image: Tensor,
    label: Tensor,
    logits: Tensor,
    class_names: Sequence[str],
    task_type: str,
    ignore_index: int | None = None,
    num_samples: int = 4,
    title: str | None = None,
) -> Picture:
    """Test predictions of a GEO-Bench model, one row per sample (see the module docstring).

    ``image`` ``(B, C, H, W)`` (the first three channels are shown as RGB, in the order the datamodule gives
    them), ``label`` and ``logits`` as the model's loss takes them: ``(B,)`` / ``(B, K)`` for classification,
    ``(B, K)`` multi-hot / ``(B, K)`` for multi-label, ``(B, H, W)`` / ``(B, K, H, W)`` for segmentation.
    """
    if task_type not in ("classification", "multilabel", "segmentation"):
        raise ValueError(f"geobench_panel: unknown task type {task_type!r}")
    if image.ndim != 4 or image.shape[1] < 3:
        raise ValueError(f"geobench_panel: expected images (B, C >= 3, H, W), got {tuple(image.shape)}")
    if logits.shape[0] != image.shape[0] or label.shape[0] != image.shape[0]:
        raise ValueError(
            f"geobench_panel: {image.shape[0]} images, {label.shape[0]} labels, {logits.shape[0]} predictions"
        )
    if logits.shape[1] != len(class_names):
        raise ValueError(f"geobench_panel: {logits.shape[1]} scores for {len(class_names)} class names")
    rows = min(num_samples, image.shape[0])
    rgb = stretch(image[:rows, :3].detach().float().cpu())
    segmentation = task_type == "segmentation"
    columns = 4 if segmentation else 1
    width = TILE_INCHES * (columns if segmentation else 1.6)
    figure = Figure(figsize=(width, (TILE_INCHES + 1.4) * rows + 0.6), dpi=DPI, layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    captions = []
    present: set[int] = set()
    for row in range(rows):
        if not segmentation:
            truth, predicted = classification_lines(
                label[row], logits[row], class_names, task_type == "multilabel"
            )
            text = "\n".join(
                textwrap.fill(f"{head}: {body}", LABEL_WIDTH)
                for head, body in (("truth", truth), ("predicted", predicted))
            )
            _tile(grid[row, 0], rgb[row], "image" if row == 0 else None, text)
            captions.append(f"sample {row}: truth {truth} | predicted {predicted}")
            continue
        truth = label[row].detach().cpu().numpy()
        predicted = logits[row].detach().float().argmax(dim=0).cpu().numpy()
        ignored = truth == ignore_index if ignore_index is not None else np.zeros(truth.shape, dtype=bool)
        scored = ~ignored
        present.update(np.unique(truth[scored]).tolist() + np.unique(predicted).tolist())
        accuracy = float((predicted[scored] == truth[scored]).mean()) if scored.any() else float("nan")
        _tile(grid[row, 0], rgb[row], "image" if row == 0 else None)
        cmap = _class_colours(len(class_names))
        norm = BoundaryNorm(np.arange(len(class_names) + 1) - 0.5, len(class_names))
        for column, (name, values) in enumerate((("truth", truth), ("predicted", predicted)), start=1):
            axes = grid[row, column]
            axes.imshow(
                np.ma.masked_array(values, mask=ignored), cmap=cmap, norm=norm, interpolation="nearest"
            )
            _bare(axes)
            if row == 0:
                axes.set_title(name, fontsize=9)
        agreement = np.ma.masked_array((predicted == truth).astype(float), mask=ignored)
        axes = grid[row, 3]
        axes.imshow(agreement, cmap=colormaps["RdYlGn"].with_extremes(bad=NODATA_COLOUR), vmin=0, vmax=1)
        _bare(axes)
        axes.set_xlabel(f"pixel accuracy {accuracy:.3f}", fontsize=8)
        if row == 0:
            axes.set_title("agreement", fontsize=9)
        captions.append(f"sample {row}: pixel accuracy {accuracy:.3f}")
    if present:
        cmap = _class_colours(len(class_names))
        handles = [Patch(color=cmap(i), label=class_names[i]) for i in sorted(present)]
        figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return Picture(figure, "; ".join(captions))
