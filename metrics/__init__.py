"""satdiff: metrics and losses, one definition each (see docs/DESIGN.md)."""

from metrics.forecast import (
    FID,
    LPIPS,
    ForecastMetrics,
    GradientStructuralSimilarity,
    MeanOverSamples,
    PartialWindows,
    PeakSignalToNoise,
    PixelError,
    StructuralSimilarity,
)
from metrics.functional import gssim, l1, mse, psnr, ssim
from metrics.geobench import task_metrics
from metrics.losses import HybridIJEPALoss, flow_matching_loss
from metrics.table import append_row, format_table, metric_row, read_rows

__all__ = [
    "FID",
    "LPIPS",
    "ForecastMetrics",
    "GradientStructuralSimilarity",
    "MeanOverSamples",
    "PartialWindows",
    "PeakSignalToNoise",
    "PixelError",
    "StructuralSimilarity",
    "append_row",
    "format_table",
    "gssim",
    "l1",
    "metric_row",
    "mse",
    "psnr",
    "read_rows",
    "ssim",
    "task_metrics",
    "HybridIJEPALoss",
    "flow_matching_loss",
]
