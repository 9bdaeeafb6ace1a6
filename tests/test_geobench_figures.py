"""The GEO-Bench prediction picture (``figures.geobench_panel``): labels as text, masks with a legend."""

from __future__ import annotations

import pytest
import torch

from figures import geobench_panel, save_png
from figures.geobench import classification_lines

NAMES = ["forest", "water", "urban", "crops"]


def test_multilabel_lines_list_the_true_labels_and_every_label_scored_above_the_threshold():
    label = torch.tensor([1, 0, 1, 0])
    logits = torch.tensor([3.0, -3.0, -0.5, 1.0])  # sigmoid: 0.95, 0.05, 0.38, 0.73
    truth, predicted = classification_lines(label, logits, NAMES, multilabel=True)
    assert truth == "forest; urban"
    assert predicted == "forest (0.95); crops (0.73)"


def test_single_label_lines_name_the_top_class_with_its_probability():
    truth, predicted = classification_lines(torch.tensor(2), torch.tensor([0.0, 0.0, 2.0, 0.0]), NAMES, False)
    assert truth == "urban"
    assert predicted.startswith("urban (0.71")


def test_classification_panel_has_one_tile_per_sample_with_the_labels_under_it(tmp_path):
    image = torch.rand(3, 5, 16, 16)
    label = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    logits = torch.tensor([[4.0, -4, -4, -4], [-4, -4, 4, -4], [-4, -4, -4, 4]])
    picture = geobench_panel(image, label, logits, NAMES, "multilabel", num_samples=2)
    axes = picture.figure.axes
    assert len(axes) == 2
    assert "truth: water" in axes[1].get_xlabel() and "predicted: urban (0.98)" in axes[1].get_xlabel()
    assert picture.caption.count("sample") == 2
    assert save_png(picture.figure, tmp_path / "panel.png").stat().st_size > 0


def test_segmentation_panel_scores_agreement_on_pixels_that_are_not_ignored():
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[0, :, 4:] = 1
    label[0, 0, :] = 255  # ignored row: predicted wrong there, must not count
    logits = torch.zeros(1, 4, 8, 8)
    logits[0, 0] = 1.0  # predicts class 0 everywhere: right on the left half only
    picture = geobench_panel(torch.rand(1, 3, 8, 8), label, logits, NAMES, "segmentation", ignore_index=255)
    assert len(picture.figure.axes) == 4  # image | truth | predicted | agreement
    assert picture.caption == "sample 0: pixel accuracy 0.500"
    legend = picture.figure.legends[0]
    assert [text.get_text() for text in legend.get_texts()] == ["forest", "water"]


def test_mismatched_predictions_are_refused_with_one_line():
    with pytest.raises(ValueError, match="3 scores for 4 class names"):
        geobench_panel(torch.rand(1, 3, 8, 8), torch.tensor([0]), torch.zeros(1, 3), NAMES, "classification")
