"""satdiff: networks."""
