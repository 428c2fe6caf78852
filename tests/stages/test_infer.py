"""The infer stage: folder and manifest inputs, naming, one model load per batch, failures, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.demo_data import phantom
from pipeline.errors import CheckpointError
from pipeline.fileio import read_json, sha256_file
from pipeline.io.nifti import load_nifti, save_nifti
from pipeline.manifest import Manifest, Study, save_manifest
from pipeline.stages.infer import infer
from tests.unit.test_predictor import make_model_folder

CONFIG = load_config(None, overrides=["infer.device=cpu", "infer.sw_batch_size=2", "infer.overlap=0.25"])


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_model_folder(tmp_path / "run" / "03_train" / "model")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three images at different depths, one LAS and one anisotropic, plus a junk file."""
    rng = np.random.default_rng(3)
    root = tmp_path / "scans"
    a, _ = phantom(rng, shape=(20, 22, 18))
    b, _ = phantom(rng, shape=(18, 20, 16), flip_x=True)
    c, _ = phantom(rng, shape=(22, 18, 14), spacing=(0.8, 1.0, 1.5))
    save_nifti(a, root / "site1" / "sub" / "alpha.nii.gz")
    save_nifti(b, root / "beta.nii")
    save_nifti(c, root / "site2" / "gamma.nii.gz")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_input_naming_and_exact_grids(model_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run" / "04_infer"
    record = infer(model_dir.parent, image_folder, out, config=CONFIG)
    assert record["status"] == "complete"
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["alpha.nii.gz", "beta.nii.gz", "gamma.nii.gz"]
    index = read_json(out / "predictions.json")
    assert [p["id"] for p in index["predictions"]] == ["beta", "alpha", "gamma"]  # sorted by source path
    by_id = {p["id"]: p for p in index["predictions"]}
    assert set(by_id) == {"alpha", "beta", "gamma"}
    assert by_id["alpha"] == {"id": "alpha", "image": "site1/sub/alpha.nii.gz",
                              "prediction": "predictions/alpha.nii.gz"}
    assert by_id["beta"]["image"] == "beta.nii"
    assert index["model"]["sha256"] == sha256_file(model_dir / "model.pt")
    assert index["model"]["config_hash"] == "abc123"
    for entry in index["predictions"]:
        src = load_nifti(image_folder / entry["image"])
        pred = load_nifti(out / entry["prediction"])
        assert pred.shape == src.shape
        np.testing.assert_array_equal(pred.affine, src.affine)
        assert pred.meta["source_dtype"] == "uint8"


def test_model_is_loaded_once_for_the_batch(model_dir: Path, image_folder: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_load = torch.load

    def counting_load(path, *args, **kwargs):
        calls.append(str(path))
        assert kwargs.get("weights_only") is True
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    infer(model_dir, image_folder, tmp_path / "out", config=CONFIG)
    assert len(calls) == 1 and calls[0].endswith("model.pt")


def test_one_bad_image_fails_alone_and_reruns_are_identical(model_dir: Path, image_folder: Path,
                                                            tmp_path: Path) -> None:
    (image_folder / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    out = tmp_path / "out"
    record = infer(model_dir, image_folder, out, config=CONFIG)
    assert record["status"] == "partial"
    index = read_json(out / "predictions.json")
    assert [f["id"] for f in index["failed"]] == ["broken"]
    assert index["failed"][0]["code"] == "nifti_corrupt"
    assert len(index["predictions"]) == 3
    first = {p.name: p.read_bytes() for p in sorted((out / "predictions").iterdir())}
    first_index = (out / "predictions.json").read_bytes()
    infer(model_dir, image_folder, out, config=CONFIG, force=True)
    assert {p.name: p.read_bytes() for p in sorted((out / "predictions").iterdir())} == first
    assert (out / "predictions.json").read_bytes() == first_index


def test_up_to_date_run_is_skipped_without_loading(model_dir: Path, image_folder: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    infer(model_dir, image_folder, out, config=CONFIG)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("model loaded for an up-to-date stage"))
    assert infer(model_dir, image_folder, out, config=CONFIG).get("skipped") is True


def test_manifest_input_uses_ok_studies_and_filter(model_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    ingest = tmp_path / "01_ingest"
    studies = []
    for i, flip in enumerate([False, True, False]):
        image, label = phantom(rng, shape=(18, 20, 16), flip_x=flip)
        sid = f"case_{i:012d}"
        save_nifti(image, ingest / "images" / f"{sid}.nii.gz")
        studies.append(Study(id=sid, source=f"Doe^Jane_{i}/img.nii.gz", format="nifti", status="ok",
                             image=f"images/{sid}.nii.gz"))
    studies.append(Study(id="case_failed00000", source="x.nii", format="nifti", status="failed"))
    save_manifest(Manifest(dataset="demo", labels={"0": "background", "1": "core", "2": "shell"},
                           studies=studies), ingest)
    out = tmp_path / "04_infer"
    infer(model_dir, ingest, out, config=CONFIG)
    index = read_json(out / "predictions.json")
    assert [p["id"] for p in index["predictions"]] == [s.id for s in studies[:3]]
    assert index["predictions"][1] == {"id": studies[1].id, "image": f"images/{studies[1].id}.nii.gz",
                                       "prediction": f"predictions/{studies[1].id}.nii.gz"}
    assert "Doe" not in (out / "predictions.json").read_text()
    infer(model_dir, ingest, out, config=CONFIG, studies=[studies[2].id])
    assert [p.name for p in (out / "predictions").iterdir()] == [f"{studies[2].id}.nii.gz"]


def test_corrupt_model_is_a_checkpoint_error(model_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    (model_dir / "model.pt").write_bytes((model_dir / "model.pt").read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.pt"):
        infer(model_dir, image_folder, tmp_path / "out", config=CONFIG)
    (model_dir / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="model.pt"):
        infer(model_dir, image_folder, tmp_path / "out", config=CONFIG)


def test_same_file_name_in_two_folders_fails_both(model_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    save_nifti(load_nifti(image_folder / "beta.nii"), image_folder / "site2" / "beta.nii.gz")
    save_nifti(load_nifti(image_folder / "beta.nii"), tmp_path / "outside.nii.gz")
    (image_folder / "delta.nii.gz").symlink_to(tmp_path / "outside.nii.gz")  # never followed out of the folder
    infer(model_dir, image_folder, tmp_path / "out", config=CONFIG)
    index = read_json(tmp_path / "out" / "predictions.json")
    assert sorted((f["image"], f["code"]) for f in index["failed"]) == [
        ("beta.nii", "duplicate_name"), ("delta.nii.gz", "link_outside_root"), ("site2/beta.nii.gz", "duplicate_name")]
    assert sorted(p["id"] for p in index["predictions"]) == ["alpha", "gamma"]


def test_workers_give_the_same_outputs_and_the_command_never_imports_torch(model_dir: Path, image_folder: Path,
                                                                           tmp_path: Path) -> None:
    """With worker processes the models load in the workers only: the command's own process stays torch-free,
    and predictions.json (forward passes, TTA axes, checksums) is byte-identical to the in-process run's."""
    import subprocess
    import sys
    import textwrap

    tta = ["infer.device=cpu", "infer.sw_batch_size=2", "infer.overlap=0.25", "infer.tta=true"]
    load_config(None, overrides=tta)  # the overrides are valid
    script = textwrap.dedent(f"""
        import sys
        from pipeline.config import load_config
        from pipeline.stages.infer import infer
        if __name__ == "__main__":
            workers = int(sys.argv[1])
            config = load_config(None, overrides={tta!r} + [f"execution.workers={{workers}}"])
            record = infer({str(model_dir)!r}, {str(image_folder)!r}, sys.argv[2], config=config)
            print(record["status"], "torch" in sys.modules)
    """)
    (tmp_path / "run_infer.py").write_text(script)
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        done = subprocess.run([sys.executable, str(tmp_path / "run_infer.py"), str(workers), str(out)],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[workers] = done.stdout.split()
    assert runs[1] == ["complete", "True"] and runs[2] == ["complete", "False"]
    index = read_json(tmp_path / "out2" / "predictions.json")
    assert index["model"]["forward_passes_per_window"] == 8 and index["model"]["tta_flip_axes"] == [0, 1, 2]
    first, second = (tmp_path / out / "predictions.json" for out in ("out1", "out2"))
    assert first.read_bytes() == second.read_bytes()
    for path in sorted((tmp_path / "out1" / "predictions").iterdir()):
        assert path.read_bytes() == (tmp_path / "out2" / "predictions" / path.name).read_bytes()


def test_a_corrupt_model_fails_before_any_worker_starts(model_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    config = CONFIG.model_copy(update={"execution": CONFIG.execution.model_copy(update={"workers": 2})})
    (model_dir / "model.pt").write_bytes((model_dir / "model.pt").read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as caught:
        infer(model_dir, image_folder, tmp_path / "out", config=config)
    assert caught.value.code == "checkpoint_corrupt"
