"""3D segmentation networks from MONAI, built by name from a NetworkConfig (or its model.json dict) and the plans."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from torch import nn

from pipeline.config import NetworkConfig
from pipeline.errors import ConfigError
from pipeline.registry import SEGMENTATION_NETWORKS

log = logging.getLogger(__name__)

MAX_DEEP_SUPERVISION_HEADS = 4
MAX_FILTERS = 320
SWIN_DIVISOR = 32


def network_topology(cfg: NetworkConfig, plans: dict[str, Any] | None) -> dict[str, list]:
    """Per-level ``kernel_sizes``, ``strides`` (level 0 has stride 1) and ``filters``: from ``cfg.channels`` /
    ``cfg.strides`` when given (isotropic strides, 3x3x3 kernels), else ``plans["network"]``, else planned from
    ``plans["patch_size"]`` and ``plans["target_spacing"]`` (:func:`pipeline.topology.network_topology`)."""
    if cfg.channels is not None or cfg.strides is not None:
        if cfg.channels is None or cfg.strides is None or len(cfg.channels) != len(cfg.strides) + 1:
            raise ConfigError(f"train.network: channels {cfg.channels} and strides {cfg.strides} must both be given, "
                              "with one more channel count than strides (or both null to use the plans' topology)")
        levels = len(cfg.channels)
        return {"kernel_sizes": [[3, 3, 3]] * levels,
                "strides": [[1, 1, 1]] + [[int(s)] * 3 for s in cfg.strides],
                "filters": [int(c) for c in cfg.channels]}
    if plans is None:
        raise ConfigError(f"network '{cfg.name}' takes its topology from plans.json: pass the plans, or set "
                          "train.network.channels and train.network.strides")
    topo = plans.get("network")
    if isinstance(topo, dict) and {"kernel_sizes", "strides", "filters"} <= set(topo):
        kernels, strides, filters = topo["kernel_sizes"], topo["strides"], topo["filters"]
        if not (len(kernels) == len(strides) == len(filters)) or len(strides) < 2:
            raise ConfigError("plans.json 'network': kernel_sizes, strides and filters need one entry per level "
                              f"(got {len(kernels)}, {len(strides)}, {len(filters)}); rerun preprocess or fix "
                              "the plans")
        return {"kernel_sizes": [_triple(k) for k in kernels], "strides": [_triple(s) for s in strides],
                "filters": [int(f) for f in filters]}
    if "patch_size" not in plans:
        raise ConfigError("plans.json has neither 'network' nor 'patch_size'; rerun 'medpipe preprocess'")
    from pipeline.topology import network_topology as plan_topology

    log.info("plans.json has no network topology; deriving one from the patch size %s", plans["patch_size"])
    spacing = plans.get("target_spacing") or [1.0, 1.0, 1.0]
    return plan_topology(plans["patch_size"], spacing, exact=True).as_dict()


def _triple(value: int | Sequence[int]) -> list[int]:
    return [int(value)] * 3 if isinstance(value, int | float) else [int(v) for v in value]


def _check_divisible(name: str, patch_size: Sequence[int] | None, strides: Sequence[Sequence[int]]) -> None:
    """The patch must divide by the total downsampling per axis, leaving more than one bottleneck voxel
    (instance normalisation needs two)."""
    if patch_size is None:
        return
    factor = [math.prod(int(s[a]) for s in strides) for a in range(3)]
    if any(int(p) % f for p, f in zip(patch_size, factor, strict=True)):
        raise ConfigError(f"network '{name}': patch size {list(patch_size)} is not divisible by the total "
                          f"downsampling {factor} of its strides; choose a patch size that is a multiple of it "
                          "(preprocess.patch_size) or fewer levels")
    if math.prod(int(p) // f for p, f in zip(patch_size, factor, strict=True)) < 2:
        raise ConfigError(f"network '{name}': patch size {list(patch_size)} leaves a single voxel after its "
                          f"downsampling {factor}; make one axis at least twice that (preprocess.patch_size)")


def _patch_size(plans: dict[str, Any] | None) -> list[int] | None:
    return [int(v) for v in plans["patch_size"]] if plans and plans.get("patch_size") else None


def deep_supervision_heads(cfg: NetworkConfig, levels: int) -> int:
    """How many extra (lower-resolution) outputs a DynUNet trains with.

    nnU-Net supervises every decoder level but gives the lowest-resolution one weight 0; here that head is not
    built at all, so ``levels - 3`` heads (capped at MAX_DEEP_SUPERVISION_HEADS). ``deep_supervision: true``
    asks for at least one head; ``false`` for none.
    """
    if cfg.deep_supervision is False:
        return 0
    heads = min(levels - 3, MAX_DEEP_SUPERVISION_HEADS)
    if cfg.deep_supervision:
        heads = max(heads, 1)
    return max(0, min(heads, levels - 2))


def _unet_layout(cfg: NetworkConfig, plans: dict[str, Any] | None) -> tuple[list[int], list[int]]:
    """MONAI UNet-style (channels, strides): the config's, or the plans' filters with each level's largest stride."""
    if cfg.channels is not None and cfg.strides is not None:
        return list(cfg.channels), list(cfg.strides)
    topo = network_topology(cfg, plans)
    return topo["filters"], [max(s) for s in topo["strides"][1:]]


def build_dynunet(cfg: NetworkConfig, *, in_channels: int, out_channels: int,
                  plans: dict[str, Any] | None = None) -> nn.Module:
    from monai.networks.nets import DynUNet

    topo = network_topology(cfg, plans)
    levels = len(topo["strides"])
    if levels < 3:
        raise ConfigError(f"network 'dynunet' needs at least 3 levels (2 strides), got {levels}; add a level to "
                          "train.network.channels/strides or use name 'unet'")
    _check_divisible("dynunet", _patch_size(plans), topo["strides"])
    heads = deep_supervision_heads(cfg, levels)
    return DynUNet(
        spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
        kernel_size=topo["kernel_sizes"], strides=topo["strides"], upsample_kernel_size=topo["strides"][1:],
        filters=topo["filters"], dropout=cfg.dropout or None,
        norm_name=("INSTANCE", {"affine": True}) if cfg.norm == "instance" else ("BATCH", {}),
        deep_supervision=heads > 0, deep_supr_num=max(heads, 1), res_block=cfg.res_block,
    )


def build_unet(cfg: NetworkConfig, *, in_channels: int, out_channels: int,
               plans: dict[str, Any] | None = None) -> nn.Module:
    from monai.networks.nets import UNet

    channels, strides = _unet_layout(cfg, plans)
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=channels,
                strides=strides, num_res_units=cfg.num_res_units, norm=cfg.norm, dropout=cfg.dropout)


def build_basic_unet(cfg: NetworkConfig, *, in_channels: int, out_channels: int,
                     plans: dict[str, Any] | None = None) -> nn.Module:
    from monai.networks.nets import BasicUNet

    if cfg.channels is not None:
        channels = list(cfg.channels)
    elif plans is not None:
        channels = list(network_topology(cfg, plans)["filters"])
    else:
        channels = [32, 32, 64, 128, 256]
    while len(channels) < 5:  # BasicUNet always has 5 levels
        channels.append(min(channels[-1] * 2, MAX_FILTERS))
    _check_divisible("basic_unet", _patch_size(plans), [[2, 2, 2]] * 4)
    return BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                     features=(*channels[:5], channels[0]), norm=cfg.norm, dropout=cfg.dropout)


def build_segresnet(cfg: NetworkConfig, *, in_channels: int, out_channels: int,
                    plans: dict[str, Any] | None = None) -> nn.Module:
    from monai.networks.nets import SegResNet

    init_filters = int(cfg.channels[0]) if cfg.channels else 16
    _check_divisible("segresnet", _patch_size(plans), [[2, 2, 2]] * 3)
    return SegResNet(spatial_dims=3, init_filters=init_filters, in_channels=in_channels, out_channels=out_channels,
                     dropout_prob=cfg.dropout or None, norm="INSTANCE" if cfg.norm == "instance" else "BATCH")


def build_attention_unet(cfg: NetworkConfig, *, in_channels: int, out_channels: int,
                         plans: dict[str, Any] | None = None) -> nn.Module:
    from monai.networks.nets import AttentionUnet

    channels, strides = _unet_layout(cfg, plans)
    return AttentionUnet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=channels,
                         strides=strides, dropout=cfg.dropout)


def build_swin_unetr(cfg: NetworkConfig, *, in_channels: int, out_channels: int,
                     plans: dict[str, Any] | None = None) -> nn.Module:
    try:
        import einops  # noqa: F401  (MONAI's SwinUNETR needs it at run time)
    except ImportError:
        raise ConfigError("network 'swin_unetr' needs the 'einops' package: pip install einops "
                          "(or choose another train.network.name)") from None
    from monai.networks.nets import SwinUNETR

    patch = _patch_size(plans)
    if patch is not None and (any(p % SWIN_DIVISOR for p in patch) or math.prod(p // SWIN_DIVISOR for p in patch) < 2):
        raise ConfigError(f"network 'swin_unetr' needs a patch size divisible by {SWIN_DIVISOR} on every axis and "
                          f"at least 64 on one (its bottleneck is 1/32 of the patch); got {patch}: set "
                          "preprocess.patch_size, e.g. [64, 64, 64]")
    feature_size = int(cfg.channels[0]) if cfg.channels else 24
    if feature_size % 12:
        raise ConfigError(f"network 'swin_unetr': feature size (train.network.channels[0]) {feature_size} must be a "
                          "multiple of 12, e.g. 24 or 48")
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                     norm_name="instance" if cfg.norm == "instance" else "batch", drop_rate=cfg.dropout,
                     spatial_dims=3)


def build_segmenter(cfg: NetworkConfig | dict[str, Any], *, in_channels: int, out_channels: int,
                    plans: dict[str, Any] | None = None) -> nn.Module:
    """Build the network named in ``cfg`` (a NetworkConfig, or the dict saved in model.json).

    ``plans`` (plans.json) supplies the topology when ``cfg.channels``/``cfg.strides`` are null and the patch
    size some networks check. In eval mode every network returns one logits tensor ``(B, K, X, Y, Z)``; a
    deep-supervised DynUNet in train mode returns ``(B, 1 + heads, K, X, Y, Z)`` (heads upsampled to full size).
    """
    if not isinstance(cfg, NetworkConfig):
        try:
            cfg = NetworkConfig.model_validate(cfg)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid network settings ({problems})") from None
    factory = SEGMENTATION_NETWORKS.get(cfg.name, where="train.network.name")
    return factory(cfg, in_channels=in_channels, out_channels=out_channels, plans=plans)
