"""Model export: TorchScript and ONNX files load back and give the PyTorch network's outputs; refusals; the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import NetworkConfig
from pipeline.errors import CheckpointError, StageError
from pipeline.export import model_export
from pipeline.export.model_export import export_model
from pipeline.fileio import read_json, sha256_file, write_json_atomic
from pipeline.inference.predictor import load_model
from pipeline.models.segmenters import build_segmenter

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

NET = NetworkConfig(name="unet", channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
LABELS = {"0": "background", "1": "core", "2": "shell"}


def make_model_folder(folder: Path) -> Path:
    """A model folder as the train stage writes it (model.json + a plain state_dict)."""
    torch.manual_seed(3)
    net = build_segmenter(NET, in_channels=1, out_channels=3)
    with torch.no_grad():  # non-trivial normalisation statistics and biases
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder.mkdir(parents=True)
    torch.save(net.state_dict(), folder / "model.pt")
    plans = {"schema_version": 1, "orientation": "RAS", "target_spacing": [1.0, 1.0, 1.0], "normalization": "zscore",
             "crop_foreground": False, "patch_size": [16, 24, 16], "num_classes": 3, "labels": LABELS}
    write_json_atomic(folder / "model.json", {
        "schema_version": 1, "task": "segmentation", "network": NET.model_dump(mode="json"), "in_channels": 1,
        "out_channels": 3, "plans": plans, "labels": LABELS, "patch_size": plans["patch_size"]})
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("export")
    model = make_model_folder(root / "03_train" / "model")
    out = root / "exported"
    return model, out, export_model(root / "03_train", out)  # the train folder is accepted too


def test_exports_load_back_and_match_pytorch_on_a_new_shape(exported: tuple[Path, Path, dict]) -> None:
    import onnxruntime as ort

    model, out, record = exported
    network = load_model(model).network
    x = torch.from_numpy(np.random.default_rng(9).normal(size=(2, 1, 24, 16, 32)).astype(np.float32))
    with torch.no_grad():
        expected = network(x).numpy()
    scripted = torch.jit.load(str(out / "model.torchscript.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(scripted(x).numpy(), expected, atol=1e-5, rtol=1e-5)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": x.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert expected.std() > 0.01 and expected.shape == (2, 3, 24, 16, 32)


def test_export_json_records_files_parity_and_what_the_model_needs(exported: tuple[Path, Path, dict]) -> None:
    model, out, record = exported
    assert record == read_json(out / "export.json")
    assert record["files"]["torchscript"]["sha256"] == sha256_file(out / "model.torchscript.pt")
    assert record["files"]["onnx"]["sha256"] == sha256_file(out / "model.onnx")
    assert record["source"]["weights_sha256"] == sha256_file(model / "model.pt")
    assert record["labels"] == LABELS and record["plans"]["patch_size"] == [16, 24, 16]
    assert record["input"]["spatial_multiple_of"] == 4 and record["output"]["classes"] == 3
    checks = record["parity"]["checks"]
    assert [c["input_shape"] for c in checks["onnx"]] == [[1, 1, 16, 24, 16], [1, 1, 20, 20, 20]]
    assert all(c["max_abs_diff"] <= 1e-4 for fmt in ("onnx", "torchscript") for c in checks[fmt])


def test_parity_failure_is_refused(exported: tuple[Path, Path, dict], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = exported
    real = model_export._onnx

    def perturbed(network: torch.nn.Module, example: torch.Tensor, *, opset: int) -> bytes:
        """Export a network whose last bias differs: the ONNX file no longer matches the weights."""
        import copy

        other = copy.deepcopy(network)
        with torch.no_grad():
            list(other.parameters())[-1].add_(0.01)
        return real(other, example, opset=opset)

    monkeypatch.setattr(model_export, "_onnx", perturbed)
    with pytest.raises(StageError, match="onnx export: outputs differ") as info:
        export_model(model, tmp_path / "bad", formats=("onnx",))
    assert info.value.code == "export_parity"


def test_bad_requests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="unknown export format"):
        export_model(tmp_path, tmp_path / "x", formats=("tflite",))
    with pytest.raises(CheckpointError, match="model.json"):
        export_model(tmp_path / "nothing", tmp_path / "x", formats=("onnx",))


def test_cli_exports_torchscript_only(exported: tuple[Path, Path, dict], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    model, _, _ = exported
    out = tmp_path / "cli"
    assert main(["export-model", str(model), "--out", str(out), "--formats", "torchscript"]) == 0
    assert (out / "model.torchscript.pt").is_file() and not (out / "model.onnx").exists()
    assert "torchscript" in capsys.readouterr().out
