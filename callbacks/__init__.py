"""satdiff: callbacks."""

from callbacks.checkpoint import (  # noqa: F401
    AtomicCheckpointIO,
    CorruptCheckpointError,
    EpochSeededSampler,
    ExactResume,
    LastCheckpoint,
    SeededSamples,
)
from callbacks.ema import TrainableEMA  # noqa: F401
from callbacks.faults import NonFiniteLossError, NonFiniteLossGuard  # noqa: F401
from callbacks.images import ForecastImageCallback, save_and_log_image  # noqa: F401
from callbacks.mosaic import MosaicWriter  # noqa: F401
