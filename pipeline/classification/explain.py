"""Grad-CAM explanations: a class-activation map per study and a PNG of its most relevant slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.fileio import atomic_path


def target_layer(model: nn.Module, image: torch.Tensor, *, min_size: int = 4) -> str:
    """The Grad-CAM layer: the deepest ResNet stage (``layer4`` .. ``layer1``) or convolution whose output
    still has ``min_size`` voxels along every axis (a 1-voxel map explains nothing), else the largest."""
    names = dict(model.named_modules())
    stages = [n for n in ("layer4", "layer3", "layer2", "layer1") if n in names]
    candidates = stages or [k for k, m in reversed(list(names.items())) if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    sizes: dict[str, int] = {}
    hooks = [names[n].register_forward_hook(lambda _m, _i, o, n=n: sizes.__setitem__(n, min(o.shape[2:])))
             for n in candidates]
    try:
        with torch.no_grad():
            model.eval()(image[None].float())
    finally:
        for hook in hooks:
            hook.remove()
    for name in candidates:
        if sizes.get(name, 0) >= min_size:
            return name
    return max(candidates, key=lambda n: sizes.get(n, 0))


def gradcam_map(model: nn.Module, image: torch.Tensor, *, class_index: int, layer: str | None = None) -> np.ndarray:
    """Grad-CAM of ``class_index`` for one input (1, *spatial): a map in [0, 1] of the input's spatial shape."""
    from monai.visualize import GradCAM

    model.eval()
    cam = GradCAM(nn_module=model, target_layers=layer or target_layer(model, image))
    with torch.enable_grad():
        result = cam(x=image[None].float(), class_idx=int(class_index))
    return result[0, 0].detach().cpu().numpy().astype(np.float32)


def relevant_slices(cam: np.ndarray, count: int, image: np.ndarray | None = None) -> list[int]:
    """Indices of the ``count`` axial (last-axis) slices with the largest summed map, in slice order.

    Ties (a flat map, e.g. no positive evidence for the class) are broken by the image's content."""
    if cam.ndim == 2:
        return [0]
    scores = cam.reshape(-1, cam.shape[-1]).sum(axis=0).astype(np.float64)
    if image is not None:
        content = np.abs(image - np.median(image)).reshape(-1, image.shape[-1]).sum(axis=0)
        scores = scores + 1e-6 * content / max(float(content.max()), 1e-12)
    return sorted(int(i) for i in np.argsort(-scores, kind="stable")[:count])


def save_gradcam_png(image: np.ndarray, cam: np.ndarray, path: str | Path, *, count: int = 3,
                     title: str = "") -> Path:
    """PNG of the most relevant slices: the image in grey with the map over it (jet, semi-transparent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if image.ndim == 2:
        image, cam = image[..., None], cam[..., None]
    slices = relevant_slices(cam, count, image)
    fig, axes = plt.subplots(1, len(slices), figsize=(2.6 * len(slices), 2.9), dpi=80, squeeze=False)
    for ax, z in zip(axes[0], slices, strict=True):
        ax.imshow(image[:, :, z].T, cmap="gray", origin="lower")
        ax.imshow(cam[:, :, z].T, cmap="jet", alpha=0.4, vmin=0, vmax=1, origin="lower")
        ax.set_title(f"slice {z}", fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return path
