"""GEO-Bench v1.0 tasks read straight from the benchmark's own files with h5py (no ``geobench`` package).

On disk a task is ``<root>/classification_v1.0/<task>/`` or ``<root>/segmentation_v1.0/<task>/`` holding
``task_specs.pkl`` (bands, label type, class count), ``band_stats.json`` (per-band min/max/mean/std),
``default_partition.json`` (train/valid/test sample names), ``<frac>x_train_partition.json`` (smaller train
sets), optional ``label_map.json``/``label_stats.json`` and one ``<sample>.hdf5`` per sample: one dataset per band
named by band (``_<date>`` appended for dated bands), a segmentation mask in a dataset whose name starts with
``label``, and per-sample attributes (the classification label) pickled in ``attrs["pickle"]``.

Those pickles name geobench, affine and rasterio classes. They are read with :class:`GeoBenchUnpickler`, which
only rebuilds plain builtins, datetimes and numpy arrays (object dtypes refused) and turns every class of the
format into an :class:`InertObject` that just records its state, so a crafted file can never run code.

Batches follow docs/DESIGN.md ("SatDiFuser contracts"): ``image`` float32 ``(B, C, H, W)``, ``label`` int64
``(B,)`` / float ``(B, K)`` (multi-label) / int64 ``(B, H, W)`` mask, and ``sample`` (the sample name).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import pickle
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, RandomSampler
from torchgeo.datamodules import NonGeoDataModule
from torchgeo.datasets import NonGeoDataset

TaskType = Literal["classification", "multilabel", "segmentation"]
Normalization = Literal["sensor", "percentile", "minmax", "meanstd"]
PercentileRange = Literal["0.1-99.9", "1-99"]
MissingBands = Literal["error", "zero"]

BENCHMARK_FOLDERS = {"classification": "classification_v1.0", "segmentation": "segmentation_v1.0"}

# What the task folders do not say: which of the 12 tasks are multi-label (the files only hold a label type
# object) and which benchmark folder holds each. Source: GEO-Bench paper (Lacoste et al., 2023), Table 1.
# Class counts, class names and band names are NOT kept here: they are read from task_specs.pkl.
# Note (geo-bench issues #28/#29): m-eurosat and m-brick-kiln store wrong names for some non-RGB channels
# (B8A/B09.. order); the RGB bands (02-04) are named correctly, so the RGB default is unaffected.
KNOWN_TASK_TYPES: dict[str, TaskType] = {
    "m-eurosat": "classification",
    "m-brick-kiln": "classification",
    "m-bigearthnet": "multilabel",
    "m-so2sat": "classification",
    "m-forestnet": "classification",
    "m-pv4ger": "classification",
    "m-pv4ger-seg": "segmentation",
    "m-nz-cattle": "segmentation",
    "m-NeonTree": "segmentation",
    "m-cashew-plant": "segmentation",
    "m-SA-crop-type": "segmentation",
    "m-chesapeake": "segmentation",
}

# Label-type classes of geobench, for tasks missing from the table above.
LABEL_TYPE_TASKS: dict[str, TaskType] = {
    "Classification": "classification",
    "MultiLabelClassification": "multilabel",
    "SemanticSegmentation": "segmentation",
    "SegmentationClasses": "segmentation",
}

# Fixed digital-number scale per sensor (band-info class in task_specs.pkl), as the SatDiFuser reference scales its
# inputs: Sentinel-2 L2A reflectance x 10000 by 1/4095 (clipped), 8-bit aerial RGB (geobench's generic
# ``SpectralBand``) by 1/255. Tasks whose files hold other units set ``pixel_scale``.
SENSOR_SCALES = {"Sentinel2": 4095.0, "SpectralBand": 255.0}
# band_stats.json keys (geobench's ``compute_stats``) of each percentile stretch.
PERCENTILE_KEYS = {
    "0.1-99.9": ("percentile_0_1", "percentile_99_9"),
    "1-99": ("percentile_1", "percentile_99"),
}
# A fixed scale that maps a band's mean outside this range means the files are not in the sensor's usual units.
PLAUSIBLE_SCALED_MEAN = (0.005, 0.95)

DEFAULT_PARTITION = "default_partition.json"
LIGHTNING_TO_GEOBENCH_SPLIT = {"train": "train", "val": "valid", "test": "test"}


# ----------------------------------------------------------------------------------------------------------
# Restricted unpickling
# ----------------------------------------------------------------------------------------------------------


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names something outside the GEO-Bench format: refused, never executed."""


class InertObject:
    """Stand-in for a class of the GEO-Bench format: records constructor arguments and state, runs nothing."""

    pickled_module = ""
    pickled_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        obj = super().__new__(cls)
        obj.args = args
        obj.state = {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Accept the constructor call a REDUCE makes; ``__new__`` has recorded its arguments."""

    def __setstate__(self, state: Any) -> None:
        if (
            isinstance(state, tuple)
            and len(state) == 2
            and all(s is None or isinstance(s, dict) for s in state)
        ):
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = state

    def get(self, key: str, default: Any = None) -> Any:
        """A recorded attribute (``None``-safe for states that are not dicts)."""
        return self.state.get(key, default) if isinstance(self.state, dict) else default

    def __repr__(self) -> str:
        return f"InertObject({self.pickled_module}.{self.pickled_name})"


# Packages whose classes appear in GEO-Bench pickles (band/label/task info, affine transforms, CRS).
FORMAT_PACKAGES = ("geobench", "ccb", "affine", "rasterio")
SAFE_GLOBALS = (
    {
        ("builtins", name)
        for name in (
            "set",
            "frozenset",
            "complex",
            "slice",
            "range",
            "bytearray",
            "bytes",
            "list",
            "dict",
            "tuple",
        )
    }
    | {("collections", "OrderedDict")}
    | {("datetime", name) for name in ("date", "datetime", "time", "timedelta", "timezone")}
)


def _checked_dtype(*args: Any) -> np.dtype:
    """numpy.dtype without object dtypes, whose values numpy would unpickle unrestricted."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError("object dtypes are refused")
    return dtype


def _checked_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"ndarray subclass {subtype!r} is refused")
    return np.ndarray.__new__(np.ndarray, shape, _checked_dtype(dtype))


def _checked_scalar(dtype: np.dtype, data: Any) -> Any:
    if not isinstance(data, bytes) or _checked_dtype(dtype).itemsize != len(data):
        raise UnsafePickleError("malformed numpy scalar")
    return np.frombuffer(data, dtype=dtype)[0]


def _checked_frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    array = np.frombuffer(buffer, dtype=_checked_dtype(dtype)).reshape(shape, order=order)
    return array.copy()


NUMPY_GLOBALS = {("numpy", "dtype"): _checked_dtype, ("numpy", "ndarray"): np.ndarray}
for _core in ("numpy.core", "numpy._core"):
    NUMPY_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _checked_reconstruct
    NUMPY_GLOBALS[(f"{_core}.multiarray", "scalar")] = _checked_scalar
    NUMPY_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _checked_frombuffer


class GeoBenchUnpickler(pickle.Unpickler):
    """Unpickler for GEO-Bench metadata: builtins/datetime/numpy data only, format classes become inert."""

    _stand_ins: dict[tuple[str, str], type[InertObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in NUMPY_GLOBALS:
            return NUMPY_GLOBALS[key]
        if key in SAFE_GLOBALS:
            return super().find_class(module, name)
        if module.split(".")[0] in FORMAT_PACKAGES:
            if key not in self._stand_ins:
                attrs = {"pickled_module": module, "pickled_name": name}
                self._stand_ins[key] = type(name.replace(".", "_"), (InertObject,), attrs)
            return self._stand_ins[key]
        raise UnsafePickleError(f"refusing to unpickle {module}.{name}: not part of the GEO-Bench format")


def safe_unpickle(data: bytes) -> Any:
    """Unpickle GEO-Bench metadata bytes with :class:`GeoBenchUnpickler`."""
    return GeoBenchUnpickler(io.BytesIO(data)).load()


def decode_attrs_pickle(value: Any) -> Any:
    """Decode a sample's ``attrs["pickle"]``: ``str(pickle.dumps(d))``, i.e. a bytes literal in a string."""
    if isinstance(value, np.void):
        value = value.tobytes()
    if isinstance(value, str):
        value = ast.literal_eval(value)  # literals only: a bytes literal
    if not isinstance(value, bytes):
        raise ValueError(f"attrs['pickle'] holds {type(value).__name__}, expected a pickled bytes literal")
    return safe_unpickle(value)


# ----------------------------------------------------------------------------------------------------------
# Task metadata (cheap, read at construction)
# ----------------------------------------------------------------------------------------------------------


def _read_json(path: Path, key: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"GEO-Bench file {path} is missing (from config key '{key}')")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"GEO-Bench file {path} is not valid JSON: {err}") from err


def find_task_dir(root: Path, task: str) -> Path:
    """``<root>/<classification|segmentation>_v1.0/<task>``, naming both keys when it is absent."""
    if not root.is_dir():
        raise FileNotFoundError(f"GEO-Bench root folder {root} (config key 'root') does not exist")
    known = KNOWN_TASK_TYPES.get(task)
    folders = (
        [BENCHMARK_FOLDERS["segmentation" if known == "segmentation" else "classification"]] if known else []
    )
    candidates = [root / folder / task for folder in folders or BENCHMARK_FOLDERS.values()]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"GEO-Bench task folder for task '{task}' (config keys 'root', 'task') not found; looked for "
        + ", ".join(str(c) for c in candidates)
    )


def load_task_specs(task_dir: Path) -> InertObject:
    path = task_dir / "task_specs.pkl"
    if not path.is_file():
        raise FileNotFoundError(f"GEO-Bench file {path} is missing (from config keys 'root', 'task')")
    try:
        specs = safe_unpickle(path.read_bytes())
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"cannot read GEO-Bench task specs {path}: {err}") from err
    if (
        not isinstance(specs, InertObject)
        or specs.get("bands_info") is None
        or specs.get("label_type") is None
    ):
        raise ValueError(f"GEO-Bench task specs {path} hold no bands_info/label_type")
    return specs


def resolve_bands(
    requested: Sequence[str],
    bands_info: Sequence[InertObject],
    specs_path: Path,
    missing_bands: MissingBands = "error",
) -> list[str | None]:
    """Full band names for names or alternative names (e.g. 'red' -> '04 - Red'), case-insensitively; with
    ``missing_bands='zero'`` a band the task lacks is None (a zero-filled channel), an ambiguous one still fails."""
    lookup: dict[str, set[str]] = {}
    for info in bands_info:
        name = info.get("name")
        for alias in (name, *(info.get("alt_names") or ())):
            lookup.setdefault(str(alias).lower(), set()).add(name)
    available = [info.get("name") for info in bands_info]
    resolved = []
    for band in requested:
        matches = lookup.get(band.lower(), set())
        if not matches and missing_bands == "zero":
            resolved.append(None)
            continue
        if len(matches) != 1:
            problem = (
                "is ambiguous" if matches else "is unknown (config key 'missing_bands: zero' zero-fills it)"
            )
            raise ValueError(
                f"band '{band}' (config key 'bands') {problem} for {specs_path.parent.name}; "
                f"available bands (from {specs_path.name}): {available}"
            )
        resolved.append(matches.pop())
    return resolved


def _class_names(label_type: InertObject, num_classes: int) -> list[str]:
    """Names stored in the label type (attribute spelling differs by class); index strings when absent."""
    for attr in ("_class_names", "class_names", "class_name"):
        names = label_type.get(attr)
        if names is not None:
            return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


NORMALIZATIONS = ("sensor", "percentile", "minmax", "meanstd")


def band_scaling(
    normalization: Normalization,
    entry: dict[str, Any],
    band: str,
    stats_path: Path,
    sensor: str,
    pixel_scale: float | None,
    percentiles: PercentileRange,
) -> tuple[float, float]:
    """``(offset, scale)`` of one band: pixels become ``(value - offset) / scale``."""
    fields = {
        "sensor": ("mean",),
        "percentile": PERCENTILE_KEYS[percentiles],
        "minmax": ("min", "max"),
        "meanstd": ("mean", "std"),
    }[normalization]
    if not all(isinstance(entry.get(f), int | float) and math.isfinite(entry[f]) for f in fields):
        raise ValueError(f"{stats_path} lacks finite {'/'.join(fields)} for band '{band}'")
    if normalization == "sensor":
        scale = pixel_scale or SENSOR_SCALES.get(sensor)
        if scale is None:
            raise ValueError(
                f"no fixed scale known for band '{band}' of sensor {sensor} (task_specs.pkl); set config key "
                "'pixel_scale' or use normalization 'percentile'"
            )
        low, high = PLAUSIBLE_SCALED_MEAN
        if not low <= entry["mean"] / scale <= high:
            raise ValueError(
                f"{stats_path}: band '{band}' has mean {entry['mean']:.4g}, i.e. {entry['mean'] / scale:.3g} after "
                f"dividing by {scale:g}: not {sensor} digital numbers; set config key 'pixel_scale' or use "
                "normalization 'percentile'"
            )
        return 0.0, float(scale)
    if normalization == "meanstd":
        offset, spread = entry["mean"], entry["std"]
    else:
        offset, spread = entry[fields[0]], entry[fields[1]] - entry[fields[0]]
    if spread <= 0:
        raise ValueError(
            f"{stats_path}: band '{band}' has zero {'std' if normalization == 'meanstd' else 'range'}"
        )
    return float(offset), float(spread)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ----------------------------------------------------------------------------------------------------------
# Dataset of one split (validated when built, i.e. at DataModule.setup)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRecord:
    """One checked sample: where its bands are and its label (masks are read per item)."""

    name: str
    path: Path
    band_keys: tuple[str | None, ...]
    native_size: tuple[int, int]
    label: Any = None
    mask_key: str | None = None


@dataclass(frozen=True)
class SplitSpec:
    """Everything a split dataset needs, fixed by the DataModule's config and the task files."""

    task_dir: Path
    task_type: TaskType
    num_classes: int
    band_names: tuple[str | None, ...]  # None: a band the task lacks, zero-filled
    offset: tuple[float, ...]
    scale: tuple[float, ...]
    clip: bool
    image_size: int | None
    ignore_index: int


class GeoBenchSplit(NonGeoDataset):
    """The samples of one split; every file is opened and checked here so training never fails mid-epoch."""

    def __init__(
        self, spec: SplitSpec, sample_names: Sequence[str], split: str, partition_file: Path
    ) -> None:
        if not sample_names:
            raise ValueError(f"GEO-Bench split '{split}' of {partition_file} is empty")
        self.spec = spec
        self.records = [self._check_sample(name) for name in sample_names]
        if spec.image_size is None:
            sizes = {r.native_size for r in self.records}
            if len(sizes) > 1:
                first = self.records[0]
                odd = next(r for r in self.records if r.native_size != first.native_size)
                raise ValueError(
                    f"GEO-Bench samples differ in size ({first.path}: {first.native_size}, {odd.path}: "
                    f"{odd.native_size}); set config key 'image_size' to resize them to one size"
                )

    def _check_sample(self, name: str) -> SampleRecord:
        spec = self.spec
        path = spec.task_dir / f"{name}.hdf5"
        if not path.is_file():
            raise FileNotFoundError(f"GEO-Bench sample file {path} is missing")
        try:
            with h5py.File(path, "r") as file:
                keys = list(file.keys())
                band_keys = tuple(
                    None if band is None else self._band_key(band, keys, path) for band in spec.band_names
                )
                shapes = [self._finite_2d(file, key, path) for key in band_keys if key is not None]
                native = max(shapes, key=lambda s: s[0] * s[1])
                if spec.task_type == "segmentation":
                    mask_key = self._mask_key(keys, path)
                    native = self._finite_2d(file, mask_key, path)
                    return SampleRecord(name, path, band_keys, native, mask_key=mask_key)
                label = self._read_label(file.attrs, path)
                return SampleRecord(name, path, band_keys, native, label=label)
        except OSError as err:
            raise ValueError(
                f"GEO-Bench sample file {path} cannot be read (corrupt or truncated?): {err}"
            ) from err

    @staticmethod
    def _band_key(band: str, keys: list[str], path: Path) -> str:
        if band in keys:
            return band
        dated = [k for k in keys if k.startswith(f"{band}_")]
        if len(dated) == 1:
            return dated[0]
        problem = f"holds {len(dated)} dated copies of" if dated else "lacks"
        raise ValueError(f"GEO-Bench sample file {path} {problem} band '{band}'; it has {keys}")

    @staticmethod
    def _mask_key(keys: list[str], path: Path) -> str:
        masks = [k for k in keys if k.startswith("label")]
        if len(masks) != 1:
            raise ValueError(
                f"GEO-Bench sample file {path} has {len(masks)} 'label*' datasets, expected one mask"
            )
        return masks[0]

    @staticmethod
    def _finite_2d(file: h5py.File, key: str, path: Path) -> tuple[int, int]:
        data = np.squeeze(file[key][()])
        if data.ndim != 2:
            raise ValueError(
                f"GEO-Bench sample file {path}: dataset '{key}' has shape {data.shape}, expected 2-D"
            )
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise ValueError(f"GEO-Bench sample file {path}: dataset '{key}' holds NaN/Inf pixels")
        return int(data.shape[0]), int(data.shape[1])

    def _read_label(self, attrs: h5py.AttributeManager, path: Path) -> Any:
        if "pickle" not in attrs:
            raise ValueError(f"GEO-Bench sample file {path} has no attrs['pickle'] holding its label")
        try:
            meta = decode_attrs_pickle(attrs["pickle"])
        except (pickle.UnpicklingError, EOFError, ValueError, SyntaxError, TypeError, AttributeError) as err:
            raise ValueError(
                f"GEO-Bench sample file {path}: attrs['pickle'] cannot be read safely: {err}"
            ) from err
        if not isinstance(meta, dict) or "label" not in meta:
            raise ValueError(f"GEO-Bench sample file {path}: attrs['pickle'] holds no 'label'")
        label = np.asarray(meta["label"])
        k = self.spec.num_classes
        if self.spec.task_type == "multilabel":
            if label.shape != (k,) or not np.isin(label, (0, 1)).all():
                raise ValueError(
                    f"GEO-Bench sample file {path}: multi-label {label.tolist()} is not {k} zeros/ones"
                )
            return tuple(float(v) for v in label)
        if label.ndim != 0 or label.dtype.kind not in "iu" or not 0 <= int(label) < k:
            raise ValueError(
                f"GEO-Bench sample file {path}: label {label.tolist()} is not a class index in [0, {k})"
            )
        return int(label)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        spec, record = self.spec, self.records[index]
        size = (spec.image_size, spec.image_size) if spec.image_size else record.native_size
        with h5py.File(record.path, "r") as file:
            bands = [None if key is None else np.squeeze(file[key][()]) for key in record.band_keys]
            mask = np.squeeze(file[record.mask_key][()]) if record.mask_key else None
        image = torch.stack(
            [
                torch.zeros(size)
                if band is None
                else self._resize_band(torch.from_numpy(band.astype(np.float32)), size)
                for band in bands
            ]
        )
        offset = torch.tensor(spec.offset, dtype=torch.float32)[:, None, None]
        scale = torch.tensor(spec.scale, dtype=torch.float32)[:, None, None]
        image = (image - offset) / scale
        if spec.clip:
            image = image.clamp(0.0, 1.0)
        return {"image": image, "label": self._label(record, mask, size), "sample": record.name}

    @staticmethod
    def _resize_band(band: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(band.shape) == size:
            return band
        return F.interpolate(
            band[None, None], size=size, mode="bilinear", align_corners=False, antialias=True
        )[0, 0]

    def _label(self, record: SampleRecord, mask: np.ndarray | None, size: tuple[int, int]) -> torch.Tensor:
        spec = self.spec
        if spec.task_type == "classification":
            return torch.tensor(record.label, dtype=torch.int64)
        if spec.task_type == "multilabel":
            return torch.tensor(record.label, dtype=torch.float32)
        values = torch.from_numpy(mask.astype(np.int64))
        values[(values < 0) | (values >= spec.num_classes)] = spec.ignore_index
        if tuple(values.shape) != size:
            resized = F.interpolate(values[None, None].double(), size=size, mode="nearest-exact")
            values = resized[0, 0].long()
        return values


class KeepLastBatchSampler(BatchSampler):
    """Batches that keep the last partial batch (small label splits must train), merging a final batch of one
    into the one before it: BatchNorm (UPerNet's PPM) cannot train on a single sample. With ``batch_size`` 1 every
    batch is a full one and nothing is merged."""

    def __iter__(self) -> Iterator[list[int]]:
        pending: list[int] | None = None
        for batch in super().__iter__():
            if pending is not None and len(batch) == 1 and self.batch_size > 1:
                batch = pending + batch
            elif pending is not None:
                yield pending
            pending = batch
        if pending is not None:
            yield pending

    def __len__(self) -> int:
        batches = super().__len__()
        if (
            not self.drop_last
            and self.batch_size > 1
            and batches > 1
            and len(self.sampler) % self.batch_size == 1
        ):
            return batches - 1
        return batches


# ----------------------------------------------------------------------------------------------------------
# DataModule
# ----------------------------------------------------------------------------------------------------------


class GeoBenchDataModule(NonGeoDataModule):
    """One GEO-Bench v1.0 task; task metadata is read at construction, sample files are checked at setup.

    Args:
        task: task folder name, e.g. ``m-eurosat``, ``m-bigearthnet``, ``m-chesapeake``.
        root: the benchmark folder holding ``classification_v1.0/`` and ``segmentation_v1.0/``.
        bands: band names or alternative names (case-insensitive; RGB for DiffusionSat by default).
        missing_bands: ``error`` refuses a requested band the task lacks; ``zero`` gives it as a channel of zeros
            (after normalisation), e.g. a foundation model's pretraining bands on a task with fewer (logged once).
        train_fraction: 1.0 uses ``default_partition.json``; else ``{train_fraction:.2f}x_train_partition.json``
            gives the train split (valid/test always come from the default partition).
        image_size: square side to resize to (bilinear, antialiased for images; nearest for masks); None keeps
            the native size.
        normalization: how pixels reach the [0, 1] the diffusion VAE expects. ``sensor`` (default) divides by a
            fixed per-sensor scale (Sentinel-2 DN / 4095, 8-bit aerial RGB / 255, as the SatDiFuser reference) and
            clips: independent of band_stats.json, whose maxima are saturated outliers (clouds, glint) and whose
            percentiles shift with the scenes sampled. ``percentile`` stretches band_stats.json's ``percentiles``
            range to [0, 1] and clips. ``minmax`` uses band_stats.json's min/max (near-black images on real
            Sentinel-2 tasks: the maxima are outliers); ``meanstd`` standardises (not for the VAE).
        percentiles: the band_stats.json range of the ``percentile`` stretch: ``0.1-99.9`` or ``1-99``.
        pixel_scale: the divisor of ``sensor`` for every band, for tasks whose files are not in the sensor's usual
            units (None: by sensor, from task_specs.pkl).
        ignore_index: mask value for unlabelled pixels; mask values outside ``[0, num_classes)`` become it.
            255 by default (no task has that many classes). A module's loss/metrics must use ``ignore_index``.
        batch_size: the paper uses 32. The last partial training batch is kept (a final batch of one is merged
            into the previous batch), so label splits smaller than a batch still train.
        num_workers: DataLoader workers.
        predict_split: ``all`` predicts over train, val and test, e.g. to fill a feature cache before training.
    """

    # No random augmentation: every epoch sees the same pixels, which a feature cache relies on.
    random_augmentation = False

    def __init__(
        self,
        task: str,
        root: str,
        bands: Sequence[str] = ("red", "green", "blue"),
        train_fraction: float = 1.0,
        image_size: int | None = None,
        normalization: Normalization = "sensor",
        percentiles: PercentileRange = "0.1-99.9",
        pixel_scale: float | None = None,
        ignore_index: int = 255,
        batch_size: int = 32,
        num_workers: int = 0,
        predict_split: Literal["test", "all"] = "test",
        missing_bands: MissingBands = "error",
    ) -> None:
        super().__init__(GeoBenchSplit, batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"config key 'normalization' must be one of {NORMALIZATIONS}, got '{normalization}'"
            )
        if missing_bands not in ("error", "zero"):
            raise ValueError(f"config key 'missing_bands' must be 'error' or 'zero', got '{missing_bands}'")
        if percentiles not in PERCENTILE_KEYS:
            raise ValueError(
                f"config key 'percentiles' must be one of {list(PERCENTILE_KEYS)}, got '{percentiles}'"
            )
        if pixel_scale is not None and not (math.isfinite(pixel_scale) and pixel_scale > 0):
            raise ValueError(f"config key 'pixel_scale' must be a positive number, got {pixel_scale}")
        if image_size is not None and image_size <= 0:
            raise ValueError(f"config key data.init_args.image_size must be positive, got {image_size}")
        for key, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if value < minimum:
                raise ValueError(f"config key data.init_args.{key} must be >= {minimum}, got {value}")
        if not bands:
            raise ValueError("config key 'bands' is empty")
        self.task = task
        self.task_dir = find_task_dir(Path(root), task)
        specs = load_task_specs(self.task_dir)
        specs_path = self.task_dir / "task_specs.pkl"

        label_type = specs.get("label_type")
        self.task_type: TaskType = KNOWN_TASK_TYPES.get(task) or LABEL_TYPE_TASKS.get(label_type.pickled_name)
        if self.task_type is None:
            raise ValueError(f"unknown label type {label_type.pickled_name} in {specs_path}")
        self.num_classes = int(label_type.get("n_classes") or 0)
        if self.num_classes < 1:
            raise ValueError(f"{specs_path}: label type {label_type.pickled_name} has no n_classes")
        self.class_names = _class_names(label_type, self.num_classes)
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{specs_path}: {len(self.class_names)} class names for {self.num_classes} classes"
            )
        self.available_bands = [info.get("name") for info in specs.get("bands_info")]
        self.band_names = resolve_bands(list(bands), specs.get("bands_info"), specs_path, missing_bands)
        zero_filled = [band for band, name in zip(bands, self.band_names, strict=True) if name is None]
        if len(zero_filled) == len(bands):
            raise ValueError(
                f"none of the bands {list(bands)} (config key 'bands') is in {self.task_dir.name}"
            )
        if zero_filled:
            rank_zero_info(f"GEO-Bench {task} lacks bands {zero_filled}: zero-filled (missing_bands: zero)")

        stats_path = self.task_dir / "band_stats.json"
        stats = _read_json(stats_path, "task")
        sensors = {info.get("name"): info.pickled_name for info in specs.get("bands_info")}
        offset, scale = [], []
        for band in self.band_names:
            if band is None:
                offset.append(0.0)
                scale.append(1.0)
                continue
            low, spread = band_scaling(
                normalization, stats.get(band, {}), band, stats_path, sensors[band], pixel_scale, percentiles
            )
            offset.append(low)
            scale.append(spread)

        self.default_partition_file = self.task_dir / DEFAULT_PARTITION
        if train_fraction == 1.0:
            self.train_partition_file = self.default_partition_file
        elif 0.0 < train_fraction < 1.0:
            self.train_partition_file = self.task_dir / f"{train_fraction:.2f}x_train_partition.json"
        else:
            raise ValueError(f"config key 'train_fraction' must be in (0, 1], got {train_fraction}")
        for path in {self.default_partition_file, self.train_partition_file}:
            if not path.is_file():
                key = "train_fraction" if path == self.train_partition_file else "task"
                raise FileNotFoundError(f"GEO-Bench partition file {path} is missing (config key '{key}')")

        self.ignore_index = ignore_index
        self.image_size = image_size
        self.normalization = normalization
        size = f"{image_size}px" if image_size else "native"
        scaling = hashlib.sha256(json.dumps([offset, scale]).encode()).hexdigest()[:12]
        # everything that changes the pixels a model sees, so a feature cache never serves another input
        self.dataset_key = f"geobench_{task}_{'+'.join(_slug(b or 'zero') for b in self.band_names)}_{size}_{normalization}-{scaling}"
        self.split_spec = SplitSpec(
            task_dir=self.task_dir,
            task_type=self.task_type,
            num_classes=self.num_classes,
            band_names=tuple(self.band_names),
            offset=tuple(offset),
            scale=tuple(scale),
            clip=normalization != "meanstd",
            image_size=image_size,
            ignore_index=ignore_index,
        )

    def build_split(self, split: Literal["train", "val", "test"]) -> GeoBenchSplit:
        """The checked dataset of one split (``val`` is GEO-Bench's ``valid``)."""
        name = LIGHTNING_TO_GEOBENCH_SPLIT[split]
        path = self.train_partition_file if split == "train" else self.default_partition_file
        partition = _read_json(path, "train_fraction" if split == "train" else "task")
        if not isinstance(partition, dict) or not isinstance(partition.get(name, []), list):
            raise ValueError(
                f"GEO-Bench partition file {path} does not map '{name}' to a list of sample names"
            )
        return GeoBenchSplit(self.split_spec, partition.get(name, []), name, path)

    def setup(self, stage: str) -> None:
        """Build (and check every file of) the splits the stage needs, once each."""
        if stage == "fit" and self.train_dataset is None:
            self.train_dataset = self.build_split("train")
        if stage in ("fit", "validate") and self.val_dataset is None:
            self.val_dataset = self.build_split("val")
        if stage in ("test", "predict") and self.test_dataset is None:
            self.test_dataset = self.build_split("test")
        if stage == "predict":
            self.predict_dataset = self.test_dataset
            if self.hparams.predict_split == "all":
                splits = [self.build_split("train"), self.build_split("val"), self.test_dataset]
                self.predict_dataset = ConcatDataset(splits)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches keeping the last partial one, so no split is too small to train (an empty split is
        refused at setup, naming the split and partition file)."""
        dataset = self._valid_attribute("train_dataset", "dataset")
        sampler = KeepLastBatchSampler(RandomSampler(dataset), self.batch_size, drop_last=False)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            persistent_workers=self.num_workers > 0,
        )

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Images are already normalised from band_stats.json; torchgeo's default aug would divide by 255."""
        return batch
