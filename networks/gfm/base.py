"""The frozen-backbone side of the comparison probes: one base class, shared by every backbone family.

A foundation model is read like SatDiFuser's diffusion extractor (``DiFuserModule``'s ``extractor``): ``forward``
gives a 4-level pyramid, finest first, each level a list of one map (one "timestep"), with ``feature_channels``
and ``num_timesteps = 1``. The image is resized to the model's pretraining size, normalised per channel from the
datamodule's scale to the model's, and the selected layers' outputs are returned as maps. Everything is frozen
(no grad, always eval, never in the optimiser); the weights come from one local file in the layout of the file
torchgeo's (or the paper's) weight URL points at.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_KEY = "model.init_args.extractor.init_args.weights_path"
PYRAMID_LEVELS = 4


def load_state_dict_file(path: str) -> dict:
    """The tensors of a local weight file (``torch.load`` without code: ``weights_only``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weight file {path} does not exist (set config key {WEIGHTS_KEY})")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_strict(module: nn.Module, state_dict: dict, path: str, optional: Sequence[str] = ()) -> None:
    """Load ``state_dict`` into ``module``; keys in neither are an error naming them (``optional`` may be absent:
    the classifier parts a file of the encoder alone lacks)."""
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    missing = [key for key in missing if key not in set(optional)]
    if missing or unexpected:
        raise ValueError(
            f"weight file {path} ({WEIGHTS_KEY}) does not fit {type(module).__name__}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )


class FrozenBackboneExtractor(nn.Module, abc.ABC):
    """Resize, normalise, run the frozen backbone and return the selected layers as a one-timestep pyramid.

    Args:
        build: builds the network (the subclass, from its own typed arguments), under a CPU RNG seeded with
            ``seed``: the random weights (no ``weights_path``) are the same in every process and at ``test``.
        image_size: the model's pretraining input side; images are resized to it (bilinear, antialiased).
        layers: the 4 layer (ViT block or Swin stage) indices whose outputs form the pyramid, shallowest first.
        mean, std: per input channel, in the datamodule's units: the backbone sees ``(image - mean) / std``.
        weights_path: local weight file; None keeps random weights (tests, tiny configs).
        seed: seed of the random initialisation.
    """

    num_timesteps = 1

    def __init__(
        self,
        build: Callable[[], nn.Module],
        image_size: int,
        layers: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        weights_path: str | None,
        seed: int,
    ):
        super().__init__()
        if len(layers) != PYRAMID_LEVELS:
            raise ValueError(f"config key layers must name {PYRAMID_LEVELS} layers, got {list(layers)}")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"config keys mean/std need one value per band and positive std: {mean}, {std}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.backbone = build()
        self.image_size = image_size
        self.layers = [int(layer) for layer in layers]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[:, None, None], persistent=False)
        if weights_path is not None:
            self.load_weights(weights_path)
        self.requires_grad_(False)
        self.eval()
        self.feature_channels = [[channels] for channels in self.layer_channels()]

    @abc.abstractmethod
    def load_weights(self, path: str) -> None:
        """Load the weight file (its published layout) strictly into the backbone."""

    @abc.abstractmethod
    def layer_channels(self) -> list[int]:
        """Channels of each selected layer's map."""

    @abc.abstractmethod
    def layer_maps(self, x: Tensor) -> list[Tensor]:
        """The selected layers' outputs as ``(B, C, h, w)`` maps for a normalised, resized batch."""

    def train(self, mode: bool = True) -> FrozenBackboneExtractor:
        """Always eval: frozen normalisation statistics and no dropout, whatever the trainer asks."""
        return super().train(False)

    def forward(self, image: Tensor) -> list[list[Tensor]]:
        if image.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"{type(self).__name__} expects {self.mean.shape[0]} bands (config keys mean/std and "
                f"data.init_args.bands), got {image.shape[1]}"
            )
        if tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            image = F.interpolate(
                image, size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True
            )
        with torch.no_grad():
            maps = self.layer_maps((image - self.mean) / self.std)
        return [[m] for m in maps]


def tokens_to_map(tokens: Tensor, grid: int) -> Tensor:
    """``(B, prefix + grid², C)`` tokens -> ``(B, C, grid, grid)``, dropping the prefix (class) tokens."""
    patches = tokens[:, tokens.shape[1] - grid * grid :]
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, grid, grid)


class BlockCapture:
    """Forward hooks that keep the outputs of chosen blocks of a ModuleList during one forward."""

    def __init__(self, blocks: nn.ModuleList, indices: Sequence[int]):
        if max(indices) >= len(blocks) or min(indices) < 0:
            raise ValueError(f"config key layers {list(indices)} outside the backbone's {len(blocks)} blocks")
        self.blocks, self.indices = blocks, list(indices)
        self.outputs: dict[int, Tensor] = {}

    def __enter__(self) -> dict[int, Tensor]:
        self.outputs = {}
        self.handles = [
            self.blocks[i].register_forward_hook(lambda m, a, out, i=i: self.outputs.__setitem__(i, out))
            for i in self.indices
        ]
        return self.outputs

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
