"""Forecasting baselines from the Sat-JEPA-Diff comparison: persistence, SimVP v2 (gSTA), PredRNN and MCVD.

Every network maps a k-frame history ``(B, k, C, H, W)`` (oldest first) to the next frame ``(B, C, H, W)``
(MCVD by sampling: ``MCVD.sample``; its forward is the denoiser).
"""

from networks.baselines.mcvd import MCVD
from networks.baselines.persistence import Persistence
from networks.baselines.predrnn import PredRNN, SpatioTemporalLSTMCell
from networks.baselines.simvp import SimVP

__all__ = ["MCVD", "Persistence", "PredRNN", "SimVP", "SpatioTemporalLSTMCell"]
