"""Fold ensembling and mirroring test-time augmentation in the sliding-window predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import InferConfig
from pipeline.inference.ensemble import mirror_dims
from pipeline.inference.predictor import Predictor
from tests.unit.test_predictor import tiny_plans

PLANS = tiny_plans(spacing=None, normalization="none")  # patch 16^3, 3 classes
# 24 voxels with 16-voxel windows at overlap 0.5: windows start at 0 and 8, a layout symmetric under flips
SHAPE = (24, 24, 24)


def conv_net(seed: int) -> nn.Module:
    """A small random 3D CNN: not equivariant to flips."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 3, 3, padding=1)).eval()


class SymmetricConv(nn.Module):
    """A convolution whose kernels are symmetric under every flip: mirroring the input mirrors the output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        kernel = torch.randn(3, 1, 3, 3, 3)
        for dims in ((2,), (3,), (4,)):
            kernel = kernel + torch.flip(kernel, dims)
        self.register_buffer("kernel", kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv3d(x, self.kernel, padding=1)


def image(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(1, *SHAPE)).astype(np.float32))


def predictor(net: nn.Module | list[nn.Module], *, tta: bool, flip_axes=(0, 1, 2), overlap: float = 0.5) -> Predictor:
    return Predictor(net, PLANS, config=InferConfig(device="cpu", sw_batch_size=4, tta=tta, overlap=overlap),
                     flip_axes=flip_axes)


def test_mirror_dims() -> None:
    assert mirror_dims(()) == [()]
    assert mirror_dims((2, 0)) == [(), (2,), (4,), (2, 4)]
    assert len(mirror_dims((0, 1, 2))) == 8


def test_ensemble_equals_the_average_of_the_members_probabilities() -> None:
    a, b = conv_net(1), conv_net(2)
    x = image()
    for tta in (False, True):
        pa = predictor(a, tta=tta).probabilities(x)
        pb = predictor(b, tta=tta).probabilities(x)
        both = predictor([a, b], tta=tta).probabilities(x)
        np.testing.assert_allclose(both, (pa + pb) / 2, atol=1e-6)
        assert np.abs(pa - pb).max() > 0.05  # the members really differ
    np.testing.assert_allclose(both.sum(axis=0), 1.0, atol=1e-5)


def test_tta_of_a_flip_equivariant_network_changes_nothing() -> None:
    net, x = SymmetricConv(), image(1)
    plain = predictor(net, tta=False).probabilities(x)
    mirrored = predictor(net, tta=True).probabilities(x)
    np.testing.assert_allclose(mirrored, plain, atol=1e-5)
    assert predictor(net, tta=True).window.passes == 8


@pytest.mark.parametrize("axes", [(0,), (1, 2), (0, 1, 2)])
def test_tta_makes_the_prediction_mirror_with_its_input(axes: tuple[int, ...]) -> None:
    net, x = conv_net(3), image(2)
    dims = tuple(a + 1 for a in axes)  # (C, X, Y, Z) input, (K, X, Y, Z) output
    tta = predictor(net, tta=True, flip_axes=axes)
    np.testing.assert_allclose(tta.probabilities(torch.flip(x, dims)),
                               np.flip(tta.probabilities(x), dims), atol=1e-5)
    plain = predictor(net, tta=False)  # the network alone is not equivariant: the test can fail
    assert np.abs(plain.probabilities(torch.flip(x, dims)) - np.flip(plain.probabilities(x), dims)).max() > 1e-3


def test_no_mirroring_when_the_model_was_trained_without_it(caplog: pytest.LogCaptureFixture) -> None:
    net, x = conv_net(4), image(3)
    with caplog.at_level("INFO"):
        unmirrored = predictor(net, tta=True, flip_axes=())
    assert unmirrored.window.passes == 1 and "without mirroring" in caplog.text
    np.testing.assert_array_equal(unmirrored.probabilities(x), predictor(net, tta=False).probabilities(x))
