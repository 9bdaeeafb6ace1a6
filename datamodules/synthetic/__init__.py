"""Small datasets in the on-disk formats the datamodules read, for tests, benchmarks and trying a config.

``python -m datamodules.synthetic.s2 OUT_DIR`` (Sentinel-2 time series, ``S2ForecastDataModule``) and
``python -m datamodules.synthetic.geobench OUT_DIR`` (GEO-Bench tasks, ``GeoBenchDataModule``).
"""
