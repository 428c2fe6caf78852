"""A classifier on the encoder of a medpipe segmentation network: transfer from a segmentation model.

``classify.network: segmentation_encoder`` with ``classify.pretrained`` naming a medpipe
segmentation model folder (or its ``model.pt``): the network in that folder's model.json is
built, its decoder dropped, and a linear head ``fc`` put on the global average of the deepest
encoder features. The encoder modules keep the segmentation network's names, so
:func:`~pipeline.classification.networks.load_partial` copies the segmentation weights into them
and reports the decoder's tensors as unused. The architecture is recorded in
``network_kwargs["segmentation"]``, so the trained classifier rebuilds without that folder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.classification.pretrained_files import ENCODER_NETWORK as NAME
from pipeline.errors import ConfigError


def _unet_blocks(model: nn.Module) -> tuple[list[nn.Sequential], nn.Module]:
    """MONAI UNet's nesting: each level is Sequential(down, SkipConnection(next level), up); the last, the bottom."""
    from monai.networks.layers import SkipConnection

    levels, block = [], model
    while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
        levels.append(block)
        block = block[1].submodule
    return levels, block


def _encode_unet(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    levels, bottom = _unet_blocks(net.model)
    for level in levels:
        x = level[0](x)
    return bottom(x)


def _encode_dynunet(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.input_block(x)
    for down in net.downsamples:
        x = down(x)
    return net.bottleneck(x)


def _encode_basic_unet(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for name in ("conv_0", "down_1", "down_2", "down_3", "down_4"):
        x = getattr(net, name)(x)
    return x


def _encode_segresnet(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.convInit(x)
    for down in net.down_layers:
        x = down(x)
    return x


def _prune_unet(segmenter: nn.Module) -> dict[str, nn.Module]:
    levels, _ = _unet_blocks(segmenter.model)
    for level in levels:
        level[2] = nn.Identity()  # the up path: not part of the encoder
    return {"model": segmenter.model}


# segmentation network name -> (the encoder modules to keep, by attribute name; the encoder's forward)
_ENCODERS: dict[str, tuple[Callable[[nn.Module], dict[str, nn.Module]], Callable[[nn.Module, torch.Tensor],
                                                                                  torch.Tensor]]] = {
    "dynunet": (lambda s: {n: getattr(s, n) for n in ("input_block", "downsamples", "bottleneck")}, _encode_dynunet),
    "unet": (_prune_unet, _encode_unet),
    "basic_unet": (lambda s: {n: getattr(s, n) for n in ("conv_0", "down_1", "down_2", "down_3", "down_4")},
                   _encode_basic_unet),
    "segresnet": (lambda s: {n: getattr(s, n) for n in ("convInit", "down_layers")}, _encode_segresnet),
}


class SegmentationEncoderClassifier(nn.Module):
    """The encoder of a segmentation network (same module names), global average pooling and a linear head."""

    def __init__(self, segmenter: nn.Module, network: str, num_classes: int) -> None:
        super().__init__()
        keep, self._encode = _ENCODERS[network]
        modules = keep(segmenter)
        for name, module in modules.items():
            setattr(self, name, module)
        convs = [m for module in modules.values() for m in module.modules() if isinstance(m, nn.Conv3d)]
        self.fc = nn.Linear(convs[-1].out_channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest encoder features, averaged over space: (batch, channels)."""
        return self._encode(self, x).mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_segmentation_encoder(spatial_dims: int, in_channels: int, num_classes: int, *,
                               segmentation: dict[str, Any] | None = None) -> nn.Module:
    """The classifier for ``network_kwargs["segmentation"]`` (filled in from ``classify.pretrained`` by train)."""
    from pipeline.models.segmenters import build_segmenter

    if segmentation is None:
        raise ConfigError(f"classify.network '{NAME}' needs classify.pretrained: a medpipe segmentation model folder "
                          "(e.g. RUN/03_train/model) or its model.pt")
    if spatial_dims != 3:
        raise ConfigError(f"classify.network '{NAME}': segmentation networks are 3D; give classify.input_size 3 sizes")
    network = segmentation["network"]
    name = network.get("name") if isinstance(network, dict) else None
    if name not in _ENCODERS:
        raise ConfigError(f"classify.network '{NAME}': the segmentation network '{name}' is not supported; its "
                          f"encoder can be taken from {', '.join(sorted(_ENCODERS))}")
    segmenter = build_segmenter(network, in_channels=in_channels, out_channels=int(segmentation["out_channels"]),
                                plans=segmentation["plans"])
    return SegmentationEncoderClassifier(segmenter, name, num_classes)
