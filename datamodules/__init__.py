"""satdiff: datamodules."""

from datamodules.geobench import GeoBenchDataModule  # noqa: F401
from datamodules.s2_timeseries import S2ForecastDataModule, S2ForecastDataset, S2SequenceDataset  # noqa: F401
