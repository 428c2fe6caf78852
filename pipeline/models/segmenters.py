"""3D segmentation networks from MONAI, built from a NetworkConfig (or its dict form in model.json)."""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.config import NetworkConfig
from pipeline.registry import SEGMENTATION_NETWORKS


def build_unet(cfg: NetworkConfig, *, in_channels: int, out_channels: int) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=cfg.channels,
        strides=cfg.strides,
        num_res_units=cfg.num_res_units,
        norm=cfg.norm,
        dropout=cfg.dropout,
    )


def build_basic_unet(cfg: NetworkConfig, *, in_channels: int, out_channels: int) -> nn.Module:
    from monai.networks.nets import BasicUNet

    features = (*cfg.channels[:5], cfg.channels[0]) if len(cfg.channels) >= 5 else (32, 32, 64, 128, 256, 32)
    return BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, features=features,
                     norm=cfg.norm, dropout=cfg.dropout)


def build_segmenter(cfg: NetworkConfig | dict[str, Any], *, in_channels: int, out_channels: int) -> nn.Module:
    """Build the network named in ``cfg`` (a NetworkConfig, or the dict saved in model.json)."""
    if not isinstance(cfg, NetworkConfig):
        cfg = NetworkConfig.model_validate(cfg)
    factory = SEGMENTATION_NETWORKS.get(cfg.name, where="train.network.name")
    return factory(cfg, in_channels=in_channels, out_channels=out_channels)
