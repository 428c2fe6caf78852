"""Network topology, memory estimate and patch/batch planning against hand-derived values."""

from __future__ import annotations

import math

import pytest

from pipeline.topology import (
    MAX_DATASET_FRACTION,
    Topology,
    check_patch,
    estimate_training_memory_mb,
    fit_patch,
    initial_patch,
    network_topology,
    plan_patch_and_batch,
)


def test_isotropic_topology_by_hand() -> None:
    # 36 -> 18 -> 9 -> 5 (stop: 5 < 8); 50 -> 25 -> 13 -> 7; 35 -> 18 -> 9 -> 5: three poolings on every axis
    topo = network_topology([36, 50, 35], [1.0, 1.0, 1.0])
    assert topo.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert topo.kernel_sizes == ((3, 3, 3),) * 4
    assert topo.filters == (32, 64, 128, 256)
    assert topo.divisor == (8, 8, 8)
    assert fit_patch([36, 50, 35], topo) == [40, 56, 40]  # nnU-Net's hippocampus patch


def test_anisotropic_topology_waits_for_z() -> None:
    # 0.8 x 0.8 x 5 mm: z is 6.25x coarser, so x/y pool alone until their spacing (3.2) is within 2x of z's (5)
    topo = network_topology([128, 128, 24], [0.8, 0.8, 5.0])
    assert topo.strides == ((1, 1, 1), (2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 1))
    # level spacings: (0.8,0.8,5) (1.6,1.6,5) (3.2,3.2,5) (6.4,6.4,10) (12.8,12.8,20) (25.6,25.6,20)
    assert topo.kernel_sizes == ((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    assert topo.filters == (32, 64, 128, 256, 320, 320)
    assert topo.divisor == (32, 32, 4)
    check_patch([128, 128, 24], topo)
    with pytest.raises(ValueError, match="not divisible"):
        check_patch([128, 120, 24], topo)


def test_at_most_six_levels_and_min_feature_map() -> None:
    topo = network_topology([512, 512, 512], [1, 1, 1])
    assert topo.levels == 6 and topo.strides[-1] == (2, 2, 2)
    small = network_topology([8, 7, 16], [1, 1, 1])  # only axes of >= 8 voxels pool (8 -> 4)
    assert small.strides == ((1, 1, 1), (2, 1, 2), (1, 1, 2))
    # level 2 spacings (2, 1, 4): x is 2x the finest and not strided there -> kernel 1; z is strided -> 3
    assert small.kernel_sizes == ((3, 3, 3), (3, 3, 3), (1, 3, 3))


def test_exact_mode_keeps_a_given_patch() -> None:
    assert network_topology([24, 30, 20], [1, 1, 1], exact=True).strides == (
        (1, 1, 1), (2, 2, 2), (2, 1, 2))  # 24->12->6, 30->15 (odd: stops), 20->10->5
    topo = network_topology([24, 30, 20], [1, 1, 1], exact=True)
    check_patch([24, 30, 20], topo)
    assert Topology.from_dict(topo.as_dict()) == topo


def test_memory_is_monotonic_and_linear_in_batch() -> None:
    topo = network_topology([64, 64, 64], [1, 1, 1])
    one, two, four = (estimate_training_memory_mb([64, 64, 64], b, topo) for b in (1, 2, 4))
    assert one < two < four
    assert four - two == pytest.approx(2 * (two - one))
    assert estimate_training_memory_mb([64, 64, 48], 2, topo) < two
    assert estimate_training_memory_mb([64, 64, 64], 2, topo.as_dict(), num_classes=5) > two
    # magnitude: nnU-Net's 3d_fullres reference (128x160x112, batch 2, 6 levels, 4 channels) plans ~8 GB
    ref = network_topology([128, 160, 112], [1, 1, 1])
    assert 6000 < estimate_training_memory_mb([128, 160, 112], 2, ref, in_channels=4, num_classes=4) < 10000


def test_hippocampus_like_plan() -> None:
    # median 36x50x35 at 1 mm: the whole crop fits; 260 cases cap the batch at 5 % of the voxels (nnU-Net: 9)
    voxels = 260 * 36 * 50 * 35
    plan = plan_patch_and_batch(shape=[36, 50, 35], spacing=[1, 1, 1], budget_mb=8000, dataset_voxels=voxels,
                                num_classes=3)
    assert plan.patch_size == [40, 56, 40]
    assert plan.batch_size == 9 == plan.batch_cap == math.floor(0.05 * voxels / (40 * 56 * 40))
    assert plan.memory_mb <= 8000


def test_batch_respects_the_dataset_cap_and_the_budget() -> None:
    voxels = 40 * 64**3
    plan = plan_patch_and_batch(shape=[64, 64, 64], spacing=[1, 1, 1], budget_mb=50_000, dataset_voxels=voxels)
    assert plan.batch_size * math.prod(plan.patch_size) <= MAX_DATASET_FRACTION * voxels
    assert plan.batch_size == 2  # 5 % of 40 volumes = 2 patches
    huge = plan_patch_and_batch(shape=[64, 64, 64], spacing=[1, 1, 1], budget_mb=3000, dataset_voxels=1e12)
    assert estimate_training_memory_mb(huge.patch_size, huge.batch_size, huge.topology) <= 3000
    assert estimate_training_memory_mb(huge.patch_size, huge.batch_size + 1, huge.topology) > 3000
    tiny_dataset = plan_patch_and_batch(shape=[64, 64, 64], spacing=[1, 1, 1], budget_mb=8000, dataset_voxels=1000)
    assert tiny_dataset.batch_size == 2  # never below 2


def test_small_budget_shrinks_the_largest_axis_relative_to_the_median() -> None:
    big = plan_patch_and_batch(shape=[160, 160, 160], spacing=[1, 1, 1], budget_mb=100_000, dataset_voxels=1e12)
    assert big.patch_size == [160, 160, 160]
    small = plan_patch_and_batch(shape=[160, 160, 160], spacing=[1, 1, 1], budget_mb=2000, dataset_voxels=1e12)
    assert estimate_training_memory_mb(small.patch_size, 2, small.topology) <= 2000
    assert max(small.patch_size) - min(small.patch_size) <= 32  # shrunk evenly, one divisor step at a time
    assert all(p % d == 0 for p, d in zip(small.patch_size, small.topology.divisor, strict=True))
    # a long axis shrinks first: 96 x 96 x 320 median
    long = plan_patch_and_batch(shape=[96, 96, 320], spacing=[1, 1, 1], budget_mb=2000, dataset_voxels=1e12)
    assert long.patch_size == [48, 48, 160]  # starts at [96, 96, 256]; every axis ends at half its median


def test_initial_patch_follows_spacing() -> None:
    # equal millimetres per axis: 0.5 mm axes get twice the voxels of the 1 mm axis
    assert initial_patch([1000, 1000, 1000], [0.5, 0.5, 1.0]) == [323, 323, 161]
    assert initial_patch([36, 50, 35], [1, 1, 1]) == [36, 50, 35]


def test_given_patch_and_topology_are_kept() -> None:
    topo = network_topology([24, 24, 24], [1, 1, 1], exact=True)
    plan = plan_patch_and_batch(shape=[36, 50, 35], spacing=[1, 1, 1], budget_mb=8000, dataset_voxels=1e9,
                                patch_size=[24, 24, 24], batch_size=3)
    assert plan.patch_size == [24, 24, 24] and plan.topology == topo and plan.batch_size == 3
    fixed = Topology(kernel_sizes=((3, 3, 3),) * 3, strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)), filters=(8, 16, 32))
    rounded = plan_patch_and_batch(shape=[35, 50, 35], spacing=[1, 1, 1], budget_mb=8000, dataset_voxels=1e9,
                                   topology=fixed)
    assert rounded.topology == fixed and rounded.patch_size == [36, 52, 36]
