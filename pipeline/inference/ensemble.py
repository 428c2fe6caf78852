"""Per-window class probabilities averaged over models (fold ensemble) and mirrorings (test-time augmentation).

Each sliding window is run through every model, unmirrored and mirrored along every non-empty
subset of the model's training ``flip_axes`` (axes of the preprocessed array; tensor dims are
axis + 2 after batch and channel); each output is softmaxed, mirrored back and all are averaged
with equal weight. Averaging per window before the (linear) Gaussian blending is the same as
blending each pass separately and averaging afterwards, at the cost of one stitching pass.

The mirrored copies of a window batch go through the network together, as one larger batch
of at most ``MAX_BATCH_VOXELS`` voxels: on the CPU, PyTorch runs unstrided 3D convolutions of
small batches on a slow path (batch 1 of 32^3 costs ~4x per sample what batch 8 does).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import CheckpointError

MAX_BATCH_VOXELS = 8 * 48**3  # mirrored copies stacked into one forward pass up to this many voxels


def mirror_dims(flip_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """``[()]`` plus every non-empty subset of ``flip_axes`` as tensor dims (axis + 2), smallest first."""
    dims = tuple(sorted({int(a) + 2 for a in flip_axes}))
    return [combo for r in range(len(dims) + 1) for combo in itertools.combinations(dims, r)]


@dataclass(frozen=True)
class Member:
    """One model of the ensemble and the mirrorings it is averaged over (``[()]``: none)."""

    network: nn.Module
    mirrors: tuple[tuple[int, ...], ...] = ((),)


def _logits(network: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = network(batch)
    if isinstance(out, list | tuple):  # a network that still returns deep-supervision heads: full resolution first
        out = out[0]
    return out


class EnsembleWindow:
    """The sliding-window predictor: a window batch (B, C, x, y, z) -> averaged probabilities (B, K, x, y, z)."""

    def __init__(self, members: Sequence[Member]) -> None:
        if not members:
            raise CheckpointError("an ensemble needs at least one model", code="model_missing")
        self.members = list(members)

    @property
    def passes(self) -> int:
        """Forward passes per window."""
        return sum(len(m.mirrors) for m in self.members)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        size = batch.shape[0]
        stack = max(1, MAX_BATCH_VOXELS // max(1, size * batch[0, 0].numel()))  # mirrored copies per forward pass
        total = torch.zeros(())
        for member in self.members:
            mirrors = list(member.mirrors)
            for start in range(0, len(mirrors), stack):
                group = mirrors[start:start + stack]
                x = torch.cat([torch.flip(batch, dims) if dims else batch for dims in group])
                probs = torch.softmax(_logits(member.network, x).float(), dim=1)
                for i, dims in enumerate(group):
                    part = probs[i * size:(i + 1) * size]
                    part = torch.flip(part, dims) if dims else part
                    total = part if total.ndim == 0 else total + part
        return total / self.passes
