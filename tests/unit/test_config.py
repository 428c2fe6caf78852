"""Config loading: safe YAML, unknown/duplicate keys, did-you-mean, overrides, hashing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    PipelineConfig,
    apply_override,
    config_dict,
    config_hash,
    defaults_yaml,
    load_config,
    save_resolved,
    stage_config,
)
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_file_matches_the_models() -> None:
    """configs/defaults.yaml is the config reference; it must equal the models' defaults."""
    text = (REPO / "configs" / "defaults.yaml").read_text()
    regenerate = ("python -c 'from pipeline.config import defaults_yaml as d; print(d(), end=\"\")'"
                  " > configs/defaults.yaml")
    assert text == defaults_yaml(), f"regenerate it: {regenerate}"
    assert yaml.safe_load(text) == config_dict(PipelineConfig())


def test_every_shipped_config_validates() -> None:
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.name for p in paths} >= {"adrenal.yaml", "defaults.yaml", "hippocampus.yaml"}
    for path in paths:
        assert isinstance(load_config(path), PipelineConfig), path


def test_unknown_key_names_path_and_suggests(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "train.epoch" in message
    assert "Did you mean 'epochs'" in message
    assert str(path) in message


def test_unknown_section_suggests() -> None:
    with pytest.raises(ConfigError, match=r"preproces: unknown key\. Did you mean 'preprocess'"):
        load_config(None, overrides=["preproces.spacing=[1,1,1]"])


def test_duplicate_key_rejected_with_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\ntrain:\n  epochs: 2\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'epochs' at line 4 \(first given at line 3\)"):
        load_config(path)


def test_unsafe_yaml_tags_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_bad_value_reports_path() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(None, overrides=["train.batch_size=0"])
    with pytest.raises(ConfigError, match="Did you mean 'unet'"):
        load_config(None, overrides=["train.network.name=unte"])


def test_overrides_parse_yaml_values() -> None:
    config = load_config(None, overrides=["train.epochs=7", "preprocess.spacing=[1, 2, 3]", "train.amp=false"])
    assert config.train.epochs == 7
    assert config.preprocess.spacing == (1.0, 2.0, 3.0)
    assert config.train.amp is False


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_override({}, "train.epochs")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override({"seed": 1}, "seed.x=2")


def test_config_is_frozen() -> None:
    config = PipelineConfig()
    with pytest.raises(ValueError):
        config.seed = 3  # type: ignore[misc]


def test_hash_changes_with_content_only() -> None:
    a = load_config(None, overrides=["train.epochs=3"])
    b = load_config(None, overrides=["train.epochs=3"])
    c = load_config(None, overrides=["train.epochs=4"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert stage_config(a, "ingest") == stage_config(c, "ingest")
    assert stage_config(a, "train") != stage_config(c, "train")


def test_save_resolved_round_trips(tmp_path: Path) -> None:
    config = load_config(None, overrides=["name=x", "preprocess.patch_size=[16,16,16]"])  # default (public) key
    digest = save_resolved(config, tmp_path)
    text = (tmp_path / "config.yaml").read_text()
    assert digest in text.splitlines()[0]
    reloaded = load_config(tmp_path / "config.yaml")
    assert reloaded == config
    assert config_hash(reloaded) == digest


def test_resolved_config_text_is_pyyamls_safe_dump(tmp_path: Path) -> None:
    """save_resolved uses libyaml's emitter where PyYAML has it; the text must be what safe_dump writes."""
    import yaml

    from pipeline.config import config_dict

    config = load_config(None, overrides=["name=x", "train.epochs=7", "preprocess.patch_size=[16,24,32]"])
    digest = save_resolved(config, tmp_path)
    expected = f"# resolved medpipe config, hash {digest}\n" + yaml.safe_dump(config_dict(config), sort_keys=True)
    assert (tmp_path / "config.yaml").read_text() == expected


def test_orientation_validated() -> None:
    assert load_config(None, overrides=["preprocess.orientation=lps"]).preprocess.orientation == "LPS"
    with pytest.raises(ConfigError, match="orientation"):
        load_config(None, overrides=["preprocess.orientation=RRS"])


def test_private_pseudonym_key_never_saved(tmp_path: Path) -> None:
    secret = "hospital-secret-4711"
    a = load_config(None, overrides=[f"ingest.pseudonym_key={secret}"])
    b = load_config(None, overrides=["ingest.pseudonym_key=another-key"])
    assert a.ingest.pseudonym_key == secret  # the stages use the key itself
    save_resolved(a, tmp_path)
    text = (tmp_path / "config.yaml").read_text()
    assert secret not in text and "redacted-sha256:" in text
    assert config_hash(a) != config_hash(b)  # a new key still reruns ingest
    with pytest.raises(ConfigError, match="give the key itself"):
        load_config(tmp_path / "config.yaml")


def test_worker_count_does_not_invalidate_ingest() -> None:
    one = load_config(None, overrides=["ingest.workers=1"])
    two = load_config(None, overrides=["ingest.workers=2"])
    assert stage_config(one, "ingest") == stage_config(two, "ingest")
    assert stage_config(one, "ingest") != stage_config(load_config(None, overrides=["ingest.split_4d=true"]), "ingest")


@pytest.mark.parametrize("value", ['{T2: "*t2*"}', '{T2: "*t2*", ADC: " "}'])
def test_ingest_channels_need_two_named_globs(value: str) -> None:
    with pytest.raises(ConfigError, match=r"ingest\.channels.*two or more channels"):
        load_config(None, overrides=[f"ingest.channels={value}"])
    assert load_config(None, overrides=['ingest.channels={T2: "*t2*", ADC: "*adc*"}']).ingest.channels == {
        "T2": "*t2*", "ADC": "*adc*"}
