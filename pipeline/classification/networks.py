"""Classification networks from MONAI by name, partial (transfer) weight loading and layer freezing."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import CheckpointError, ConfigError
from pipeline.registry import CLASSIFICATION_NETWORKS
from pipeline.training.checkpoints import load_checkpoint, load_weights

log = logging.getLogger(__name__)


def _resnet(depth: int, spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    from monai.networks import nets

    factory = {10: nets.resnet10, 18: nets.resnet18, 50: nets.resnet50}[depth]
    options: dict[str, Any] = {"conv1_t_size": 3, "conv1_t_stride": 1, "no_max_pool": False, **kwargs}
    model = factory(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=num_classes, **options)
    if isinstance(model.maxpool, nn.MaxPool3d):
        model.conv1.__class__ = _ChannelsLastConv3d  # same parameters and state-dict keys; only the layout changes
        model.maxpool.__class__ = _ContiguousMaxPool3d
    return model


class _ChannelsLastConv3d(nn.Conv3d):
    """The stem's convolution on a channels-last copy of its input, so that its output, batch norm, ReLU and max
    pool run channels-last. torch's CPU max pool of a 3D map is about ten times faster in that layout; the
    ResNet-10 classifier's training step (32 studies at 32^3) took 305 instead of 331 ms on a 2-core
    CPU (benchmarks/RESULTS.md). The values are the same: only the memory layout differs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last_3d))


class _ContiguousMaxPool3d(nn.MaxPool3d):
    """The stem's max pool, handing the residual layers a contiguous map (their convolutions are faster so)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).contiguous()


def build_resnet10(spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    return _resnet(10, spatial_dims, in_channels, num_classes, **kwargs)


def build_resnet18(spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    return _resnet(18, spatial_dims, in_channels, num_classes, **kwargs)


def build_resnet50(spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    return _resnet(50, spatial_dims, in_channels, num_classes, **kwargs)


def build_densenet121(spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, **kwargs)


def build_efficientnet_b0(spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    from monai.networks.nets import EfficientNetBN

    return EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=spatial_dims, in_channels=in_channels,
                          num_classes=num_classes, **kwargs)


def build_seresnet50(spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    from monai.networks.nets import SEResNet50

    return SEResNet50(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                      pretrained=False, **kwargs)


def build_classifier(name: str, *, spatial_dims: int, in_channels: int, num_classes: int,
                     kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The registered network ``name`` (ConfigError with a did-you-mean for unknown names)."""
    factory = CLASSIFICATION_NETWORKS.get(name, where="classify.network")
    return factory(spatial_dims, in_channels, num_classes, **(kwargs or {}))


def _runs_on(probe: nn.Module, shape: tuple[int, ...]) -> str | None:
    """None if a training-mode forward pass of ``probe`` (on the meta device) takes ``shape``, else why not."""
    try:
        probe(torch.empty(shape, device="meta"))
    except (ValueError, RuntimeError) as exc:  # norms on 1 voxel, pooling kernels larger than the map
        return str(exc).splitlines()[0]
    return None


def check_input_size(model: nn.Module, *, network: str, input_size: tuple[int, ...], in_channels: int) -> None:
    """ConfigError unless ``model`` trains on ``input_size`` volumes, before any epoch is spent.

    The pass runs on a meta-device copy: shapes only, no memory or arithmetic. A network whose
    downsampling leaves its deepest layers fewer voxels than they need (instance norm on one voxel,
    a pooling kernel larger than the map) is refused with the smallest uniform enlargement that works.
    """
    probe = copy.deepcopy(model).to("meta").train()
    why = _runs_on(probe, (2, in_channels, *input_size))
    if why is None:
        return
    fix = next((f"; it takes {list(bigger)} ({factor}x)" for factor in (2, 4, 8)
                if _runs_on(probe, (2, in_channels, *(bigger := tuple(s * factor for s in input_size)))) is None), "")
    raise ConfigError(f"classify.input_size {list(input_size)} is too small for classify.network '{network}': its "
                      f"downsampling leaves the deepest layers too few voxels ({why}). Give a larger "
                      f"classify.input_size{fix}, or a network that downsamples less")


# MONAI heads: the final layers whose shape depends on the number of classes
_HEAD_NAMES = ("fc", "class_layers", "_fc", "last_linear")


@dataclass
class LoadReport:
    """What a partial load did: keys copied, keys skipped for a shape mismatch, model keys left untouched."""

    source: str
    matched: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "matched": len(self.matched), "reshaped": self.reshaped,
                "missing": self.missing, "unexpected": len(self.unexpected)}


def _state_dict_from(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict, or the model weights of a medpipe training checkpoint (weights-only loading)."""
    try:
        return load_weights(path)
    except CheckpointError as exc:
        if exc.code != "checkpoint_incomplete":
            raise
        return load_checkpoint(path)["model"]


def _name_in(key: str, target: dict[str, torch.Tensor]) -> str:
    key = key.removeprefix("module.")
    bare = key.removeprefix("model.")
    return bare if key not in target and bare in target else key


def load_partial(model: nn.Module, path: str | Path) -> LoadReport:
    """Copy every tensor of ``path`` whose name and shape match ``model``; report the rest.

    The prefix ``module.`` (DataParallel) is stripped, and ``model.`` (a wrapper's attribute) where
    only the name without it is the model's. Keys whose shape differs (typically the classification head) are
    skipped and listed as ``reshaped``.
    """
    path = Path(path)
    target = model.state_dict()
    source = {_name_in(k, target): v for k, v in _state_dict_from(path).items()}
    report = LoadReport(source=path.name)
    update = {}
    for key, value in source.items():
        if key not in target:
            report.unexpected.append(key)
        elif tuple(target[key].shape) != tuple(value.shape):
            report.reshaped.append(key)
        else:
            update[key] = value
            report.matched.append(key)
    report.missing = [k for k in target if k not in update]
    model.load_state_dict({**target, **update})
    log.info("pretrained %s: %d tensors matched, %d skipped for shape (%s), %d model tensors not in the file, "
             "%d file tensors unused", path.name, len(report.matched), len(report.reshaped),
             ", ".join(report.reshaped[:4]), len(report.missing), len(report.unexpected))
    return report


def is_head(name: str) -> bool:
    """True for the classification head (always trained at the full rate, never frozen)."""
    return name.split(".")[0] in _HEAD_NAMES


def pretrained_parameters(model: nn.Module, matched: list[str]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters loaded from the pretrained file outside the head, the others) by name."""
    loaded = {k for k in matched if not is_head(k)}
    pre, new = [], []
    for name, param in model.named_parameters():
        (pre if name in loaded else new).append(param)
    return pre, new


def set_frozen(model: nn.Module, matched: list[str], frozen: bool) -> int:
    """Freeze (or unfreeze) the pretrained parameters outside the head; returns how many changed state."""
    loaded = {k for k in matched if not is_head(k)}
    count = 0
    for name, param in model.named_parameters():
        if name in loaded and param.requires_grad == frozen:
            param.requires_grad = not frozen
            count += 1
    return count
