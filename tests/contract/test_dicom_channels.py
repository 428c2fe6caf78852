"""``ingest.channels``: the series of one DICOM study (T2 and ADC of a prostate MR) as one image of several channels.

References: each series ingested alone (the first channel must equal it voxel for voxel), and, for a channel
on a coarser grid, an ADC map whose values are a linear function of the position, which trilinear
resampling reproduces exactly at the first channel's voxel centres.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.io.nifti import load_nifti
from pipeline.manifest import load_manifest
from pipeline.stages.ingest import ingest
from tests.fixtures.dicom_writer import write_series

CHANNELS = 'ingest.channels={T2: "*t2*", ADC: "*adc*"}'
SHAPE = (8, 6, 5)  # columns, rows, slices


def _linear(lps: np.ndarray) -> np.ndarray:
    """The ADC map: whole numbers at the coarse grid's voxels (integer positions), linear everywhere."""
    return 3 * lps[..., 0] + 2 * lps[..., 1] + lps[..., 2] + 100


def _series(folder: Path, stored: np.ndarray, *, study: str, frame: str, description: str, **grid: object) -> None:
    def identify(ds, _k: int) -> None:
        ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.SeriesDescription = study, frame, description

    write_series(folder, stored, series_tag=str(folder), edit=identify, **grid)  # type: ignore[arg-type]


def _adc_coarse() -> np.ndarray:
    """Stored values of an ADC series on a grid of 2 x 2 x 4 mm from (-4, -4, -4) mm (LPS), covering the T2's."""
    c, r, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    lps = np.stack([-4 + 2.0 * c, -4 + 2.0 * r, -4 + 4.0 * k], axis=-1)
    return _linear(lps).astype(np.int16)


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("channels") / "scan"
    rng = np.random.default_rng(3)
    t2 = {"origin": (0.0, 0.0, 0.0), "pixel_spacing": (1.0, 1.0), "step": 2.0}

    def t2_values() -> np.ndarray:
        return rng.integers(0, 900, SHAPE).astype(np.int16)

    _series(root / "A/t2", t2_values(), study="1.2.3.1", frame="1.2.3.11", description="Ax T2 TSE", **t2)
    _series(root / "A/adc", _adc_coarse(), study="1.2.3.1", frame="1.2.3.11", description="ep2d_diff ADC",
            origin=(-4.0, -4.0, -4.0), pixel_spacing=(2.0, 2.0), step=4.0)
    _series(root / "B/t2", t2_values(), study="1.2.3.2", frame="1.2.3.21", description="Ax T2 TSE", **t2)
    _series(root / "B/adc", t2_values(), study="1.2.3.2", frame="1.2.3.21", description="ep2d_diff ADC", **t2)
    _series(root / "B/other", t2_values(), study="1.2.3.2", frame="1.2.3.21", description="Survey", **t2)
    _series(root / "C/t2", t2_values(), study="1.2.3.3", frame="1.2.3.31", description="Ax T2 TSE", **t2)
    _series(root / "D/t2", t2_values(), study="1.2.3.4", frame="1.2.3.41", description="Ax T2 TSE", **t2)
    _series(root / "D/adc", t2_values(), study="1.2.3.4", frame="1.2.3.42", description="ep2d_diff ADC", **t2)
    return root


@pytest.fixture(scope="module")
def alone(scan: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Every series ingested on its own, by folder."""
    out = tmp_path_factory.mktemp("alone")
    ingest(scan, out)
    return {s.source: load_nifti(out / str(s.image)) for s in load_manifest(out).studies}


def test_the_series_of_a_study_become_its_channels(scan: Path, alone: dict, tmp_path: Path) -> None:
    record = ingest(scan, tmp_path / "out", config=load_config(None, overrides=[CHANNELS]))
    manifest = load_manifest(tmp_path / "out")
    assert manifest.channels == ["T2", "ADC"]
    by_source = {s.source: s for s in manifest.studies}
    assert set(by_source) == {"A/t2", "B/t2", "B/other", "C/t2", "D/t2", "D/adc"}  # A/adc and B/adc are channels
    assert record["counts"] == {"ok": 2, "failed": 3, "skipped": 1}

    a = load_nifti(tmp_path / "out" / str(by_source["A/t2"].image), allow_4d=True)
    first = alone["A/t2"]
    assert a.array.shape == (*first.spatial_shape, 2) and np.allclose(a.affine, first.affine, atol=1e-6)
    np.testing.assert_array_equal(a.array[..., 0], first.array)
    index = np.stack(np.meshgrid(*(np.arange(n) for n in first.spatial_shape), indexing="ij"), axis=-1)
    ras = index @ first.affine[:3, :3].T + first.affine[:3, 3]
    np.testing.assert_allclose(a.array[..., 1], _linear(ras * [-1, -1, 1]), atol=1e-3)
    (resampled,) = [p for p in by_source["A/t2"].problems if p.code == "channel_resampled"]
    assert resampled.message.startswith("A/adc: resampled (trilinear) onto the grid of A/t2, the first channel: "
                                        "spacing [2.0, 2.0, 4.0] -> [1.0, 1.0, 2.0] mm")

    b = load_nifti(tmp_path / "out" / str(by_source["B/t2"].image), allow_4d=True)
    np.testing.assert_array_equal(b.array, np.stack([alone["B/t2"].array, alone["B/adc"].array], axis=-1))
    assert not [p for p in by_source["B/t2"].problems if p.code == "channel_resampled"]
    assert by_source["B/other"].status == "skipped" and by_source["B/other"].problems[0].code == \
        "dicom_not_a_channel"

    (missing,) = [by_source["C/t2"].error]
    assert missing.code == "dicom_channels" and "channel ADC matches none of them" in missing.message
    assert {by_source[s].error.code for s in ("D/t2", "D/adc")} == {"dicom_channel_frames"}
    written = (tmp_path / "out/manifest.json").read_text() + (tmp_path / "out/record.json").read_text()
    assert "Ax T2 TSE" not in written and "ep2d_diff" not in written  # descriptions are matched, never written

    again = ingest(scan, tmp_path / "out", config=load_config(None, overrides=[CHANNELS]))
    assert again["reused_studies"] == 2


def test_channel_grid_refuse_fails_a_study_whose_channels_lie_on_different_grids(scan: Path, tmp_path: Path) -> None:
    ingest(scan, tmp_path / "out", config=load_config(None, overrides=[CHANNELS, "ingest.channel_grid=refuse"]))
    by_source = {s.source: s for s in load_manifest(tmp_path / "out").studies}
    assert by_source["A/t2"].error.code == "channel_grid_mismatch"
    assert by_source["A/t2"].error.message.startswith("A/adc: grid (shape [8, 6, 5], spacing [2.0, 2.0, 4.0]")
    assert by_source["B/t2"].status == "ok"


def test_a_channel_matching_several_series_names_them(scan: Path, tmp_path: Path) -> None:
    ingest(scan, tmp_path / "out", config=load_config(None, overrides=['ingest.channels={T2: "*t2*", X: "B/*"}']))
    studies = {s.source: s for s in load_manifest(tmp_path / "out").studies}
    message = studies["B/other"].error.message
    assert "channel X matches 3 of them: B/adc, B/other, B/t2" in message
    assert json.dumps(message).count("Ax T2") == 0


def test_the_dry_run_tells_the_channels_and_verdicts_of_the_real_run(scan: Path, tmp_path: Path) -> None:
    from pipeline.stages.ingest_survey import survey

    config = load_config(None, overrides=[CHANNELS])
    planned = {s.source: s for s in survey(scan, config=config)}
    ingest(scan, tmp_path / "out", config=config)
    manifest = {s.source: s for s in load_manifest(tmp_path / "out").studies}
    assert set(planned) == set(manifest)
    assert {k: (s.id, s.channels) for k, s in planned.items() if s.status == "to_convert"} == {
        "A/t2": (manifest["A/t2"].id, 2), "B/t2": (manifest["B/t2"].id, 2)}
    assert {k: s.reason[0] for k, s in planned.items() if s.reason} == {
        k: (s.error or s.problems[0]).code for k, s in manifest.items() if s.status != "ok"}


def test_a_4d_channel_series_fails_its_study_and_says_so_split_or_not(tmp_path: Path) -> None:
    """A series of two volumes (the same positions twice) cannot be one channel, whole or split in volumes."""
    root = tmp_path / "scan"
    t2 = {"origin": (0.0, 0.0, 0.0), "pixel_spacing": (1.0, 1.0), "step": 2.0}
    _series(root / "P/t2", np.ones(SHAPE, np.int16), study="1.2.9", frame="1.2.9.1", description="T2", **t2)
    for t in range(2):
        def edit(ds, k: int, t: int = t) -> None:
            ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.SeriesDescription = "1.2.9", "1.2.9.1", "ADC map"
            ds.InstanceNumber, ds.SOPInstanceUID = t * SHAPE[2] + k + 1, f"1.2.9.5.{t}.{k}"

        write_series(root / "P/adc", np.full(SHAPE, t, np.int16), series_tag=str(root / "P/adc"), edit=edit,
                     name_pattern=f"v{t}_{{index}}.dcm", **t2)  # type: ignore[arg-type]
    ingest(root, tmp_path / "whole", config=load_config(None, overrides=[CHANNELS]))
    (study,) = [s for s in load_manifest(tmp_path / "whole").studies if s.source == "P/t2"]
    assert study.error.code == "dicom_channels"
    assert study.error.message == ("P/t2: channel series P/adc holds 2 volumes (a 4D series), and a channel is one "
                                   "volume; leave that series out of ingest.channels")
    ingest(root, tmp_path / "split", config=load_config(None, overrides=[CHANNELS, "ingest.split_4d=true"]))
    by_source = [s for s in load_manifest(tmp_path / "split").studies if s.source == "P/t2"]
    assert by_source[0].error.code == "dicom_channels"
    assert "channel ADC matches 2 of them: P/adc (2 parts of one series)" in by_source[0].error.message
    assert "a series split in parts is not one channel" in by_source[0].error.message
