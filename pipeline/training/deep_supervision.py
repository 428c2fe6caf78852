"""The segmentation loss: Dice + CE with nnU-Net's batch Dice (global under DDP) and deep-supervision weights.

Choices (documented here because they change results):

- Dice is nnU-Net's *batch* Dice: true/false positives and false negatives are summed over the whole batch
  and all voxels before the ratio, per foreground class (background excluded from the Dice, included in the
  cross-entropy), smoothing 1e-5, averaged over classes. Under DistributedDataParallel the sums are gathered
  from every rank (with gradients) so the loss, and the averaged gradient, equal those of the full batch on
  one device. Cross-entropy is the mean over voxels. Loss = CE + (1 - Dice), as MONAI's ``DiceCELoss``.
- Deep supervision follows MONAI's DynUNet: the lower-resolution heads are upsampled (nearest) to the full
  patch and compared with the full-resolution target (nnU-Net downsamples the targets instead). Head ``i``
  (0 = full resolution) weighs ``1 / 2**i``, normalised to sum 1. nnU-Net also gives its lowest-resolution
  head weight 0; our networks do not build that head (see ``pipeline.models.segmenters``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

SMOOTH = 1e-5


def deep_supervision_weights(outputs: int) -> list[float]:
    """Weights ``1/2**i`` for ``outputs`` outputs (full resolution first), normalised to sum 1."""
    if outputs < 1:
        raise ValueError("deep supervision needs at least one output")
    raw = [1.0 / 2**i for i in range(outputs)]
    total = sum(raw)
    return [w / total for w in raw]


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DiceCELoss(nn.Module):
    """``CE + (1 - soft Dice)`` on logits ``(B, K, ...)`` and integer targets ``(B, 1, ...)`` or ``(B, ...)``.

    ``batch_dice`` sums over the batch before the ratio (nnU-Net); otherwise Dice per sample, then the mean.
    ``include_background`` adds class 0 to the Dice. Under DDP, batch Dice is computed over the global batch.
    """

    def __init__(self, *, batch_dice: bool = True, include_background: bool = False, smooth: float = SMOOTH,
                 ddp_sync: bool = True) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.include_background = include_background
        self.smooth = smooth
        self.ddp_sync = ddp_sync

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if target.dim() == logits.dim():
            target = target[:, 0]
        target = target.long()
        ce = F.cross_entropy(logits, target)
        probs = torch.softmax(logits, dim=1)
        onehot = torch.zeros_like(probs).scatter_(1, target.unsqueeze(1), 1.0)
        if not self.include_background:
            probs, onehot = probs[:, 1:], onehot[:, 1:]
        axes: Sequence[int] = (0, *range(2, probs.dim())) if self.batch_dice else tuple(range(2, probs.dim()))
        tp = (probs * onehot).sum(dim=axes)
        pred = probs.sum(dim=axes)
        truth = onehot.sum(dim=axes)
        if self.batch_dice and self.ddp_sync and _distributed():
            tp, pred, truth = _AllGatherWithGrad.apply(torch.stack([tp, pred, truth])).sum(0)
        dice = (2 * tp + self.smooth) / (pred + truth + self.smooth)
        return ce + (1.0 - dice.mean())


class DeepSupervisionLoss(nn.Module):
    """Apply ``loss`` to every output of a deep-supervised network and combine them with
    :func:`deep_supervision_weights`; a plain ``(B, K, ...)`` output gets ``loss`` alone.

    Deep-supervised outputs are stacked as ``(B, H, K, ...)`` (MONAI DynUNet in train mode), every head at the
    target's resolution, or given as a list of ``(B, K, ...)``. The target keeps its channel axis: ``(B, 1, ...)``.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, output: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, torch.Tensor):
            if output.dim() == target.dim():  # (B, K, ...) vs (B, 1, ...)
                return self.loss(output, target)
            heads = list(torch.unbind(output, dim=1))
        else:
            heads = list(output)
        weights = deep_supervision_weights(len(heads))
        total = weights[0] * self.loss(heads[0], target)
        for weight, head in zip(weights[1:], heads[1:], strict=True):
            total = total + weight * self.loss(head, target)
        return total


def segmentation_loss() -> DeepSupervisionLoss:
    """The training loss: deep-supervision-weighted batch Dice + CE (background out of the Dice)."""
    return DeepSupervisionLoss(DiceCELoss(batch_dice=True, include_background=False))
