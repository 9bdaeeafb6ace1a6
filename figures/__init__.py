"""satdiff: every picture (validation panel, per-region rollout figure, per-step metric plot, GEO-Bench predictions),
no Lightning."""

from figures.forecast import (  # noqa: F401
    DISPLAY_GAMMA,
    ERROR_SCALE,
    NODATA_COLOUR,
    Picture,
    error_map,
    error_norm,
    forecast_panel,
    format_metrics,
    metrics_per_step_figure,
    panel_metrics,
    rollout_figure,
    save_png,
    step_rows,
    stretch,
)
from figures.geobench import geobench_panel  # noqa: F401
from figures.rollouts import RegionRollouts  # noqa: F401
