"""Training logs: history.csv, TensorBoard scalars (OUT/tensorboard) and the progress plot (OUT/progress.png)."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.fileio import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

HISTORY_CSV = "history.csv"
PROGRESS_PNG = "progress.png"
TENSORBOARD_DIR = "tensorboard"
TIMING_COLUMNS = ("seconds", "data_seconds", "step_seconds", "val_seconds")
_warned_no_tensorboard = False


def history_columns(classes: Sequence[int]) -> list[str]:
    """history.csv columns: per-class validation Dice ``val_dice_<c>``, the mean and its moving average
    (``val_ema_dice``, which picks the best epoch), the learning rate, the patches trained on (all ranks), the
    epoch's wall time (``seconds``: training and validation, not writing checkpoints and logs) with its parts
    waiting for data, in training steps and validating, and on CUDA the peak GPU memory allocated so far (MiB)."""
    return ["epoch", "train_loss", *[f"val_dice_{c}" for c in classes], "val_mean_dice", "val_ema_dice", "lr",
            "samples", *TIMING_COLUMNS, "gpu_memory_mb"]


def history_csv(history: Sequence[dict[str, Any]], classes: Sequence[int]) -> str:
    columns = history_columns(classes)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in history:
        value = row.get(key)
        if value is not None and isinstance(value, int | float) and math.isfinite(value):
            xs.append(int(row["epoch"]))
            ys.append(float(value))
    return xs, ys


def progress_png(history: Sequence[dict[str, Any]], classes: Sequence[int]) -> bytes:
    """Three panels over the epochs: training loss with validation Dice, learning rate, epoch time split."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 10), dpi=80)
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_time = fig.subplots(3, 1, sharex=True)
    ax_loss.plot(*_series(history, "train_loss"), color="tab:blue", label="train loss")
    ax_loss.set_ylabel("loss")
    ax_dice = ax_loss.twinx()
    for c in classes:
        ax_dice.plot(*_series(history, f"val_dice_{c}"), linestyle=":", linewidth=1, label=f"Dice {c}")
    ax_dice.plot(*_series(history, "val_mean_dice"), color="tab:green", label="mean Dice")
    ax_dice.plot(*_series(history, "val_ema_dice"), color="tab:red", label="mean Dice (EMA)")
    ax_dice.set_ylabel("validation Dice")
    ax_dice.set_ylim(0, 1)
    handles = ax_loss.get_legend_handles_labels()[0] + ax_dice.get_legend_handles_labels()[0]
    ax_loss.legend(handles=handles, loc="center right", fontsize="small")
    ax_lr.plot(*_series(history, "lr"), color="tab:purple")
    ax_lr.set_ylabel("learning rate")
    for key, color in zip(TIMING_COLUMNS, ("black", "tab:orange", "tab:blue", "tab:green"), strict=True):
        ax_time.plot(*_series(history, key), color=color, label=key.replace("_", " "))
    ax_time.set_ylabel("seconds per epoch")
    ax_time.set_xlabel("epoch")
    ax_time.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_time.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


class HistoryLogger:
    """Writes history.csv and progress.png (atomically, rewritten each epoch) and TensorBoard scalars.

    TensorBoard event files go to ``out/tensorboard`` when ``tensorboard`` is true and the package is
    installed (a warning once otherwise). ``start_epoch`` (the first epoch this run logs) discards events a
    killed run had logged for that epoch or later.
    """

    def __init__(self, out: Path, classes: Sequence[int], *, tensorboard: bool = True, plot: bool = True,
                 start_epoch: int = 1) -> None:
        self.out = Path(out)
        self.classes = list(classes)
        self.plot = plot
        self._writer = self._tensorboard(start_epoch) if tensorboard else None

    def _tensorboard(self, start_epoch: int) -> Any:
        global _warned_no_tensorboard
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if not _warned_no_tensorboard:
                log.warning("TensorBoard logs skipped: the 'tensorboard' package is not installed "
                            "(pip install tensorboard, or set train.tensorboard=false)")
                _warned_no_tensorboard = True
            return None
        return SummaryWriter(log_dir=str(self.out / TENSORBOARD_DIR), purge_step=start_epoch if start_epoch > 1
                             else None)

    def log(self, history: Sequence[dict[str, Any]]) -> None:
        """Record the last row of ``history`` (the whole history is rewritten to the CSV and the plot)."""
        write_text_atomic(self.out / HISTORY_CSV, history_csv(history, self.classes))
        if self._writer is not None and history:
            row = history[-1]
            epoch = int(row["epoch"])
            scalars = {"train/loss": row.get("train_loss"), "train/lr": row.get("lr"),
                       "val/mean_dice": row.get("val_mean_dice"), "val/ema_dice": row.get("val_ema_dice"),
                       **{f"val/dice_{c}": row.get(f"val_dice_{c}") for c in self.classes},
                       **{f"time/{k}": row.get(k) for k in TIMING_COLUMNS}, "gpu/memory_mb": row.get("gpu_memory_mb")}
            for tag, value in scalars.items():
                if value is not None:
                    self._writer.add_scalar(tag, float(value), epoch)
            self._writer.flush()
        if self.plot and history:
            write_bytes_atomic(self.out / PROGRESS_PNG, progress_png(history, self.classes))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
