"""satdiff: datamodules."""
