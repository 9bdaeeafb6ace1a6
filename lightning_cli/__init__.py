"""Command-line entry point: ``python -m lightning_cli fit|validate|test|predict --config ...``."""

from lightning_cli.cli import SatDiffCLI, main

__all__ = ["SatDiffCLI", "main"]
