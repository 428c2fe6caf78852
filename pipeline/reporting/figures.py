"""Report figures (Agg, PNG bytes): orthogonal slices with reference/prediction contours; per-class box plots."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from pipeline.errors import GeometryError  # noqa: E402
from pipeline.io import nib  # noqa: E402
from pipeline.io.volume import Volume  # noqa: E402

REFERENCE_COLOR = "#00ff00"  # pure green: never produced by the grey image
PREDICTION_COLOR = "#ff00ff"  # pure magenta
_DPI = 100


def to_ras(volume: Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The array reoriented to RAS axis order (nearest axes; no resampling) and its voxel sizes."""
    ornt = nib.orientations.io_orientation(volume.affine)
    array = nib.orientations.apply_orientation(np.asarray(volume.array), ornt)
    spacing = [0.0, 0.0, 0.0]
    for src_axis, (dst_axis, _) in enumerate(ornt):
        spacing[int(dst_axis)] = volume.spacing[src_axis]
    return np.ascontiguousarray(array), (spacing[0], spacing[1], spacing[2])


def best_slices(mask: np.ndarray | None, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Per axis, the slice holding most foreground (the first on ties); the centre when there is none."""
    if mask is None or not mask.any():
        return shape[0] // 2, shape[1] // 2, shape[2] // 2
    picks = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        picks.append(int(np.argmax(mask.sum(axis=others))))
    return picks[0], picks[1], picks[2]


def _plane(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D slice, transposed so that rows run along the second remaining axis (displayed upward)."""
    return np.take(array, index, axis=axis).T


def _window(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, [0.5, 99.5]) if image.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _contours(ax, labels: np.ndarray, color: str, width: float) -> None:  # noqa: ANN001 - matplotlib Axes
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = (labels == value).astype(np.float32)
        if 0 < mask.sum() < mask.size:
            ax.contour(mask, levels=[0.5], colors=[color], linewidths=width, antialiased=False)


def study_figure(
    *,
    image: Volume | None,
    reference: Volume | None,
    prediction: Volume | None,
    title: str = "",
) -> bytes:
    """PNG bytes: sagittal, coronal and axial slices through the reference structure.

    The image is grey (a black field when absent); reference contours are green and
    prediction contours magenta; the aspect ratio follows the voxel spacing. All given
    volumes must share one grid. Same inputs give byte-identical PNGs.
    """
    present = [v for v in (image, reference, prediction) if v is not None]
    if not present:
        raise GeometryError("a study figure needs at least one of image, reference or prediction")
    grid = present[0]
    for other in present[1:]:
        if not grid.same_grid(other):
            raise GeometryError("image, reference and prediction of a figure must share one grid")
    base_array, spacing = to_ras(image if image is not None else grid)
    base = base_array.astype(np.float32) if image is not None else np.zeros(base_array.shape, np.float32)
    ref = to_ras(reference)[0] if reference is not None else None
    pred = to_ras(prediction)[0] if prediction is not None else None
    focus = ref if ref is not None and ref.any() else pred
    picks = best_slices(None if focus is None else focus > 0, base.shape[:3])
    vmin, vmax = _window(base)
    # (axis cut, name, (horizontal spacing, vertical spacing))
    views = [(0, "sagittal", (spacing[1], spacing[2])), (1, "coronal", (spacing[0], spacing[2])),
             (2, "axial", (spacing[0], spacing[1]))]
    fig = Figure(figsize=(10.5, 4.2), dpi=_DPI)
    FigureCanvasAgg(fig)
    for i, (axis, name, (dx, dy)) in enumerate(views):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.imshow(_plane(base, axis, picks[axis]), cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                  aspect=dy / dx, interpolation="nearest")
        if ref is not None:
            _contours(ax, _plane(ref, axis, picks[axis]), REFERENCE_COLOR, 1.6)
        if pred is not None:
            _contours(ax, _plane(pred, axis, picks[axis]), PREDICTION_COLOR, 1.2)
        ax.set_title(f"{name} {picks[axis]}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([0], [0], color=REFERENCE_COLOR, lw=2, label="reference"),
               Line2D([0], [0], color=PREDICTION_COLOR, lw=2, label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.86, bottom=0.12, wspace=0.08)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white", metadata={"Software": None})
    return buffer.getvalue()


def box_plots(values: dict[str, dict[str, list[float]]], *, metrics: tuple[tuple[str, str], ...]) -> bytes | None:
    """PNG bytes: one panel per ``(metric, axis label)``, one box per class; ``values[class][metric]`` lists the
    studies' values (undefined ones, NaN, are left out). None when there is nothing to plot."""
    classes = list(values)
    data = {(c, m): np.asarray(values[c].get(m, []), dtype=np.float64) for c in classes for m, _ in metrics}
    data = {k: v[np.isfinite(v)] for k, v in data.items()}
    if not any(v.size for v in data.values()):
        return None
    fig = Figure(figsize=(3.2 * len(metrics), 3.4), dpi=_DPI)
    FigureCanvasAgg(fig)
    for i, (metric, label) in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        boxes = [(p, data[(c, metric)]) for p, c in enumerate(classes, start=1) if data[(c, metric)].size]
        if boxes:
            ax.boxplot([d for _, d in boxes], positions=[p for p, _ in boxes], widths=0.6, showmeans=True,
                       medianprops={"color": "#b00020"},
                       meanprops={"marker": "^", "markerfacecolor": "#1f77b4", "markeredgecolor": "#1f77b4"})
        ax.set_xticks(range(1, len(classes) + 1), [c[:14] for c in classes], fontsize=8,
                      rotation=30 if len(classes) > 3 else 0)
        ax.set_xlim(0.4, len(classes) + 0.6)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.88, bottom=0.2, wspace=0.35)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white", metadata={"Software": None})
    return buffer.getvalue()
