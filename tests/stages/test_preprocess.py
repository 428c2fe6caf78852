"""The preprocess stage on the synthetic MSD dataset: plans, resampled/reoriented outputs, failures, reruns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import ManifestError
from pipeline.fileio import sha256_file
from pipeline.io.nifti import load_nifti
from pipeline.manifest import Manifest, Study, pseudonym, save_manifest
from pipeline.stages.preprocess import preprocess


def make_ingest(msd: Path, dest: Path, *, extra: list[Study] | None = None) -> Manifest:
    """An ingest folder (manifest.json, images/, labels/) for an MSD dataset, as the ingest stage would write it."""
    dataset = json.loads((msd / "dataset.json").read_text())
    studies = []
    for entry in dataset["training"]:
        name = Path(entry["image"]).name
        sid = pseudonym(f"imagesTr/{name}", key="test")
        (dest / "images").mkdir(parents=True, exist_ok=True)
        (dest / "labels").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(msd / entry["image"], dest / "images" / f"{sid}.nii.gz")
        shutil.copyfile(msd / entry["label"], dest / "labels" / f"{sid}.nii.gz")
        volume = load_nifti(dest / "images" / f"{sid}.nii.gz")
        studies.append(Study(id=sid, source=f"imagesTr/{name}", format="nifti", status="ok",
                             image=f"images/{sid}.nii.gz", label=f"labels/{sid}.nii.gz", modality="MR",
                             shape=list(volume.spatial_shape), spacing=list(volume.spacing),
                             orientation=volume.orientation))
    manifest = Manifest(dataset=dataset["name"], labels=dataset["labels"], studies=[*studies, *(extra or [])])
    save_manifest(manifest, dest)
    return manifest


def _world_centroid(volume, cls: int) -> np.ndarray:
    index = np.argwhere(np.asarray(volume.array) == cls).mean(axis=0)
    return (volume.affine @ np.append(index, 1.0))[:3]


@pytest.fixture(scope="module")
def prepared(msd_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Manifest, dict]:
    root = tmp_path_factory.mktemp("prep")
    extra = [
        Study(id="bad_failed", source="x.nii.gz", format="nifti", status="failed"),
        Study(id="bad_nolabel", source="y.nii.gz", format="nifti", status="ok", image="images/y.nii.gz"),
        Study(id="bad_escape", source="z.nii.gz", format="nifti", status="ok", image="../outside.nii.gz",
              label="labels/z.nii.gz"),
        Study(id="bad_corrupt", source="c.nii.gz", format="nifti", status="ok", image="images/c.nii.gz",
              label="labels/c.nii.gz"),
    ]
    manifest = make_ingest(msd_dataset, root / "01_ingest", extra=extra)
    first = manifest.studies[0]
    shutil.copyfile(root / "01_ingest" / first.image, root / "01_ingest/images/c.nii.gz")
    data = (root / "01_ingest" / first.label).read_bytes()
    (root / "01_ingest/labels/c.nii.gz").write_bytes(data[: len(data) // 2])  # truncated label
    out = root / "02_preprocess"
    record = preprocess(root / "01_ingest", out, config=load_config(None))
    return root, out, manifest, record


def test_record_counts_every_study(prepared) -> None:
    _, _, _, record = prepared
    by_id = {s["id"]: s for s in record["studies"]}
    assert record["status"] == "partial"
    assert record["counts"] == {"ok": 6, "failed": 2, "skipped": 2}
    assert by_id["bad_failed"]["status"] == "skipped" and by_id["bad_nolabel"]["code"] == "no_label"
    assert by_id["bad_escape"]["code"] == "path_outside_ingest"
    assert by_id["bad_corrupt"]["status"] == "failed" and by_id["bad_corrupt"]["code"] == "nifti_corrupt"


def test_plans_follow_the_fingerprint(prepared, msd_dataset: Path) -> None:
    _, out, _, _ = prepared
    plans = json.loads((out / "plans.json").read_text())
    spacings = [nib.load(p).header.get_zooms()[:3] for p in sorted((msd_dataset / "imagesTr").glob("*.nii.gz"))]
    assert plans["target_spacing"] == pytest.approx(np.median(np.array(spacings, dtype=np.float64), axis=0),
                                                    abs=1e-5)
    assert plans["num_classes"] == 3
    assert plans["labels"] == {"0": "background", "1": "core", "2": "shell"}
    assert plans["modality"] == "MR" and plans["orientation"] == "RAS" and plans["normalization"] == "zscore"
    assert plans["fingerprint"]["n_studies"] == 6
    # phantom intensities: shell ~ 1.0*200+100 = 300, core ~ 1.8*200+100 = 460 (with bias and noise)
    assert 250 < plans["intensity"]["mean"] < 420
    assert plans["intensity"]["p005"] < plans["intensity"]["mean"] < plans["intensity"]["p995"]


def test_outputs_keep_geometry(prepared) -> None:
    root, out, manifest, _ = prepared
    plans = json.loads((out / "plans.json").read_text())
    dataset = json.loads((out / "dataset.json").read_text())
    ids = sorted(s.id for s in manifest.studies if not s.id.startswith("bad_"))
    assert [e["id"] for e in dataset["studies"]] == ids
    for entry in dataset["studies"]:
        image, label = load_nifti(out / entry["image"]), load_nifti(out / entry["label"])
        assert image.same_grid(label)
        assert image.orientation == "RAS"
        assert image.spacing == pytest.approx(plans["target_spacing"], abs=1e-4)
        assert image.meta["source_dtype"] == "float32" and label.meta["source_dtype"] == "uint8"
        assert set(np.unique(label.array)) == {0, 1, 2}
        assert abs(float(image.array.mean())) < 1e-3 and float(image.array.std()) == pytest.approx(1.0, abs=1e-3)
        source = load_nifti(root / "01_ingest" / "labels" / f"{entry['id']}.nii.gz")
        # the organ sits at the same world position before and after reorientation + resampling
        assert np.allclose(_world_centroid(label, 2), _world_centroid(source, 2), atol=0.6)


def test_rerun_is_byte_identical_and_reuses(msd_dataset: Path, tmp_path: Path) -> None:
    make_ingest(msd_dataset, tmp_path / "ingest")
    out = tmp_path / "pre"
    first = preprocess(tmp_path / "ingest", out, config=load_config(None))
    assert first["status"] == "complete" and first["counts"]["ok"] == 6
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in ("record.json", "config.yaml"))
    before = {p: sha256_file(p) for p in files}
    assert preprocess(tmp_path / "ingest", out, config=load_config(None)).get("skipped") is True
    forced = preprocess(tmp_path / "ingest", out, config=load_config(None), force=True)
    assert {p: sha256_file(p) for p in files} == before
    assert all(s.get("reused") for s in forced["studies"])
    for sidecar in (out / "data").glob("*.json"):
        sidecar.unlink()
    recomputed = preprocess(tmp_path / "ingest", out, config=load_config(None), force=True)
    assert not any(s.get("reused") for s in recomputed["studies"])
    assert {p: sha256_file(p) for p in files} == before


def test_changed_spacing_changes_outputs(prepared, tmp_path: Path) -> None:
    root, _, _, _ = prepared
    out = tmp_path / "pre"
    record = preprocess(root / "01_ingest", out, config=load_config(None, overrides=["preprocess.spacing=[2,2,2]"]))
    assert record["counts"]["ok"] == 6
    entry = json.loads((out / "dataset.json").read_text())["studies"][0]
    assert load_nifti(out / entry["image"]).spacing == pytest.approx((2.0, 2.0, 2.0))


def test_a_folder_without_a_manifest_fails_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"no manifest at .*run 'medpipe ingest SCAN_DIR --out DIR' first"):
        preprocess(tmp_path / "not_ingested", tmp_path / "pre")
    assert not (tmp_path / "pre").exists()  # no config.yaml marking an unfinished run
