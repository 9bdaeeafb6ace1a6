"""Persistence: tomorrow looks like today (the paper's "Default" row)."""

from __future__ import annotations

import torch
from torch import nn


class Persistence(nn.Module):
    """Forecast the last input frame unchanged; it has no parameters, so it needs no training."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Map a history ``(B, k, C, H, W)`` to its last frame ``(B, C, H, W)``."""
        return image[:, -1]
