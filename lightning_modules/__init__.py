"""satdiff: lightning_modules."""
