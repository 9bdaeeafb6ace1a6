"""satdiff: callbacks."""
