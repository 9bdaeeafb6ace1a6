"""satdiff: metrics."""
