"""The training loss: batch Dice + CE against MONAI and a hand computation; deep-supervision weighting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss as MonaiDiceCELoss

from pipeline.training.deep_supervision import (
    DeepSupervisionLoss,
    DiceCELoss,
    deep_supervision_weights,
    segmentation_loss,
)


def _example(seed: int = 0, batch: int = 2, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, 5, 4, 3, generator=g)
    target = torch.randint(0, classes, (batch, 1, 5, 4, 3), generator=g)
    return logits, target


def test_weights_halve_per_level_and_sum_to_one() -> None:
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert sum(deep_supervision_weights(5)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


def test_batch_dice_ce_by_hand() -> None:
    logits, target = _example()
    z = logits.numpy().astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = target.numpy()[:, 0]
    ce = -np.mean(np.log(np.take_along_axis(p, y[:, None], axis=1)))
    dices = []
    for c in (1, 2):  # background out of the Dice; sums over the batch and all voxels (batch Dice)
        tp = (p[:, c] * (y == c)).sum()
        fp = (p[:, c] * (y != c)).sum()
        fn = ((1 - p[:, c]) * (y == c)).sum()
        dices.append((2 * tp + 1e-5) / (2 * tp + fp + fn + 1e-5))
    expected = ce + 1 - np.mean(dices)
    assert float(DiceCELoss()(logits, target)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_matches_monai_dice_ce(batch_dice: bool) -> None:
    logits, target = _example(seed=3)
    ours = DiceCELoss(batch_dice=batch_dice)(logits, target)
    monai = MonaiDiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=batch_dice)(logits, target)
    assert float(ours) == pytest.approx(float(monai), rel=1e-5)


def test_deep_supervision_is_the_weighted_sum_of_the_heads() -> None:
    base = DiceCELoss()
    heads = [_example(seed=s)[0] for s in (1, 2, 3)]
    target = _example(seed=1)[1]
    stacked = torch.stack(heads, dim=1)  # (B, H, K, X, Y, Z), as DynUNet returns in train mode
    expected = 4 / 7 * base(heads[0], target) + 2 / 7 * base(heads[1], target) + 1 / 7 * base(heads[2], target)
    loss = DeepSupervisionLoss(base)
    assert float(loss(stacked, target)) == pytest.approx(float(expected), rel=1e-6)
    assert float(loss(heads, target)) == pytest.approx(float(expected), rel=1e-6)
    assert float(loss(heads[0], target)) == pytest.approx(float(base(heads[0], target)), rel=1e-6)


def test_gradient_flows_to_every_head() -> None:
    logits = torch.randn(2, 2, 3, 4, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 4, 4, 4))
    segmentation_loss()(logits, target).backward()
    assert logits.grad is not None and all(logits.grad[:, h].abs().sum() > 0 for h in range(2))


def test_a_perfect_prediction_has_only_the_small_ce_left() -> None:
    target = torch.randint(0, 3, (2, 1, 4, 4, 4))
    onehot = torch.zeros(2, 3, 4, 4, 4).scatter_(1, target, 1.0)
    loss = DiceCELoss()(onehot * 50.0, target)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
