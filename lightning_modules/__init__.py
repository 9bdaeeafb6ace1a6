"""satdiff: lightning_modules."""

from lightning_modules.baselines import BaselineForecastModule  # noqa: E402,F401
from lightning_modules.difuser import DiFuserModule  # noqa: E402,F401
from lightning_modules.forecast import ForecastModule  # noqa: E402,F401
from lightning_modules.forecast_task import ForecastTask  # noqa: E402,F401
from lightning_modules.geobench_task import GeoBenchTask  # noqa: E402,F401
from lightning_modules.mcvd import MCVDModule  # noqa: E402,F401
from lightning_modules.supervised import SupervisedModule  # noqa: E402,F401
