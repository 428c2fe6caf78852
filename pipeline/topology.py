"""Network topology from patch size and spacing, the training-memory estimate, and patch/batch planning."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MIN_FEATURE_MAP = 4  # voxels per axis at the coarsest level
MAX_POOLINGS = 5  # at most 6 levels
ANISOTROPY_RATIO = 2.0  # an axis this many times coarser than the finest is neither pooled nor given a 3-kernel
BASE_FILTERS = 32
MAX_FILTERS = 320
MIN_BATCH = 2
MAX_DATASET_FRACTION = 0.05  # one batch covers at most this share of the dataset's voxels
INITIAL_PATCH_VOXELS = 256**3

# Memory heuristic (see estimate_training_memory_mb). Measured on this CPU (fp32, DynUNet with instance
# norm and deep supervision, SGD step): 12-13 float32 tensors per feature-map element at 40x56x40 (4 levels),
# 64^3 and 96^3 (5 levels); 10 puts nnU-Net's 8 GB reference (patch 128x160x112, batch 2, 6 levels,
# filters 32..320, CUDA with AMP) at ~8.6 GB while fp32 CPU runs land within ~15 % of their measured peak.
ACTIVATIONS_PER_FEATURE = 10
BYTES_PER_VALUE = 4
STATE_COPIES = 4  # weights, gradients and up to two optimiser moments
OVERHEAD_MB = 64.0


@dataclass(frozen=True)
class Topology:
    """A U-Net (DynUNet) layout: per level, the conv kernel, the stride into that level and the filters."""

    kernel_sizes: tuple[tuple[int, int, int], ...]
    strides: tuple[tuple[int, int, int], ...]
    filters: tuple[int, ...]

    @property
    def levels(self) -> int:
        return len(self.strides)

    @property
    def divisor(self) -> tuple[int, int, int]:
        """What each patch axis must be divisible by: the product of the strides along it."""
        out = [1, 1, 1]
        for stride in self.strides:
            out = [o * s for o, s in zip(out, stride, strict=True)]
        return out[0], out[1], out[2]

    def as_dict(self) -> dict[str, Any]:
        return {"kernel_sizes": [list(k) for k in self.kernel_sizes], "strides": [list(s) for s in self.strides],
                "filters": list(self.filters)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Topology:
        return cls(kernel_sizes=tuple(_triple(k) for k in data["kernel_sizes"]),
                   strides=tuple(_triple(s) for s in data["strides"]),
                   filters=tuple(int(f) for f in data["filters"]))


def _triple(values: Sequence[Any]) -> tuple[int, int, int]:
    return int(values[0]), int(values[1]), int(values[2])


def level_filters(levels: int, *, base: int = BASE_FILTERS, cap: int = MAX_FILTERS) -> tuple[int, ...]:
    """``base`` filters at full resolution, doubling per level, capped at ``cap``."""
    return tuple(min(base * 2**i, cap) for i in range(levels))


def _kernel(spacing: Sequence[float], stride: Sequence[int]) -> tuple[int, int, int]:
    finest = min(spacing)
    k = [3 if spacing[a] < ANISOTROPY_RATIO * finest or stride[a] > 1 else 1 for a in range(3)]
    return k[0], k[1], k[2]


def network_topology(patch_size: Sequence[int], spacing: Sequence[float], *, exact: bool = False) -> Topology:
    """The levels of a U-Net for ``patch_size`` voxels at ``spacing`` mm (nnU-Net's idea, our rules).

    Level 0 has stride 1. Each further level halves (stride 2) every axis that (a) is still at
    least ``2 * MIN_FEATURE_MAP`` voxels, so the halved map keeps at least 4, and (b) has a
    spacing less than ``ANISOTROPY_RATIO`` (2) times the finest spacing among the axes passing
    (a); coarse (anisotropic) axes thus wait until the others have caught up. The spacing of a
    halved axis doubles. Levels stop when no axis can be halved or after ``MAX_POOLINGS`` (6
    levels). The kernel of a level is 3 along axes within 2x of that level's finest spacing and
    along strided axes, 1 along much coarser ones (no mixing across thick slices). Filters: 32
    doubling per level, capped at 320. ``exact``: halve only even sizes, so the patch itself is
    divisible by :attr:`Topology.divisor` (for a patch given by the user); otherwise sizes round
    up and :func:`fit_patch` pads the patch to the divisor.
    """
    size = [float(s) for s in patch_size]
    current = [float(s) for s in spacing]
    strides: list[tuple[int, int, int]] = [(1, 1, 1)]
    kernels: list[tuple[int, int, int]] = [_kernel(current, (1, 1, 1))]
    while len(strides) <= MAX_POOLINGS:
        large = [a for a in range(3) if size[a] >= 2 * MIN_FEATURE_MAP and (not exact or size[a] % 2 == 0)]
        if not large:
            break
        finest = min(current[a] for a in large)
        axes = [a for a in large if current[a] < ANISOTROPY_RATIO * finest]
        stride = tuple(2 if a in axes else 1 for a in range(3))
        for a in axes:
            size[a] = math.ceil(size[a] / 2)
            current[a] *= 2
        strides.append(stride)  # type: ignore[arg-type]
        kernels.append(_kernel(current, stride))
    return Topology(kernel_sizes=tuple(kernels), strides=tuple(strides), filters=level_filters(len(strides)))


def fit_patch(patch_size: Sequence[int], topology: Topology) -> list[int]:
    """``patch_size`` rounded up on each axis to a multiple of the topology's divisor."""
    return [int(math.ceil(p / d) * d) for p, d in zip(patch_size, topology.divisor, strict=True)]


def check_patch(patch_size: Sequence[int], topology: Topology) -> None:
    """Raise ValueError when the patch is not divisible by the product of the strides per axis."""
    bad = [a for a, (p, d) in enumerate(zip(patch_size, topology.divisor, strict=True)) if int(p) % d]
    if bad:
        raise ValueError(f"patch size {list(patch_size)} is not divisible by the network's strides "
                         f"(per-axis products {list(topology.divisor)}) along axis {bad}")


def _parameters(topology: Topology, in_channels: int, num_classes: int) -> int:
    total, previous = 0, in_channels
    last = topology.levels - 1
    for level, (kernel, f) in enumerate(zip(topology.kernel_sizes, topology.filters, strict=True)):
        k = math.prod(kernel)
        total += k * (previous * f + f * f)  # encoder: two convolutions
        if level < last:
            up, f_next = math.prod(topology.strides[level + 1]), topology.filters[level + 1]
            total += up * f_next * f + k * (2 * f * f + f * f) + f * num_classes  # decoder + output head
        previous = f
    return total


def estimate_training_memory_mb(
    patch_size: Sequence[int],
    batch_size: int,
    topology: Topology | dict[str, Any],
    *,
    in_channels: int = 1,
    num_classes: int = 2,
) -> float:
    """Estimated peak memory (MB) of one training step of the topology's DynUNet.

    Heuristic: activations = batch x sum over levels of (feature-map voxels x filters) x
    ``ACTIVATIONS_PER_FEATURE`` (10: the convolution, norm and activation outputs of encoder
    and decoder kept for the backward pass, plus gradients in flight) x 4 bytes, plus the input,
    logits and deep-supervision heads at full resolution; state = parameters x 4 bytes x 4
    (weights, gradients, optimiser moments); plus a fixed 64 MB. Calibrated against measured
    peaks (see the constants above): fp32 CPU steps within ~15 %, nnU-Net's 8 GB CUDA/AMP
    reference within ~10 %. Linear in ``batch_size``.
    """
    topo = topology if isinstance(topology, Topology) else Topology.from_dict(topology)
    size = [int(s) for s in patch_size]
    features = 0
    for stride, f in zip(topo.strides, topo.filters, strict=True):
        size = [math.ceil(s / st) for s, st in zip(size, stride, strict=True)]
        features += math.prod(size) * f
    full = math.prod(int(s) for s in patch_size)
    heads = max(topo.levels - 2, 1)
    per_sample = (features * ACTIVATIONS_PER_FEATURE + full * (in_channels + 2 * num_classes * heads)) * BYTES_PER_VALUE
    state = _parameters(topo, in_channels, num_classes) * BYTES_PER_VALUE * STATE_COPIES
    return (int(batch_size) * per_sample + state) / 2**20 + OVERHEAD_MB


@dataclass(frozen=True)
class PatchPlan:
    """The planned patch, batch and topology, with the memory they are estimated to need."""

    patch_size: list[int]
    batch_size: int
    topology: Topology
    memory_mb: float
    batch_cap: int  # the largest batch covering at most 5 % of the dataset's voxels


def initial_patch(shape: Sequence[float], spacing: Sequence[float]) -> list[int]:
    """A patch covering equal millimetres on each axis, of 256^3 voxels, clipped to ``shape``."""
    inverse = [1.0 / s for s in spacing]
    scale = (INITIAL_PATCH_VOXELS / math.prod(inverse)) ** (1 / 3)
    return [max(min(int(round(i * scale)), int(round(s))), MIN_FEATURE_MAP)
            for i, s in zip(inverse, shape, strict=True)]


def plan_patch_and_batch(
    *,
    shape: Sequence[float],
    spacing: Sequence[float],
    budget_mb: float,
    dataset_voxels: float,
    in_channels: int = 1,
    num_classes: int = 2,
    patch_size: Sequence[int] | None = None,
    topology: Topology | None = None,
    batch_size: int | None = None,
) -> PatchPlan:
    """Patch, batch and topology for a dataset whose resampled median shape is ``shape``.

    A given ``patch_size`` is kept (topology from it with ``exact=True``); otherwise the patch
    starts at :func:`initial_patch` and, while a batch of 2 is estimated to need more than
    ``budget_mb``, the axis largest relative to ``shape`` shrinks by its stride divisor (the
    topology is replanned each time). A given ``topology`` is kept and the planned patch is
    rounded up to its divisor. The batch is the most that fit the budget, at most the number of
    patches making up 5 % of ``dataset_voxels``, at least 2 (a given ``batch_size`` wins).
    """
    def memory(p: Sequence[int], topo: Topology, batch: int) -> float:
        return estimate_training_memory_mb(p, batch, topo, in_channels=in_channels, num_classes=num_classes)

    if patch_size is not None:
        patch = [int(p) for p in patch_size]
        topo = topology or network_topology(patch, spacing, exact=True)
    else:
        patch = initial_patch(shape, spacing)
        seen: set[tuple[int, ...]] = set()
        while True:
            topo = topology or network_topology(patch, spacing)
            patch = fit_patch(patch, topo)
            if memory(patch, topo, MIN_BATCH) <= budget_mb or tuple(patch) in seen:
                break
            seen.add(tuple(patch))
            divisor = topo.divisor
            shrinkable = [a for a in range(3) if patch[a] - divisor[a] >= MIN_FEATURE_MAP]
            if not shrinkable:
                log.warning("planning: even patch %s needs %.0f MB for a batch of %d, over the %.0f MB budget",
                            patch, memory(patch, topo, MIN_BATCH), MIN_BATCH, budget_mb)
                break
            axis = max(shrinkable, key=lambda a: (patch[a] / max(float(shape[a]), 1.0), -a))
            patch[axis] -= divisor[axis]
    fixed, per_sample = memory(patch, topo, 0), memory(patch, topo, 1) - memory(patch, topo, 0)
    fits = int((budget_mb - fixed) // per_sample) if per_sample > 0 else MIN_BATCH
    cap = int(MAX_DATASET_FRACTION * float(dataset_voxels) // math.prod(patch))
    batch = int(batch_size) if batch_size is not None else max(MIN_BATCH, min(fits, cap))
    return PatchPlan(patch_size=patch, batch_size=batch, topology=topo, memory_mb=round(memory(patch, topo, batch), 1),
                     batch_cap=cap)
