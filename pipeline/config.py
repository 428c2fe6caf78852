"""Pipeline configuration: safe YAML loading, typed validation, ``--set`` overrides, hashing.

The sections are defined in ``pipeline.config_sections`` and importable from here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config_sections import (
    DEFAULT_PSEUDONYM_KEY,
    AugmentationConfig,
    ClassifyConfig,
    DataConfig,
    EvaluateConfig,
    ExecutionConfig,
    InferConfig,
    IngestConfig,
    NetworkConfig,
    PreprocessConfig,
    ReportConfig,
    TrainConfig,
    _Section,
)
from pipeline.errors import ConfigError
from pipeline.fileio import canonical_json, sha256_bytes, write_text_atomic
from pipeline.layout import CONFIG_HEADER, CONFIG_NAME
from pipeline.registry import did_you_mean

__all__ = [
    "DEFAULT_PSEUDONYM_KEY", "AugmentationConfig", "ClassifyConfig", "DataConfig", "EvaluateConfig",
    "ExecutionConfig", "InferConfig", "IngestConfig", "NetworkConfig", "PipelineConfig", "PreprocessConfig",
    "ReportConfig", "TrainConfig", "apply_override", "config_dict", "config_hash", "defaults_yaml", "load_config",
    "parse_yaml", "save_resolved", "stage_config", "validate",
]


class PipelineConfig(_Section):
    """The whole run. Every section has defaults, so ``{}`` is a valid config."""

    name: str = "run"
    seed: int = 0
    data: DataConfig = DataConfig()
    ingest: IngestConfig = IngestConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    infer: InferConfig = InferConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()
    execution: ExecutionConfig = ExecutionConfig()
    task: Literal["segmentation", "classification"] = "segmentation"
    classify: ClassifyConfig = ClassifyConfig()


# ---- YAML ------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"duplicate key '{key}' at line {key_node.start_mark.line + 1} "
                f"(first given at line {seen[key] + 1}); keep one of them"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, *, source: str = "<config>") -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader derives from SafeLoader
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str) -> dict[str, Any]:
    """Apply one ``section.key=value`` override (value parsed as YAML) to a nested dict."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set '{override}': expected section.key=value, e.g. --set train.epochs=5")
    parts = key.strip().split(".")
    try:
        value = parse_yaml(f"v: {raw}" if raw.strip() else "v: null", source=f"--set {key}")["v"]
    except ConfigError as exc:  # "*.dcm" is a YAML alias, "a: b" a mapping: a string needs quotes
        raise ConfigError(f"{exc}\n(values are YAML; quote a string that YAML reads otherwise: "
                          f"--set '{key.strip()}=\"{raw.strip()}\"')") from None
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set '{override}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value
    return data


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        info = model.model_fields.get(str(part))
        annotation = getattr(info, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "<top>"
        if err["type"] == "extra_forbidden":
            fields = _fields_at(loc[:-1])
            hint = did_you_mean(str(loc[-1]), fields)
            lines.append(f"  {path}: unknown key.{hint} Allowed here: {', '.join(fields)}")
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"  {path}: {msg} (got {err.get('input')!r})")
    return "\n".join(lines)


def validate(data: dict[str, Any], *, source: str = "<config>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_config(path: str | Path | None = None, *, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load ``path`` (or the defaults when None), apply ``--set`` overrides, validate."""
    if path is None:
        data: dict[str, Any] = {}
        source = "<defaults>"
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
        data = parse_yaml(path.read_text(encoding="utf-8"), source=str(path))
        source = str(path)
    for override in overrides:
        data = apply_override(data, override)
    return validate(data, source=source)


def config_dict(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


def config_hash(config: BaseModel | dict[str, Any]) -> str:
    data = config if isinstance(config, dict) else config_dict(config)
    return sha256_bytes(canonical_json(data).encode())[:16]


STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "ingest": ("data", "ingest"),
    "preprocess": ("preprocess",),
    "train": ("seed", "train", "preprocess"),
    "infer": ("infer",),
    "evaluate": ("evaluate",),
    "report": ("name", "report"),
    "compare": ("evaluate",),
}


def stage_config(config: PipelineConfig, stage: str) -> dict[str, Any]:
    """The parts of the config that a stage's outputs depend on (its hash decides reruns)."""
    full = config_dict(config)
    section = {key: full[key] for key in STAGE_SECTIONS[stage]}
    if "ingest" in section:  # how many workers convert the studies does not change what they produce
        section["ingest"] = {k: v for k, v in section["ingest"].items() if k != "workers"}
    if "preprocess" in section:  # where the shared cache lives does not change a voxel
        section["preprocess"] = {k: v for k, v in section["preprocess"].items() if k != "cache_dir"}
    return section


def defaults_yaml() -> str:
    """The configuration reference (configs/defaults.yaml): every key with its default."""
    header = ("# medpipe configuration reference: every key with its default value.\n"
              "# A config file sets only what differs from these; unknown keys are rejected.\n")
    return header + yaml.safe_dump(config_dict(PipelineConfig()), sort_keys=False)


def save_resolved(config: PipelineConfig, folder: str | Path) -> str:
    """Write ``config.yaml`` (resolved, all defaults filled) and return the config hash."""
    digest = config_hash(config)
    # libyaml's emitter when PyYAML has it: the same text as safe_dump, ~8x faster, on every stage run
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    text = f"{CONFIG_HEADER}{digest}\n" + yaml.dump(config_dict(config), Dumper=dumper, sort_keys=True)
    write_text_atomic(Path(folder) / CONFIG_NAME, text)
    return digest
