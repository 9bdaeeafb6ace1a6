"""Forecasting baselines from the Sat-JEPA-Diff comparison: persistence, SimVP v2 (gSTA) and PredRNN.

Every network maps a k-frame history ``(B, k, C, H, W)`` (oldest first) to the next frame ``(B, C, H, W)``.
"""

from networks.baselines.persistence import Persistence
from networks.baselines.predrnn import PredRNN, SpatioTemporalLSTMCell
from networks.baselines.simvp import SimVP

__all__ = ["Persistence", "PredRNN", "SimVP", "SpatioTemporalLSTMCell"]
