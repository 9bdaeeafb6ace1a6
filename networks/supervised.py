"""SatDiFuser's fully supervised references, trained end to end: a timm ConvNeXt and an smp UNet.

Both are built as ``network(in_channels, num_classes)`` (``lightning_modules.supervised.SupervisedModule``) and map
an image ``(B, C, H, W)`` to logits: ``(B, K)`` for the classifier, ``(B, K, H, W)`` for the segmenter. Weights are
random unless a LOCAL file is given; nothing is downloaded (timm's ``pretrained_cfg`` is pointed at the file, smp
is always built with ``encoder_weights=None``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch
from segmentation_models_pytorch.encoders._utils import patch_first_conv
from torch import Tensor, nn

from metrics.geobench import TaskType

RGB_CHANNELS = 3


def existing_file(path: str, key: str) -> str:
    """``path`` when it is a file, else one error line naming the config key to set."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} not found: set config key '{key}' to a local file")
    return path


class ConvNeXtClassifier(nn.Module):
    """A timm ConvNeXt with ``in_channels`` inputs and ``num_classes`` logits.

    Args:
        in_channels, num_classes: given by the module (the datamodule's band and class counts).
        model_name: a timm ConvNeXt (``convnext_atto`` ... ``convnext_xxlarge``); the input must be at least 32 px
            (four stride-2 stages after the stride-4 stem).
        weights_path: local checkpoint of ``model_name`` (timm or the original release's layout); timm adapts
            the stem to ``in_channels`` (its ``adapt_input_conv``: RGB weights repeated and rescaled) and drops the
            classifier when the class count differs. None: random initialisation.
        drop_path_rate: stochastic depth rate.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        model_name: str = "convnext_base",
        weights_path: str | None = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        pretrained = {}
        if weights_path is not None:
            key = "model.init_args.network.init_args.weights_path"
            overlay = {"file": existing_file(weights_path, key), "source": ""}
            pretrained = {"pretrained": True, "pretrained_cfg_overlay": overlay}
        self.model = timm.create_model(
            model_name,
            in_chans=in_channels,
            num_classes=num_classes,
            drop_path_rate=drop_path_rate,
            **pretrained,
        )

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image)


class UNetSegmenter(nn.Module):
    """An smp UNet with ``in_channels`` inputs and ``num_classes`` logit maps at the input's size.

    smp 0.6's UNet decoder resizes every stage to its skip connection's size, so images of any size (GEO-Bench's
    256, 320, 400, 500 px) run at their native size without padding or resizing.

    Args:
        in_channels, num_classes: given by the module (the datamodule's band and class counts).
        encoder_name: an smp encoder (``resnet50``, ``resnet18``...) or a timm-universal one (``tu-<timm name>``).
        encoder_depth: encoder stages (3-5).
        decoder_channels: one width per decoder stage; None: smp's (256, 128, 64, 32, 16), cut to the depth.
        encoder_weights_path: local state dict of the smp encoder (``model.encoder.state_dict()``'s layout; for
            the resnets torchvision's ResNet keys, ``fc`` ignored) for 3-band inputs; smp adapts the first conv to
            ``in_channels`` (its ``patch_first_conv``: RGB weights cycled and rescaled). None: random.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        encoder_name: str = "resnet50",
        encoder_depth: int = 5,
        decoder_channels: list[int] | None = None,
        encoder_weights_path: str | None = None,
    ):
        super().__init__()
        if decoder_channels is None:
            decoder_channels = [256, 128, 64, 32, 16][:encoder_depth]
        pretrained = encoder_weights_path is not None
        self.model = smp.Unet(
            encoder_name=encoder_name,
            encoder_depth=encoder_depth,
            encoder_weights=None,  # smp would download named weights; a local file is loaded below
            decoder_channels=decoder_channels,
            in_channels=RGB_CHANNELS if pretrained else in_channels,
            classes=num_classes,
        )
        if pretrained:
            key = "model.init_args.network.init_args.encoder_weights_path"
            path = existing_file(encoder_weights_path, key)
            encoder = self.model.encoder
            encoder.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            if in_channels != RGB_CHANNELS:
                if hasattr(encoder, "set_in_channels"):
                    encoder.set_in_channels(in_channels, pretrained=True)
                else:
                    patch_first_conv(encoder, new_in_channels=in_channels, pretrained=True)

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image)


class PerTaskNetwork(nn.Module):
    """The network of the task's type: one config for classification and segmentation tasks (SatDiFuser's
    "fully supervised" row is a ConvNeXt on the ones, a UNet on the others).

    Args:
        in_channels, num_classes, task_type: given by the module (``task_type`` from the datamodule).
        classification: builds the network of classification and multi-label tasks as
            ``classification(in_channels, num_classes)``.
        segmentation: builds the network of segmentation tasks likewise.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        classification: Callable[[int, int], nn.Module],
        segmentation: Callable[[int, int], nn.Module],
        task_type: TaskType | None = None,
    ):
        super().__init__()
        if task_type is None:
            raise ValueError(
                "PerTaskNetwork needs the task type (given by SupervisedModule from the datamodule)"
            )
        build = segmentation if task_type == "segmentation" else classification
        self.network = build(in_channels, num_classes)

    def forward(self, image: Tensor) -> Tensor:
        return self.network(image)
