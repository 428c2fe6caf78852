"""The classifier's faster paths give torch's and MONAI's numbers: the augmentation's sampling grid against
``F.affine_grid``, and the ResNet whose stem runs channels-last against MONAI's plain ResNet with the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks import nets

from pipeline.classification.data import affine_grid
from pipeline.classification.networks import build_classifier


@pytest.mark.parametrize("shape", [[3, 1, 7, 5, 6], [2, 2, 4, 9, 1], [3, 1, 9, 4], [2, 3, 1, 6]])
def test_the_sampling_grid_is_torchs(shape: list[int]) -> None:
    dims = len(shape) - 2
    theta = torch.randn(shape[0], dims, dims + 1, generator=torch.Generator().manual_seed(len(shape) + shape[2]))
    ours = affine_grid(theta, torch.Size(shape))
    reference = F.affine_grid(theta, shape, align_corners=False)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-6)


def test_the_channels_last_stem_computes_monais_resnet() -> None:
    kwargs = {"widen_factor": 0.25, "conv1_t_stride": 2}
    torch.manual_seed(0)
    ours = build_classifier("resnet10", spatial_dims=3, in_channels=2, num_classes=3, kwargs=kwargs)
    plain = nets.resnet10(spatial_dims=3, n_input_channels=2, num_classes=3, conv1_t_size=3, **kwargs)
    assert list(ours.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(ours.state_dict())
    layouts: list[bool] = []
    ours.maxpool.register_forward_hook(lambda _m, args, _out: layouts.append(
        args[0].is_contiguous(memory_format=torch.channels_last_3d)))
    ours.layer1.register_forward_pre_hook(lambda _m, args: layouts.append(args[0].is_contiguous()))
    x = torch.rand(4, 2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 1])
    for model in (ours, plain):
        model.train()
        F.cross_entropy(model(x), target).backward()
    assert layouts == [True, True]  # the stem ran channels-last; the residual layers get a contiguous map
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(ours.named_parameters(), plain.parameters(), strict=True):
        # float32 sums in another order; entries reach 10 here, and a bias before batch norm has none (noise only)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-3, msg=name)
    ours.eval(), plain.eval()
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-4, atol=1e-4)
