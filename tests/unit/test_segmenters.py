"""Segmentation networks by name: topology from the config or the plans, deep supervision, output shapes."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import NetworkConfig
from pipeline.errors import ConfigError
from pipeline.models.segmenters import build_segmenter, deep_supervision_heads, network_topology
from pipeline.registry import SEGMENTATION_NETWORKS

PLANS = {"num_classes": 3, "patch_size": [16, 16, 16], "target_spacing": [1.0, 1.0, 1.0],
         "network": {"kernel_sizes": [[3, 3, 3]] * 4, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]],
                     "filters": [4, 8, 16, 16]}}

# (name, network config, input spatial size); small filters so every forward takes milliseconds
CASES = [
    ("dynunet", {}, (16, 16, 16)),
    ("unet", {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}, (16, 16, 16)),
    ("basic_unet", {"channels": [4, 4, 8, 8, 16]}, (32, 16, 16)),
    ("segresnet", {"channels": [8]}, (16, 16, 16)),
    ("attention_unet", {"channels": [4, 8, 16], "strides": [2, 2]}, (16, 16, 16)),
    ("swin_unetr", {"channels": [12]}, (64, 32, 32)),
]


def test_every_network_is_registered() -> None:
    assert set(SEGMENTATION_NETWORKS.names()) >= {name for name, _, _ in CASES}
    assert NetworkConfig().name == "dynunet"


@pytest.mark.parametrize(("name", "options", "size"), CASES, ids=[c[0] for c in CASES])
def test_builds_and_runs_in_eval_and_train_mode(name: str, options: dict, size: tuple[int, int, int]) -> None:
    if name == "swin_unetr":
        pytest.importorskip("einops")
    torch.manual_seed(0)
    plans = {**PLANS, "patch_size": list(size)}
    net = build_segmenter({"name": name, **options}, in_channels=1, out_channels=3, plans=plans)
    batch = 1 if name == "swin_unetr" else 2  # SwinUNETR's backward takes ~10 s on the CPU: forward only
    x = torch.randn(batch, 1, *size)
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (batch, 3, *size)
    net.train()
    with torch.set_grad_enabled(name != "swin_unetr"):
        out = net(x)
    if name == "dynunet":  # the plans' 4 levels: one deep-supervision head (nnU-Net's levels - 3)
        assert out.shape == (batch, 2, 3, *size)
    else:
        assert out.shape == (batch, 3, *size)
    if name != "swin_unetr":
        out.float().mean().backward()
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_dynunet_takes_the_plans_topology() -> None:
    net = build_segmenter(NetworkConfig(), in_channels=1, out_channels=3, plans=PLANS)
    assert [list(s) if not isinstance(s, int) else s for s in net.strides] == PLANS["network"]["strides"]
    assert list(net.filters) == PLANS["network"]["filters"]
    assert net.deep_supervision and net.deep_supr_num == 1
    off = build_segmenter(NetworkConfig(deep_supervision=False), in_channels=1, out_channels=3, plans=PLANS)
    assert not off.deep_supervision and not hasattr(off, "deep_supervision_heads")
    off.train()
    assert off(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_dynunet_from_config_channels_and_strides() -> None:
    cfg = NetworkConfig(channels=(4, 8, 16), strides=(2, 2))
    topo = network_topology(cfg, None)
    assert topo["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]] and topo["filters"] == [4, 8, 16]
    net = build_segmenter(cfg, in_channels=1, out_channels=2)
    assert not net.deep_supervision  # 3 levels: levels - 3 = 0 heads
    net.train()
    assert net(torch.randn(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)
    forced = build_segmenter(cfg.model_copy(update={"deep_supervision": True}), in_channels=1, out_channels=2)
    assert forced.deep_supervision and forced.deep_supr_num == 1


@pytest.mark.parametrize(("levels", "setting", "heads"), [(3, None, 0), (4, None, 1), (6, None, 3), (9, None, 4),
                                                          (5, False, 0), (3, True, 1), (5, True, 2)])
def test_deep_supervision_head_count(levels: int, setting: bool | None, heads: int) -> None:
    assert deep_supervision_heads(NetworkConfig(deep_supervision=setting), levels) == heads


def test_unet_takes_filters_and_largest_stride_from_the_plans() -> None:
    net = build_segmenter({"name": "unet", "num_res_units": 0}, in_channels=1, out_channels=3, plans=PLANS)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)]
    assert sorted({m.out_channels for m in convs}) == [3, 4, 8, 16]
    net.eval()
    assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_topology_without_plans_network_is_planned_from_the_patch() -> None:
    plans = {"num_classes": 2, "patch_size": [32, 32, 16], "target_spacing": [1.0, 1.0, 1.0]}
    topo = network_topology(NetworkConfig(), plans)
    divisor = [1, 1, 1]
    for stride in topo["strides"]:
        divisor = [d * s for d, s in zip(divisor, stride, strict=True)]
    assert all(p % d == 0 for p, d in zip(plans["patch_size"], divisor, strict=True))
    assert topo["strides"][0] == [1, 1, 1] and len(topo["filters"]) == len(topo["strides"]) >= 3


@pytest.mark.parametrize(("cfg", "plans", "needle"), [
    (NetworkConfig(channels=(4, 8), strides=(2, 2)), None, "one more channel"),
    (NetworkConfig(), None, "pass the plans"),
    (NetworkConfig(channels=(4, 8), strides=(2,)), None, "at least 3 levels"),
    (NetworkConfig(), {**PLANS, "patch_size": [20, 16, 16]}, "not divisible"),
    (NetworkConfig(name="swin_unetr"), {**PLANS, "patch_size": [48, 64, 64]}, "divisible by 32"),
    (NetworkConfig(name="swin_unetr"), {**PLANS, "patch_size": [32, 32, 32]}, "at least 64"),
    (NetworkConfig(name="swin_unetr", channels=(16,)), {**PLANS, "patch_size": [64, 64, 64]}, "multiple of 12"),
])
def test_bad_settings_name_the_fix(cfg: NetworkConfig, plans: dict | None, needle: str) -> None:
    if cfg.name == "swin_unetr":
        pytest.importorskip("einops")
    with pytest.raises(ConfigError, match=needle):
        build_segmenter(cfg, in_channels=1, out_channels=3, plans=plans)


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="dynunet"):
        build_segmenter({"name": "dynunett"}, in_channels=1, out_channels=2)


def test_a_patch_collapsing_to_one_voxel_is_refused() -> None:
    with pytest.raises(ConfigError, match="single voxel"):
        build_segmenter({"name": "basic_unet"}, in_channels=1, out_channels=2, plans={**PLANS, "patch_size": [16] * 3})
