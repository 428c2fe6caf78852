"""The run folder layout: one numbered folder per stage under ``--out``, and the files each holds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGES: tuple[str, ...] = ("ingest", "preprocess", "train", "infer", "evaluate", "report")

# What every stage folder holds: its record (written last) and its resolved config (written first).
RECORD_NAME = "record.json"
CONFIG_NAME = "config.yaml"
CONFIG_HEADER = "# resolved medpipe config, hash "
"""The first line of the ``config.yaml`` a stage writes before it starts (then its hash)."""

# What an infer output folder holds: the index, the label images, the probability maps.
PREDICTIONS_JSON = "predictions.json"
PREDICTIONS_DIR = "predictions"
PROBABILITIES_DIR = "probabilities"


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run folder. Stages read upstream folders and write only their own."""

    root: Path

    def stage_dir(self, stage: str) -> Path:
        return self.root / f"{STAGES.index(stage) + 1:02d}_{stage}"

    @property
    def ingest(self) -> Path:
        return self.stage_dir("ingest")

    @property
    def preprocess(self) -> Path:
        return self.stage_dir("preprocess")

    @property
    def train(self) -> Path:
        return self.stage_dir("train")

    @property
    def model(self) -> Path:
        """The trained model folder that ``medpipe infer --model`` takes."""
        return self.train / "model"

    @property
    def infer(self) -> Path:
        return self.stage_dir("infer")

    @property
    def evaluate(self) -> Path:
        return self.stage_dir("evaluate")

    @property
    def report(self) -> Path:
        return self.stage_dir("report")
