"""``make demo``'s pictures: the forecast panel of the tested models and SatDiFuser's test predictions."""

from __future__ import annotations

from PIL import Image

from lightning_cli.demo import DemoModel, run_demo, run_difuser_demo


def test_demo_draws_every_tested_forecaster_on_the_same_test_windows(tmp_path):
    models = (DemoModel("persistence", "tiny/persistence.yaml", train=False),)
    table, figure = run_demo(models, tmp_path)
    assert "Persistence" in table
    assert figure == tmp_path / "forecast_panel.png"
    with Image.open(figure) as picture:
        width, height = picture.size
    assert width > 4 * 150 and height > 3 * 150  # input | truth | forecast | error, three windows


def test_difuser_demo_writes_its_test_predictions(tmp_path):
    row, figure = run_difuser_demo(tmp_path)
    assert row.startswith("SatDiFuser (tiny) | test/f1_micro")
    assert figure == tmp_path / "satdifuser_panel.png" and figure.stat().st_size > 0
