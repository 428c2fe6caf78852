"""The config sections (data, ingest, preprocess, train, infer, evaluate, report, classify, execution) as frozen
typed models that reject unknown keys; ``pipeline.config`` assembles them and loads YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from pipeline.fileio import sha256_bytes
from pipeline.limits import INGEST_MEMORY_LIMIT_MB
from pipeline.registry import CLASSIFICATION_NETWORKS, SEGMENTATION_NETWORKS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Where the scans are. Relative paths are taken from the current working directory.
    ``labels_csv``: a CSV giving each study a class label (columns ``study`` and ``label``,
    where ``study`` is the scan's path relative to ``root`` or its file stem; classification)."""

    root: Path | None = None
    split_file: Path | None = None
    labels_csv: Path | None = None


DEFAULT_PSEUDONYM_KEY = "medpipe"
_REDACTED = "redacted-sha256:"


class IngestConfig(_Section):
    """DICOM geometry policies: ``resample`` onto an orthogonal, regular grid (recorded as a problem)
    or ``refuse`` (the study fails with a code). ``split_4d`` writes each volume of a 4D DICOM series
    or 4D NIfTI image (fMRI, dynamics, repeats) as its own study, recorded as ``volume`` N of
    ``volumes`` in the manifest; a 4D NIfTI image (or enhanced multi-frame DICOM file) is read once for
    all its volumes, by one worker job (halved over idle workers for a long run) whose ``timeout_s``
    covers them all. Without it a 4D DICOM series is one 4D image with time last, and a 4D NIfTI
    image that no dataset.json declares as channels fails (``nifti_4d``).

    Each study is converted in a worker process that may map ``memory_limit_mb`` more address
    space than it starts with and take ``timeout_s`` seconds (``null``: no limit); a study
    declaring more than ``max_voxels`` voxels, or a deflated DICOM file inflating past a
    quarter of the memory limit, is refused before decoding. With ``workers`` above 1, the
    headers of a folder of many DICOM files are read by worker processes too, under the same
    limits (a file that breaks its reader fails alone). ``pseudonym_key`` keys the study
    ids and the tokens that replace path components holding patient data (names, IDs, dates,
    ... read from the headers); ``scrub_phi: false`` keeps paths and messages as they are, for
    data already de-identified. ``seg_label_pattern`` chooses the label among several DICOM SEGs
    of one series: a glob (``reader1*``), matched case-insensitively against each SEG's series
    description, file path and file name; the one SEG it matches is the label. ``rtstruct_rois``
    makes an RT structure set its series' label: the ROIs to convert, by name (globs,
    case-insensitive), the n-th becoming value n; where they overlap the later listed wins.
    ``rtstruct_label_pattern`` chooses among several structure sets of one series as
    ``seg_label_pattern`` does among SEGs, matched against each one's structure set label,
    series description, file path and file name. ``channels`` makes each DICOM study of several
    series one image of several channels: channel name -> a glob (any case) of the series'
    description or folder, in channel order (``{T2: "*t2*", ADC: "*adc*"}``); every channel must
    match exactly one series of the study, all in one Frame of Reference. A channel on another
    grid than the first is resampled onto it (trilinear), or, with ``channel_grid: refuse``, fails
    the study. ``philips_scaling: precise`` writes Philips MR series as Philips' floating-point values
    (FP = display value / (RescaleSlope x MR Scale Slope), the private (2005,100E) of each frame), as
    dcm2niix does by default, where a frame carries that slope; ``display`` (the default) keeps the
    DICOM rescale, as every other manufacturer's series."""

    workers: int = Field(1, ge=1)
    pseudonym_key: str = DEFAULT_PSEUDONYM_KEY

    @field_validator("pseudonym_key")
    @classmethod
    def _not_redacted(cls, value: str) -> str:
        if value.startswith(_REDACTED):
            raise ValueError("this is the digest a saved config keeps in place of the private key; "
                             "give the key itself (e.g. --set ingest.pseudonym_key=...)")
        return value
    gantry_tilt: Literal["resample", "refuse"] = "resample"
    irregular_slices: Literal["resample", "refuse"] = "refuse"
    philips_scaling: Literal["display", "precise"] = "display"
    split_4d: bool = False
    memory_limit_mb: int | None = Field(INGEST_MEMORY_LIMIT_MB, ge=256)
    timeout_s: float | None = Field(600.0, gt=0)
    max_voxels: int = Field(1 << 29, ge=1)
    scrub_phi: bool = True
    seg_label_pattern: str | None = Field(None, min_length=1)
    rtstruct_rois: list[str] | None = Field(None, min_length=1)
    rtstruct_label_pattern: str | None = Field(None, min_length=1)
    channels: dict[str, str] | None = None
    channel_grid: Literal["resample", "refuse"] = "resample"

    @field_validator("channels")
    @classmethod
    def _two_or_more(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (len(value) < 2 or not all(k.strip() and v.strip() for k, v in value.items())):
            raise ValueError("name two or more channels, each with a non-empty glob of its series' description or "
                             "folder, e.g. {T2: '*t2*', ADC: '*adc*'}")
        return value

    @field_validator("rtstruct_rois")
    @classmethod
    def _distinct_rois(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len({v.casefold() for v in value}) != len(value)
                                  or not all(v.strip() for v in value)):
            raise ValueError("list each ROI name once (names are compared without case), none empty")
        return value

    @field_serializer("pseudonym_key")
    def _redact_key(self, value: str) -> str:
        """Saved configs and records carry a digest of a private key, never the key itself."""
        if value == DEFAULT_PSEUDONYM_KEY or value.startswith(_REDACTED):
            return value
        return _REDACTED + sha256_bytes(value.encode())[:16]


class AugmentationConfig(_Section):
    """On-the-fly training augmentation (nnU-Net's set). ``flip_axes`` are the axes (of the plans'
    orientation) mirrored in training; mirroring test-time augmentation uses the same axes. A
    ``*_prob`` of 0 turns that augmentation off; ranges are (low, high) sampled uniformly."""

    enabled: bool = True
    flip_prob: float = Field(0.5, ge=0, le=1)
    flip_axes: tuple[int, ...] = (0, 1, 2)
    rotate_deg: float = Field(15.0, ge=0, le=180)
    rotate_prob: float = Field(0.2, ge=0, le=1)
    scale_range: float = Field(0.1, ge=0, lt=1)
    scale_prob: float = Field(0.2, ge=0, le=1)
    elastic_prob: float = Field(0.0, ge=0, le=1)
    elastic_sigma: tuple[float, float] = (9.0, 13.0)
    elastic_magnitude: tuple[float, float] = (0.0, 900.0)
    intensity_shift: float = Field(0.1, ge=0)
    intensity_scale: float = Field(0.1, ge=0)
    intensity_prob: float = Field(0.3, ge=0, le=1)
    noise_std: float = Field(0.05, ge=0)
    noise_prob: float = Field(0.15, ge=0, le=1)
    blur_prob: float = Field(0.2, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    contrast_prob: float = Field(0.15, ge=0, le=1)
    contrast_range: tuple[float, float] = (0.75, 1.25)
    gamma_prob: float = Field(0.3, ge=0, le=1)
    gamma_range: tuple[float, float] = (0.7, 1.5)
    lowres_prob: float = Field(0.25, ge=0, le=1)
    lowres_zoom: tuple[float, float] = (0.5, 1.0)

    @field_validator("flip_axes")
    @classmethod
    def _axes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(a not in (0, 1, 2) for a in value) or len(set(value)) != len(value):
            raise ValueError("flip_axes lists distinct spatial axes among 0, 1, 2")
        return tuple(sorted(value))

    @field_validator("elastic_sigma", "elastic_magnitude", "blur_sigma", "contrast_range", "gamma_range",
                     "lowres_zoom")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1] or value[0] < 0:
            raise ValueError("a range is (low, high) with 0 <= low <= high")
        return value


class PreprocessConfig(_Section):
    """Plans and preprocessing. ``null`` means planned from the dataset fingerprint: ``spacing``
    (median spacing; for anisotropic data the low-resolution axis gets its 10th percentile),
    ``patch_size`` (and ``train.batch_size``) from ``memory_budget_mb`` of estimated training
    memory. ``normalization: auto`` clips CT to the foreground 0.5-99.5 percentiles and z-scores
    with the foreground statistics; other modalities get a per-image z-score. ``zscore_nonzero``
    z-scores only the voxels that are not 0 and keeps the rest at 0 (nnU-Net's choice for
    skull-stripped MR such as BraTS, whose zero background would otherwise weigh in); with
    several channels it applies to each. ``cache_dir`` is a
    folder shared between runs holding preprocessed arrays keyed by content hash and settings.
    ``plans_file``: a plans.json edited by hand; its values replace the planned ones."""

    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = None
    normalization: Literal["auto", "zscore", "zscore_nonzero", "ct", "none"] = "auto"
    crop_foreground: bool = True
    patch_size: tuple[int, int, int] | None = None
    memory_budget_mb: float = Field(8000.0, gt=0)
    anisotropy_threshold: float = Field(3.0, gt=1)
    cache_dir: Path | None = None
    plans_file: Path | None = None
    augmentation: AugmentationConfig = AugmentationConfig()

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, value: str) -> str:
        value = value.upper()
        axes = sorted("LR AP IS".split().index(p) for c in value for p in ("LR", "AP", "IS") if c in p)
        if len(value) != 3 or axes != [0, 1, 2]:
            raise ValueError(f"'{value}' is not an orientation code; use three letters like RAS or LPS")
        return value

    @field_validator("spacing")
    @classmethod
    def _positive(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError("spacing values must be positive (mm)")
        return value

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and any(v < 4 for v in value):
            raise ValueError("patch sizes are at least 4 voxels per axis (or null to plan them)")
        return value


class NetworkConfig(_Section):
    """The segmentation network, by name. ``channels``/``strides`` ``null``: the plans' topology
    (levels and per-axis strides from the patch size, filters 32 doubling to 320).
    ``deep_supervision`` (dynunet only; ``null``: on where supported) adds a loss at each decoder level."""

    name: str = "dynunet"
    channels: tuple[int, ...] | None = None
    strides: tuple[int, ...] | None = None
    num_res_units: int = Field(2, ge=0)
    res_block: bool = False
    deep_supervision: bool | None = None
    dropout: float = Field(0.0, ge=0, lt=1)
    norm: Literal["instance", "batch"] = "instance"

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        return SEGMENTATION_NETWORKS.validate(value)


class TrainConfig(_Section):
    """Training. ``null`` values come from the plans (``batch_size``) or the optimiser
    (``learning_rate``: 0.01 for SGD, 1e-3 for AdamW); ``scheduler: auto`` is poly for SGD
    (nnU-Net's recipe) and cosine for AdamW. ``fold``: ``null`` trains one split held out by
    ``val_fraction`` (or ``data.split_file``); ``k`` trains fold k of ``num_folds`` into
    ``OUT/fold_k``; ``all`` trains every fold in turn. ``foreground_fraction`` of the patches
    are centred on a foreground voxel (the rest anywhere); ``sampling: classes`` centres them on
    each class equally instead. ``num_workers`` ``null``: chosen from the CPU count. On CUDA:
    ``amp``, ``channels_last`` and (optional) ``compile``."""

    network: NetworkConfig = NetworkConfig()
    epochs: int = Field(100, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1)
    samples_per_volume: int = Field(2, ge=1)
    learning_rate: float | None = Field(None, gt=0)
    weight_decay: float = Field(3e-5, ge=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    scheduler: Literal["auto", "poly", "cosine"] = "auto"
    sampling: Literal["foreground", "classes"] = "foreground"
    foreground_fraction: float = Field(0.33, ge=0, le=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    val_every: int = Field(1, ge=1)
    fold: int | Literal["all"] | None = None
    num_folds: int = Field(5, ge=2)
    num_workers: int | None = Field(None, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    tensorboard: bool = True
    threads: int | None = Field(None, ge=1)

    @field_validator("fold")
    @classmethod
    def _fold(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 0:
            raise ValueError("fold is a fold index 0..num_folds-1, 'all', or null")
        return value

    @model_validator(mode="after")
    def _fold_in_range(self) -> TrainConfig:
        if isinstance(self.fold, int) and self.fold >= self.num_folds:
            raise ValueError(f"fold {self.fold} does not exist with num_folds {self.num_folds}; "
                             f"use 0..{self.num_folds - 1} or 'all'")
        return self


class InferConfig(_Section):
    """Sliding-window inference (Gaussian-weighted windows overlapping by ``overlap``). ``tta``
    averages the mirrorings the model was trained with. A model folder with several folds is an
    ensemble (``folds``: which ones; ``null``: all). ``postprocess: auto`` keeps the largest
    connected component of the classes where cross-validation showed it helps (``none``:
    never; ``largest_component``: every class). ``save_probabilities`` also writes the class
    probability maps on each input's grid."""

    overlap: float = Field(0.5, ge=0, lt=1)
    sw_batch_size: int = Field(4, ge=1)
    mode: Literal["gaussian", "constant"] = "gaussian"
    tta: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    folds: tuple[int, ...] | None = None
    postprocess: Literal["auto", "none", "largest_component"] = "auto"
    save_probabilities: bool = False


class EvaluateConfig(_Section):
    """Segmentation metrics and cohort statistics. ``nsd_tolerance_mm`` is the normalised surface
    Dice tolerance: one value for every class, or a mapping from class value or class name to
    mm with an optional ``default`` for the others. ``bootstrap`` resamples (0: no confidence
    intervals) with ``bootstrap_seed`` give the ``confidence`` intervals of means and paired
    differences; ``worst_cases`` studies per class are listed in the summary and the report."""

    hd_percentile: float = Field(95.0, gt=0, le=100)
    nsd_tolerance_mm: float | dict[str, float] = 2.0
    bootstrap: int = Field(2000, ge=0)
    bootstrap_seed: int = 0
    confidence: float = Field(0.95, gt=0, lt=1)
    worst_cases: int = Field(5, ge=0)

    @field_validator("nsd_tolerance_mm", mode="before")
    @classmethod
    def _tolerance_keys(cls, value: Any) -> Any:
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("nsd_tolerance_mm")
    @classmethod
    def _tolerance_positive(cls, value: float | dict[str, float]) -> float | dict[str, float]:
        values = value.values() if isinstance(value, dict) else [value]
        if any(not (v > 0 and v < float("inf")) for v in values):
            raise ValueError("NSD tolerances must be positive, finite distances in mm")
        return value


class ReportConfig(_Section):
    title: str | None = None


class ClassifyConfig(_Section):
    """Classification (``task: classification``): a MONAI network by name trained with cross-entropy.

    Volumes are normalised (``normalization``) and resized to ``input_size`` (2 values: 2D, 3:
    3D); training refuses a size the network downsamples below what its layers need, naming one that
    works. ``balance``: ``weights`` (inverse-frequency class weights in the loss), ``sampler``
    (class-balanced sampling) or ``none``. ``pretrained`` is a local state-dict file (or a medpipe
    model folder) loaded partially; its layers stay frozen for ``freeze_epochs`` and then train at
    ``pretrained_lr_factor`` times ``learning_rate``. ``network: segmentation_encoder`` builds the
    encoder of the medpipe segmentation model that ``pretrained`` names, with a new head.
    ``operating_point`` is the positive-class probability threshold for sensitivity/specificity
    (binary tasks); ``temperature_scaling`` fits one temperature on the validation logits and
    ``calibration_bias`` one logit offset per class with it (bias-corrected temperature scaling:
    undoes the shift that class weights or balanced sampling put into the probabilities; the AUC of
    two classes is unchanged). ``fold``: as train.fold (k of ``num_folds``, stratified; ``all``:
    every fold, then the cross-validated metrics). ``seeds`` > 1 trains that many models on one
    split (seeds ``seed``, ``seed`` + 1, ...; ``max_minutes`` bounds each) and infers with the
    average of their calibrated probabilities (a seed ensemble)."""

    network: str = "resnet18"
    network_kwargs: dict[str, Any] = {}
    input_size: tuple[int, ...] = (32, 32, 32)
    normalization: Literal["minmax", "zscore", "none"] = "minmax"
    epochs: int = Field(30, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    balance: Literal["none", "weights", "sampler"] = "weights"
    augment: bool = True
    val_fraction: float = Field(0.2, gt=0, lt=1)
    pretrained: Path | None = None
    freeze_epochs: int = Field(0, ge=0)
    pretrained_lr_factor: float = Field(0.1, gt=0, le=1)
    temperature_scaling: bool = True
    calibration_bias: bool = True
    operating_point: float = Field(0.5, gt=0, lt=1)
    gradcam_slices: int = Field(3, ge=1)
    fold: int | Literal["all"] | None = None
    num_folds: int = Field(5, ge=2)
    seeds: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    threads: int | None = Field(None, ge=1)

    @field_validator("network")
    @classmethod
    def _known(cls, value: str) -> str:
        return CLASSIFICATION_NETWORKS.validate(value)

    @field_validator("input_size")
    @classmethod
    def _dims(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) not in (2, 3) or any(v < 4 for v in value):
            raise ValueError("input_size needs 2 (2D) or 3 (3D) sizes of at least 4 voxels")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ClassifyConfig:
        if self.seeds > 1 and self.fold is not None:
            raise ValueError("classify.seeds trains several models on one split and classify.fold cross-validates "
                             "(its folds are already an ensemble): set classify.seeds to 1 or classify.fold to null")
        if self.network == "segmentation_encoder":
            if self.pretrained is None and "segmentation" not in self.network_kwargs:
                raise ValueError("network 'segmentation_encoder' takes the encoder of a medpipe segmentation model: "
                                 "set classify.pretrained to its model folder (e.g. RUN/03_train/model)")
            if len(self.input_size) != 3:
                raise ValueError("network 'segmentation_encoder' is 3D (segmentation networks are); give "
                                 "classify.input_size 3 sizes")
        return self


class ExecutionConfig(_Section):
    """How per-study work runs; none of it changes an output byte, so it is in no stage's config hash.

    ``backend: local`` runs studies in this process or in ``workers`` local worker processes
    (infer; ingest has its own ``ingest.workers``); ``ray`` runs them as Ray tasks (actors for
    inference, each loading the model once) on the cluster at ``address`` (``null``: a local Ray
    started on demand) with the per-task resources below. A task whose worker is lost is retried
    ``max_retries`` times, then recorded as a failed study. ``shard: "i/n"`` (normally given
    with ``--shard``) processes only the studies whose id hashes to shard ``i`` of ``n``, into
    ``OUT/shard-i-of-n``; ``medpipe merge OUT`` assembles the shards. ``threads_per_worker``: torch
    intra-op threads of each worker (local worker process, Ray task or actor); ``null``: the CPUs
    shared out, floor(cpus / workers), at least 1 (Ray: ``num_cpus_per_task``); with one local
    worker (in-process) ``null`` leaves torch's default. ``chunk_size``: studies per Ray task or
    actor call; ``null``: sized from the measured study time so each takes about 0.2 s (failures
    and retries stay per study)."""

    backend: Literal["local", "ray"] = "local"
    address: str | None = None
    workers: int = Field(1, ge=1)
    num_cpus_per_task: float = Field(1.0, ge=0)
    num_gpus_per_task: float = Field(0.0, ge=0)
    memory_mb_per_task: int | None = Field(None, ge=1)
    max_retries: int = Field(2, ge=0)
    threads_per_worker: int | None = Field(None, ge=1)
    chunk_size: int | None = Field(None, ge=1)
    shard: str | None = None

    @field_validator("shard")
    @classmethod
    def _shard_form(cls, value: str | None) -> str | None:
        if value is None:
            return None
        index, sep, count = value.partition("/")
        if not (sep and index.strip().isdigit() and count.strip().isdigit()
                and 0 <= int(index) < int(count)):
            raise ValueError(f"'{value}' is not a shard; write i/n with 0 <= i < n, e.g. 0/4")
        return f"{int(index)}/{int(count)}"
