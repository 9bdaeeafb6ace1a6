"""satdiff: networks."""

from networks.adapter import AdapterOutput, ConditioningAdapter  # noqa: E402,F401
from networks.baselines import Persistence, PredRNN, SimVP  # noqa: E402,F401
from networks.flow_matching import FlowMatching  # noqa: E402,F401
from networks.ijepa import (  # noqa: E402,F401
    EMATargetEncoder,
    EmbeddingProjectionHead,
    IJEPAEncoder,
    IJEPAPredictor,
    MomentumSchedule,
    MultiBlockMaskGenerator,
)
from networks.sd3 import SD3Backbone, SD3TextEncoders  # noqa: E402,F401
